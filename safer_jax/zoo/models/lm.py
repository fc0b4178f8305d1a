"""A small causal transformer language model (byte/character level), as a staged zoo model.

``lm_tiny`` = ``TransformerLM(vocab_size=num_classes)``: tokens ``(B, T)`` int ->
logits ``(B, T, vocab_size)`` float32, where the logits at position ``t`` predict
token ``t + 1`` and depend on tokens ``0 .. t`` only (causal). ``T <= max_len``.

Stages and layers (every weight has a stable path; ``find_layers`` names them):

* ``embed``: token embedding ``embed/tokens`` (``nn.Embed``, table ``(vocab, dim)``)
  plus a learned position embedding ``embed/positions`` (``nn.Embed``, table
  ``(max_len, dim)``). Both hold an ``embedding`` leaf, so both are *layers* of
  this library (perturbed, quantized and pruned like kernels; per-channel
  operations use the last axis, the feature).
* ``block1 .. block{depth}``: pre-LN blocks, ``x + attn(ln1(x))`` then
  ``x + mlp(ln2(x))``. The causal self-attention has four separate ``nn.Dense``
  layers ``block{i}/attn/query``, ``.../key``, ``.../value``, ``.../out``, each a
  2-D kernel ``(dim, dim)`` (heads are the ``num_heads`` consecutive slices of
  ``dim // num_heads`` output features), so each is a plain Dense that qwix (and
  :mod:`safer_jax.core.perturb`) treats per output feature on the last axis. The MLP
  is ``block{i}/mlp/fc1`` (``dim -> mlp_ratio * dim``, GELU) and
  ``block{i}/mlp/fc2``. LayerNorms ``ln1``, ``ln2`` hold no kernel.
* ``head``: LayerNorm ``head/ln``, then ``head/fc`` (Dense ``dim -> vocab``), or,
  with ``tie_embeddings=True``, no ``head/fc``: the logits are
  ``h @ embed/tokens.embedding.T`` (``nn.Embed.attend``).

Tied embeddings: the head stage calls ``attend`` on the *same* module instance
as the ``embed`` stage (``TransformerLM.__call__`` creates the embed module once
and hands it to the head), so the table lives only at ``params['embed']['tokens']``
and ``apply(v, h, start=k)`` reads it from there whatever ``k`` is. A
perturbation of ``embed/tokens`` then changes both the input lookup and the
output projection; since that layer belongs to stage 0 (``embed``) the sweep
re-runs the whole network for it, which is exact.

No dropout and no BatchNorm: ``train`` is accepted and ignored (the model is
deterministic; its only collection is ``params``). Floating-point token inputs
(e.g. the zeros that :func:`safer_jax.training.train.init_variables` builds) are cast to
int32, so the zoo's generic init works with ``input_shape=(T,)``.

Default size (``lm_tiny``, ``vocab_size=256``): dim 64, 2 blocks of 4 heads,
MLP 256, max_len 64: 137,216 parameters (120,576 with tied embeddings).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp

from safer_jax.zoo.models import common

EMBED_INIT = nn.initializers.normal(stddev=0.02)  # GPT-2's embedding init


def _as_tokens(x):
  """Token ids as int32 (floating inputs, e.g. a zero init batch, are cast)."""
  x = jnp.asarray(x)
  return x if jnp.issubdtype(x.dtype, jnp.integer) else x.astype(jnp.int32)


class TokenPosEmbed(nn.Module):
  """Token lookup (layer ``<stage>/tokens``) + learned positions (layer ``<stage>/positions``)."""
  vocab_size: int
  max_len: int
  dim: int

  def setup(self):
    self.tokens = nn.Embed(self.vocab_size, self.dim, embedding_init=EMBED_INIT, name="tokens")
    self.positions = nn.Embed(self.max_len, self.dim, embedding_init=EMBED_INIT,
                              name="positions")

  def __call__(self, x, train=False):
    del train
    x = _as_tokens(x)
    if x.ndim != 2:
      raise ValueError(f"TransformerLM takes token ids of shape (batch, length); got {x.shape}.")
    if x.shape[1] > self.max_len:
      raise ValueError(f"Sequence length {x.shape[1]} exceeds the model's max_len={self.max_len}.")
    return self.tokens(x) + self.positions(jnp.arange(x.shape[1]))[None]

  def attend(self, h):
    """``h @ tokens.embedding.T``: logits over the vocabulary (tied output projection)."""
    return self.tokens.attend(h)


class CausalSelfAttention(nn.Module):
  """Causal multi-head self-attention from four ``nn.Dense``: query, key, value, out."""
  num_heads: int

  @nn.compact
  def __call__(self, x):
    b, t, d = x.shape
    hd = d // self.num_heads
    split = lambda y: y.reshape(b, t, self.num_heads, hd)  # noqa: E731
    q = split(nn.Dense(d, name="query")(x))
    k = split(nn.Dense(d, name="key")(x))
    v = split(nn.Dense(d, name="value")(x))
    mask = nn.make_causal_mask(jnp.ones((b, t), jnp.int32))  # (B, 1, T, T)
    y = nn.dot_product_attention(q, k, v, mask=mask)  # (B, T, heads, hd)
    return nn.Dense(d, name="out")(y.reshape(b, t, d))


class DecoderBlock(nn.Module):
  """Pre-LN causal block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""
  num_heads: int
  mlp_dim: int

  @nn.compact
  def __call__(self, x, train=False):
    del train  # no dropout.
    x = x + CausalSelfAttention(self.num_heads, name="attn")(nn.LayerNorm(name="ln1")(x))
    return x + common.MlpBlock(self.mlp_dim, name="mlp")(nn.LayerNorm(name="ln2")(x))


