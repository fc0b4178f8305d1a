"""A tiny Vision Transformer (Dosovitskiy et al. 2021): patch embedding, pre-LN blocks, mean pool.

Stages and layers (every kernel has a stable path):

* ``embed``: images ``(B, H, W, C)`` are cut into ``patch x patch`` patches
  (an 8x8 digit with ``patch=2`` gives 16 tokens), flattened and projected by
  ``embed/patch`` (Dense ``(patch*patch*C, dim)``); a learned position embedding
  ``embed/pos_embedding`` ``(1, tokens, dim)`` (a parameter, not a kernel) is added.
* ``block1 .. block{depth}``: pre-LN transformer blocks, ``x + attn(ln1(x))`` then
  ``x + mlp(ln2(x))``. The attention is ``nn.MultiHeadDotProductAttention``
  named ``attn``: layers ``block{i}/attn/query``, ``.../key``, ``.../value``
  (DenseGeneral kernels ``(dim, heads, head_dim)``) and ``.../out`` (``(heads,
  head_dim, dim)``); the MLP is ``block{i}/mlp/fc1`` (``dim -> mlp_ratio*dim``,
  GELU) and ``block{i}/mlp/fc2``. LayerNorms ``ln1``, ``ln2`` hold no kernel.
* ``head``: LayerNorm ``head/ln``, mean over tokens, ``head/fc``.

No dropout: the model is deterministic (``train`` changes nothing; there is no
BatchNorm). Per-channel perturbations use the last kernel axis, so the
``query``/``key``/``value`` kernels get one scale per ``head_dim`` index (shared
by the heads) and ``out`` one per output feature.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp

from safer_jax.zoo.models import common


def patchify(x, patch: int):
  """``(B, H, W, C)`` -> ``(B, (H/p)*(W/p), p*p*C)``, patches in row-major order."""
  b, h, w, c = x.shape
  if h % patch or w % patch:
    raise ValueError(f"Image size {h}x{w} is not divisible by the patch size {patch}.")
  x = x.reshape(b, h // patch, patch, w // patch, patch, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


class PatchEmbed(nn.Module):
  """Patches -> ``Dense(dim)`` (layer ``<stage>/patch``) + learned ``pos_embedding``."""
  dim: int
  patch: int

  @nn.compact
  def __call__(self, x, train=False):
    del train
    x = nn.Dense(self.dim, name="patch")(patchify(x, self.patch))
    pos = self.param("pos_embedding", nn.initializers.normal(stddev=0.02),
                     (1, x.shape[1], self.dim), jnp.float32)
    return x + pos


class EncoderBlock(nn.Module):
  """Pre-LN transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""
  num_heads: int
  mlp_dim: int

  @nn.compact
  def __call__(self, x, train=False):
    del train  # no dropout.
    y = nn.LayerNorm(name="ln1")(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, deterministic=True,
                                        name="attn")(y, y)
    x = x + y
    y = nn.LayerNorm(name="ln2")(x)
    return x + common.MlpBlock(self.mlp_dim, name="mlp")(y)


class PoolHead(nn.Module):
  """LayerNorm ``<stage>/ln`` + mean over tokens + ``Dense(num_classes)`` (``<stage>/fc``)."""
  num_classes: int

  @nn.compact
  def __call__(self, x, train=False):
    del train
    x = jnp.mean(nn.LayerNorm(name="ln")(x), axis=1)
    return nn.Dense(self.num_classes, name="fc")(x)


class ViT(common.StagedModel):
  """Vision Transformer; the defaults are ``vit_tiny`` (2x2 patches, dim 32, 2 blocks, 4 heads)."""
  num_classes: int = 10
  patch: int = 2
  dim: int = 32
  depth: int = 2
  num_heads: int = 4
  mlp_ratio: int = 2

  def stage_specs(self):
    if self.dim % self.num_heads:
      raise ValueError(f"ViT dim={self.dim} is not divisible by num_heads={self.num_heads}.")
    specs = [("embed", functools.partial(PatchEmbed, self.dim, self.patch))]
    for i in range(self.depth):
      specs.append((f"block{i + 1}", functools.partial(
          EncoderBlock, self.num_heads, self.mlp_ratio * self.dim)))
    specs.append(("head", functools.partial(PoolHead, self.num_classes)))
    return specs
