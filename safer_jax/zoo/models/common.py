"""Building blocks shared by the zoo, and the *staged model* protocol.

Every zoo model is a sequence of named stages (top-level submodules). Calling
``model.apply(variables, x, train=False, start=i, stop=j)`` runs stages
``i .. j-1`` only, so a sensitivity sweep that perturbs a layer inside stage
``k`` can compute the activations entering stage ``k`` once and re-run only the
suffix ``k..`` for every perturbed copy (prefix reuse). ``model.stage_names``
lists the stages; a layer path ``'stage/.../conv'`` belongs to the stage named by
its first component.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

StageSpec = tuple[str, Callable[[str], nn.Module]]

# XLA:CPU runs a dense 3x3 convolution whose output map is 2x2 (or smaller) with >= 32 channels
# at ~5 GFLOP/s, 25x below its other convolutions (measured on jaxlib 0.10.2: a 2x2x64 -> 64
# conv on 359 images took 20 ms, a 4x4x64 -> 64 one 3.4 ms). The last ResNet stage on 8x8
# inputs is such a case and dominated every forward. On those tiny maps im2col + one matmul
# is exact up to float rounding and ~10x faster.
_IM2COL_MAX_OUTPUT_PIXELS = 4


def _im2col_conv(x, kernel, strides, pads):
  kh, kw, cin, cout = kernel.shape
  sh, sw = strides
  xp = jnp.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))
  ho = (xp.shape[1] - kh) // sh + 1
  wo = (xp.shape[2] - kw) // sw + 1
  cols = [xp[:, a:a + (ho - 1) * sh + 1:sh, b:b + (wo - 1) * sw + 1:sw, :]
          for a in range(kh) for b in range(kw)]
  # `jax.lax.dot_general` by name (the same program as `@`): qwix intercepts that call and
  # quantizes the kernel; through `@` it saw no weight and left the layer in float.
  return jax.lax.dot_general(jnp.concatenate(cols, axis=-1), kernel.reshape(kh * kw * cin, cout),
                             (((3,), (0,)), ((), ())))


def _depthwise_conv(x, kernel, strides, pads):
  """Depthwise conv (groups = channels, multiplier 1) as a sum of shifted slices x weights.

  ``x (B, H, W, C)``, ``kernel (kh, kw, 1, C)``. Elementwise multiply-adds, which stay
  elementwise under ``vmap`` over the kernel (perturbed copies, per-example gradients,
  Hessian-vector probes); XLA:CPU turns a vmapped grouped convolution into a
  convolution with ``C x copies`` groups that it runs up to ~60x slower.
  """
  kh, kw, _, _ = kernel.shape
  sh, sw = strides
  xp = jnp.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))
  ho = (xp.shape[1] - kh) // sh + 1
  wo = (xp.shape[2] - kw) // sw + 1
  out = None
  for a in range(kh):
    for b in range(kw):
      term = xp[:, a:a + (ho - 1) * sh + 1:sh, b:b + (wo - 1) * sw + 1:sw, :] * kernel[a, b, 0]
      out = term if out is None else out + term
  return out


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None, **kwargs):
  """``lax.conv_general_dilated``, except im2col + matmul on tiny output maps (see above).

  Used by every zoo convolution; parameters (``kernel`` HWIO) are unchanged.
  """
  nhwc = (lhs.ndim == 4 and not kwargs
          and all(d == 1 for d in (lhs_dilation or (1, 1)))
          and all(d == 1 for d in (rhs_dilation or (1, 1)))
          and dimension_numbers == jax.lax.conv_dimension_numbers(
              lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC")))
  if (nhwc and feature_group_count > 1 and feature_group_count == lhs.shape[-1]
      and rhs.shape[2] == 1 and rhs.shape[3] == lhs.shape[-1]):
    pads = (jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
            if isinstance(padding, str) else padding)
    return _depthwise_conv(lhs, rhs, window_strides, pads)
  plain = (feature_group_count != 1 or kwargs or lhs.ndim != 4
           or any(d != 1 for d in (lhs_dilation or (1, 1)))
           or any(d != 1 for d in (rhs_dilation or (1, 1)))
           or dimension_numbers != jax.lax.conv_dimension_numbers(
               lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC")))
  if not plain:
    pads = (jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
            if isinstance(padding, str) else padding)
    out_h = (lhs.shape[1] + sum(pads[0]) - rhs.shape[0]) // window_strides[0] + 1
    out_w = (lhs.shape[2] + sum(pads[1]) - rhs.shape[1]) // window_strides[1] + 1
    if out_h * out_w <= _IM2COL_MAX_OUTPUT_PIXELS and rhs.shape[0] * rhs.shape[1] > 1:
      return _im2col_conv(lhs, rhs, window_strides, pads)
  return jax.lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
      precision=precision, **kwargs)


def Conv(*args, **kwargs) -> nn.Conv:  # pylint: disable=invalid-name
  """``nn.Conv`` using :func:`conv_general_dilated` (same parameters and names)."""
  return nn.Conv(*args, conv_general_dilated=conv_general_dilated, **kwargs)


BN_MOMENTUM = 0.9  # the zoo's BatchNorm running-average momentum


def batch_norm(train: bool, name: str) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=1e-5,
                      name=name)


class StagedModel(nn.Module):
  """Base class: subclasses implement ``stage_specs()`` -> ``[(name, make_module)]``.

  Each stage module is called as ``stage(x, train)``.
  """

  def stage_specs(self) -> Sequence[StageSpec]:
    raise NotImplementedError  # abstract

  @property
  def stage_names(self) -> tuple[str, ...]:
    return tuple(name for name, _ in self.stage_specs())

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, start: int = 0,
               stop: int | None = None) -> jax.Array:
    """Runs stages ``start .. stop-1``.

    Args:
      x: images ``(B, H, W, C)`` float32 when ``start == 0``, else the
        activations entering stage ``start``.
      train: BatchNorm uses batch statistics (and updates ``batch_stats``).
      start: index of the first stage to run.
      stop: one past the last stage to run (``None``: to the end).

    Returns:
      Logits ``(B, num_classes)`` when ``stop`` is None, else the activations
      leaving stage ``stop - 1``.
    """
    specs = self.stage_specs()
    stop = len(specs) if stop is None else stop
    for name, make in specs[start:stop]:
      x = make(name=name)(x, train)
    return x


class MlpBlock(nn.Module):
  """A transformer's MLP: ``fc1`` (``hidden``) + GELU + ``fc2`` (back to the input width)."""
  hidden: int

  @nn.compact
  def __call__(self, x):
    y = nn.gelu(nn.Dense(self.hidden, name="fc1")(x))
    return nn.Dense(x.shape[-1], name="fc2")(y)