class LMHead(nn.Module):
  """LayerNorm ``<stage>/ln`` + ``Dense(vocab)`` (``<stage>/fc``), or the tied ``embed.attend``."""
  vocab_size: int
  embed: TokenPosEmbed | None = None  # tied: the embed stage's module (shared, not copied)

  @nn.compact
  def __call__(self, x, train=False):
    del train
    x = nn.LayerNorm(name="ln")(x)
    logits = (self.embed.attend(x) if self.embed is not None
              else nn.Dense(self.vocab_size, name="fc")(x))
    return logits.astype(jnp.float32)


class TransformerLM(common.StagedModel):
  """Causal transformer LM; the defaults are ``lm_tiny`` (byte level: 256 tokens)."""
  vocab_size: int = 256
  max_len: int = 64
  dim: int = 64
  depth: int = 2
  num_heads: int = 4
  mlp_ratio: int = 4
  tie_embeddings: bool = False

  def stage_specs(self):
    if self.dim % self.num_heads:
      raise ValueError(f"TransformerLM dim={self.dim} is not divisible by "
                       f"num_heads={self.num_heads}.")
    specs = [("embed", functools.partial(TokenPosEmbed, self.vocab_size, self.max_len, self.dim))]
    for i in range(self.depth):
      specs.append((f"block{i + 1}", functools.partial(
          DecoderBlock, self.num_heads, self.mlp_ratio * self.dim)))
    specs.append(("head", functools.partial(LMHead, self.vocab_size)))
    return specs

  @nn.compact
  def __call__(self, x, train: bool = False, start: int = 0, stop: int | None = None):
    """Runs stages ``start .. stop-1`` (see :class:`safer_jax.zoo.models.common.StagedModel`).

    Args:
      x: token ids ``(B, T)`` when ``start == 0``, else the activations ``(B, T, dim)``
        entering stage ``start``.
      train: ignored (no dropout, no BatchNorm).
      start: index of the first stage to run.
      stop: one past the last stage to run (``None``: to the end).

    Returns:
      Logits ``(B, T, vocab_size)`` float32 when ``stop`` is None, else the
      activations leaving stage ``stop - 1``.
    """
    specs = self.stage_specs()
    stop = len(specs) if stop is None else stop
    # Tied: one embed module, called by stage 0 and attended by the head.
    shared = specs[0][1](name="embed") if self.tie_embeddings else None
    for index in range(start, stop):
      name, make = specs[index]
      if shared is not None and index == 0:
        stage = shared
      elif shared is not None and name == "head":
        stage = make(embed=shared, name=name)
      else:
        stage = make(name=name)
      x = stage(x, train)
    return x


def lm_tiny(num_classes: int = 256, **kwargs) -> TransformerLM:
  """The zoo entry ``'lm_tiny'``: ``num_classes`` is the vocabulary size (256 for bytes)."""
  if "vocab_size" in kwargs:
    raise ValueError("lm_tiny takes the vocabulary size as num_classes, not vocab_size.")
  return TransformerLM(vocab_size=num_classes, **kwargs)