class DenseAct(nn.Module):
  """Flatten + ``Dense(features)`` (layer ``<stage>/fc``) + optional ReLU."""
  features: int
  relu: bool = True

  @nn.compact
  def __call__(self, x, train=False):
    del train
    x = x.reshape((x.shape[0], -1))
    x = nn.Dense(self.features, name="fc")(x)
    return nn.relu(x) if self.relu else x


class ConvPool(nn.Module):
  """``Conv 3x3`` (layer ``<stage>/conv``) + ReLU + 2x2 max-pool when the map is ≥ 4 wide."""
  features: int

  @nn.compact
  def __call__(self, x, train=False):
    del train
    x = nn.relu(Conv(self.features, (3, 3), padding="SAME", name="conv")(x))
    if x.shape[1] >= 4 and x.shape[2] >= 4:
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    return x


class ConvBN(nn.Module):
  """``Conv`` (``<stage>/conv``, no bias) + BatchNorm (``<stage>/bn``) + activation."""
  features: int
  kernel_size: tuple[int, int] = (3, 3)
  strides: int = 1
  groups: int = 1
  act: str = "relu"  # 'relu', 'relu6' or 'none'

  @nn.compact
  def __call__(self, x, train=False):
    x = Conv(self.features, self.kernel_size, strides=self.strides, padding="SAME",
                feature_group_count=self.groups, use_bias=False, name="conv")(x)
    x = batch_norm(train, "bn")(x)
    return activation(self.act)(x)


class PoolHead(nn.Module):
  """Global average pool + ``Dense(num_classes)`` (layer ``<stage>/fc``)."""
  num_classes: int

  @nn.compact
  def __call__(self, x, train=False):
    del train
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="fc")(x)


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  return {"relu": nn.relu, "relu6": nn.relu6, "none": lambda x: x}[name]
