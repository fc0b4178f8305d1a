"""Input attributions and Grad-CAM maps of a Flax classifier, and how two sets of maps differ.

Every function takes a Flax ``model`` called as ``model.apply(variables, x,
train=False)`` and a batch ``x (B, H, W, C)``; the batch is processed at once
(one backward pass gives every example's gradient, because in inference mode
the examples do not interact). ``classes (B,)`` int picks the logit ``y_k``
to explain per example; ``None`` means the model's own prediction.

The activation of a named layer (``'conv2/conv'``: the ``'/'``-joined module
path, as in :mod:`safer_jax.core.layers`) is read with
``flax.linen.intercept_methods``, without editing the model: the interceptor
returns ``F + delta`` for that module, so ``∂y/∂F = ∂y/∂delta`` at
``delta = 0``. Everything is differentiable w.r.t. ``variables`` (double
backprop: :func:`gradcam` is itself built from a gradient), which is what
:mod:`safer_jax.budgeting.wcam` trains with.

Deformation metrics (:func:`deformation_metrics`) compare two stacks of maps
per image: Spearman rank correlation, top-k% intersection-over-union and the
cosine similarity of the L2-normalised maps.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from safer_jax.core import layers as layers_lib
from safer_jax.core import wrapping

Array = jax.Array
ArrayLike = jax.typing.ArrayLike
Variables = Mapping[str, Any]

METRICS = ("spearman", "iou", "cosine")


# ---------------------------------------------------------------------------
# Forward passes.
# ---------------------------------------------------------------------------


def logits(model: nn.Module | wrapping.WrappedModel, variables: Variables, x: Array) -> Array:
  """Inference-mode logits ``(B, K)`` of a linen, nnx or wrapped model run with ``variables``."""
  return wrapping.with_variables(model, variables).apply(variables, x)


def predict(model: nn.Module, variables: Variables, x: ArrayLike) -> Array:
  """The predicted class ``argmax y`` per example: ``x (B, H, W, C)`` -> ``(B,)`` int32."""
  return jnp.argmax(logits(model, variables, jnp.asarray(x)), axis=-1)


def _resolve_classes(model, variables, x, classes) -> Array:
  if classes is None:
    return jax.lax.stop_gradient(predict(model, variables, x))
  return jnp.asarray(classes, jnp.int32)


def _select(logits: Array, classes: Array) -> Array:
  """``logits (B, K)``, ``classes (B,)`` -> ``y_k (B,)``."""
  return jnp.take_along_axis(logits, classes[:, None], axis=-1)[:, 0]


def apply_with_layer(model: nn.Module, variables: Variables, x: ArrayLike, layer: str,
                     delta: ArrayLike | None = None) -> tuple[Array, Array]:
  """Runs the model, adding ``delta`` to the output of the module ``layer``.

  Args:
    model: a Flax linen module (called as ``model.apply(variables, x)`` in
      inference mode), an ``nnx.Module`` or a :func:`safer_jax.wrap`-ped one.
    variables: its variables (a pure dict, as ``wrap(model).variables``).
    x: images ``(B, H, W, C)`` float32.
    layer: ``'/'``-joined module path, e.g. ``'conv2/conv'`` (the module's own
      output, before any activation that its parent applies).
    delta: additive perturbation of the layer's output (same shape); ``None``: 0.

  Returns:
    ``(logits (B, K), F)`` where ``F`` is the layer's output *including*
    ``delta`` (so ``F = F_0`` at ``delta = 0``).

  Raises:
    ValueError: ``layer`` is not a module path of the model (lists the layers).
  """
  captured: list[Array] = []

  def hook(out):
    if delta is not None:
      out = out + delta
    captured.append(out)
    return out

  out = wrapping.with_variables(model, variables).apply_with_hook(
      variables, jnp.asarray(x), layer, hook)
  return out, captured[-1]


def layer_activation(model: nn.Module, variables: Variables, x: ArrayLike, layer: str) -> Array:
  """The output ``F`` of module ``layer``: e.g. ``(B, h, w, c)`` for a conv layer."""
  return apply_with_layer(model, variables, x, layer)[1]


def layer_gradient(model: nn.Module, variables: Variables, x: ArrayLike, layer: str,
                   classes: ArrayLike | None = None) -> tuple[Array, Array, Array]:
  """The activation ``F`` of ``layer`` and ``∂y_k/∂F`` per example.

  Obtained by differentiating w.r.t. an additive zero perturbation of the
  layer's output. Differentiable w.r.t. ``variables`` (double backprop).

  Args:
    model, variables, x, layer: as in :func:`apply_with_layer`.
    classes: ``(B,)`` int class per example; ``None``: the predicted class.

  Returns:
    ``(F, dF, classes)``: ``F`` and ``dF = ∂y_k/∂F`` of shape ``(B, h, w, c)``,
    and the classes used ``(B,)``.
  """
  x = jnp.asarray(x)
  classes = _resolve_classes(model, variables, x, classes)
  shape = jax.eval_shape(lambda: layer_activation(model, variables, x, layer)).shape

  def target(delta):
    logits, f = apply_with_layer(model, variables, x, layer, delta)
    return jnp.sum(_select(logits, classes)), f

  dF, F = jax.grad(target, has_aux=True)(jnp.zeros(shape, x.dtype))
  return F, dF, classes


def gradcam(model: nn.Module, variables: Variables, x: ArrayLike, layer: str,
            classes: ArrayLike | None = None,
            channel_mask: ArrayLike | None = None) -> Array:
  """The collapsed Grad-CAM map at a conv ``layer`` (Park et al. 2020, eq. for M).

  ``w_c = Σ_{h,w} ∂y_k/∂F_{c,h,w}`` and ``M = ReLU(Σ_c w_c F_c)``. Note the sum
  (not the mean) over positions, as in the source. Differentiable w.r.t.
  ``variables``.

  Args:
    model, variables, x, layer: as in :func:`apply_with_layer`; ``layer``'s
      output must be ``(B, h, w, c)``.
    classes: ``(B,)`` int; ``None``: the predicted class.
    channel_mask: ``(c,)`` or ``(B, c)`` weights (0/1 to drop channels) applied
      to the terms ``w_c F_c``; ``None``: all channels.

  Returns:
    ``M (B, h, w)`` float32, non-negative.
  """
  F, dF, _ = layer_gradient(model, variables, x, layer, classes)
  if F.ndim != 4:
    raise ValueError(f"Grad-CAM needs a (B, h, w, c) activation; {layer!r} gives {F.shape}.")
  w = jnp.sum(dF, axis=(1, 2))  # (B, c)
  if channel_mask is not None:
    mask = jnp.asarray(channel_mask, w.dtype)
    w = w * (mask if mask.ndim == 2 else mask[None])
  return nn.relu(jnp.einsum("bc,bhwc->bhw", w, F))


# ---------------------------------------------------------------------------
# Input attributions.
# ---------------------------------------------------------------------------


def input_gradient(model: nn.Module, variables: Variables, x: ArrayLike,
                   classes: ArrayLike | None = None) -> Array:
  """``∂y_k/∂x`` per example: ``(B, H, W, C)`` (one backward pass for the batch)."""
  x = jnp.asarray(x)
  classes = _resolve_classes(model, variables, x, classes)
  return jax.grad(lambda z: jnp.sum(_select(logits(model, variables, z), classes)))(x)


def saliency(model: nn.Module, variables: Variables, x: ArrayLike,
             classes: ArrayLike | None = None) -> Array:
  """Saliency ``|∂y_k/∂x|`` (Simonyan et al. 2014): ``(B, H, W, C)``, non-negative."""
  return jnp.abs(input_gradient(model, variables, x, classes))


def gradient_times_input(model: nn.Module, variables: Variables, x: ArrayLike,
                         classes: ArrayLike | None = None) -> Array:
  """Gradient × input ``x ⊙ ∂y_k/∂x``: ``(B, H, W, C)``, signed."""
  x = jnp.asarray(x)
  return x * input_gradient(model, variables, x, classes)


@struct.dataclass
class IGResult:
  """Integrated gradients and their completeness check.

  Attributes:
    attributions: ``(B, H, W, C)``; ``Σ attributions ≈ y_k(x) - y_k(x')``.
    delta_output: ``y_k(x) - y_k(baseline)`` per example, ``(B,)``.
    completeness_error: ``|Σ attributions - delta_output|`` per example, ``(B,)``
      (logit units).
    relative_error: ``completeness_error / max(|delta_output|, 1e-12)``, ``(B,)``.
  """
  attributions: Array
  delta_output: Array
  completeness_error: Array
  relative_error: Array


def integrated_gradients(model: nn.Module, variables: Variables, x: ArrayLike,
                         classes: ArrayLike | None = None, *, baseline: ArrayLike | None = None,
                         steps: int = 64, chunk: int | None = None) -> IGResult:
  """Integrated gradients (Sundararajan et al. 2017) with the path batched by ``vmap``.

  ``IG = (x - x') ⊙ (1/S) Σ_s ∂y_k/∂x (x' + α_s (x - x'))`` with the midpoint
  rule ``α_s = (s + 0.5) / S`` (our choice; more accurate than left Riemann).

  Args:
    model, variables, x, classes: as in :func:`input_gradient`.
    baseline: ``x'``, broadcastable to ``x``; ``None``: zeros (black image).
    steps: ``S``, number of points on the path.
    chunk: points per ``vmap`` call (``None``: all ``S`` at once; smaller saves memory).

  Returns:
    An :class:`IGResult` with the completeness error reported.
  """
  x = jnp.asarray(x)
  base = jnp.zeros_like(x) if baseline is None else jnp.broadcast_to(
      jnp.asarray(baseline, x.dtype), x.shape)
  classes = _resolve_classes(model, variables, x, classes)
  alphas = (jnp.arange(steps, dtype=x.dtype) + 0.5) / steps
  grad_at = jax.vmap(lambda a: input_gradient(model, variables, base + a * (x - base), classes))
  chunk = steps if chunk is None else max(1, int(chunk))
  total = jnp.zeros_like(x)
  for lo in range(0, steps, chunk):
    total = total + jnp.sum(grad_at(alphas[lo:lo + chunk]), axis=0)
  attributions = (x - base) * total / steps
  delta = (_select(logits(model, variables, x), classes)
           - _select(logits(model, variables, base), classes))
  err = jnp.abs(jnp.sum(attributions, axis=tuple(range(1, x.ndim))) - delta)
  return IGResult(attributions, delta, err, err / jnp.maximum(jnp.abs(delta), 1e-12))


def smoothgrad(model: nn.Module, variables: Variables, x: ArrayLike, key: Array,
               classes: ArrayLike | None = None, *, samples: int = 32,
               noise_level: float = 0.15, magnitude: bool = False) -> Array:
  """SmoothGrad (Smilkov et al. 2017): the gradient averaged over noisy copies of ``x``.

  Args:
    model, variables, x, classes: as in :func:`input_gradient`; the class is
      fixed from the clean input (``None``: its prediction).
    key: PRNG key for the noise.
    samples: number of noisy copies (batched with ``vmap``).
    noise_level: noise std relative to each image's range ``max(x) - min(x)``.
    magnitude: average ``|∂y/∂x|`` instead of ``∂y/∂x``.

  Returns:
    ``(B, H, W, C)`` averaged gradient.
  """
  x = jnp.asarray(x)
  classes = _resolve_classes(model, variables, x, classes)
  axes = tuple(range(1, x.ndim))
  span = (jnp.max(x, axis=axes, keepdims=True) - jnp.min(x, axis=axes, keepdims=True))
  sigma = noise_level * span

  def one(k):
    g = input_gradient(model, variables, x + sigma * jax.random.normal(k, x.shape, x.dtype),
                       classes)
    return jnp.abs(g) if magnitude else g

  return jnp.mean(jax.vmap(one)(jax.random.split(key, samples)), axis=0)


def collapse_channels(attributions: ArrayLike, reduce: str = "abs_sum") -> Array:
  """Turns ``(B, H, W, C)`` attributions into ``(B, H, W)`` maps.

  Args:
    attributions: ``(B, H, W, C)``.
    reduce: ``'abs_sum'`` (Σ_c |a|), ``'sum'`` (Σ_c a) or ``'abs_max'`` (max_c |a|).
  """
  a = jnp.asarray(attributions)
  fns: dict[str, Callable[[Array], Array]] = {
      "abs_sum": lambda a: jnp.sum(jnp.abs(a), -1), "sum": lambda a: jnp.sum(a, -1),
      "abs_max": lambda a: jnp.max(jnp.abs(a), -1)}
  if reduce not in fns:
    raise ValueError(f"Unknown reduce {reduce!r}; valid: {sorted(fns)}")
  return fns[reduce](a)


# ---------------------------------------------------------------------------
# Deformation metrics.
# ---------------------------------------------------------------------------


def _flat(maps: ArrayLike) -> np.ndarray:
  m = np.asarray(maps, np.float64)
  if m.ndim < 2:
    raise ValueError(f"maps must be (B, ...) with one map per image; got shape {m.shape}.")
  return m.reshape(m.shape[0], -1)


def spearman(maps_a: ArrayLike, maps_b: ArrayLike) -> np.ndarray:
  """Spearman rank correlation per image (average ranks for ties): ``(B,)``.

  NaN where either map is constant (e.g. an all-zero Grad-CAM map).
  """
  import scipy.stats  # pylint: disable=import-outside-toplevel  (see benchmark.py)
  a, b = _flat(maps_a), _flat(maps_b)
  ra = scipy.stats.rankdata(a, axis=1)
  rb = scipy.stats.rankdata(b, axis=1)
  ra -= ra.mean(1, keepdims=True)
  rb -= rb.mean(1, keepdims=True)
  den = np.sqrt((ra ** 2).sum(1) * (rb ** 2).sum(1))
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(den > 0, (ra * rb).sum(1) / np.where(den > 0, den, 1.0), np.nan)


def top_k_mask(maps: ArrayLike, fraction: float) -> np.ndarray:
  """Boolean ``(B, P)`` mask of the ``ceil(fraction * P)`` largest pixels of each map.

  Ties are broken by flat index (lower first); ``P`` = pixels per map.
  """
  m = _flat(maps)
  if not 0 < fraction <= 1:
    raise ValueError(f"fraction={fraction} must be in (0, 1].")
  k = max(1, int(np.ceil(fraction * m.shape[1])))
  order = np.argsort(-m, axis=1, kind="stable")[:, :k]
  mask = np.zeros(m.shape, bool)
  np.put_along_axis(mask, order, True, axis=1)
  return mask


def top_k_iou(maps_a: ArrayLike, maps_b: ArrayLike, fraction: float = 0.25) -> np.ndarray:
  """Intersection-over-union of the top-``fraction`` pixels of two maps, per image: ``(B,)``."""
  a, b = top_k_mask(maps_a, fraction), top_k_mask(maps_b, fraction)
  return (a & b).sum(1) / (a | b).sum(1)


def cosine(maps_a: ArrayLike, maps_b: ArrayLike, eps: float = 1e-12) -> np.ndarray:
  """Cosine similarity of the L2-normalised flattened maps, per image: ``(B,)`` in [-1, 1].

  0 where a map is all zero.
  """
  a, b = _flat(maps_a), _flat(maps_b)
  a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), eps)
  b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), eps)
  return (a * b).sum(1)


def deformation_metrics(reference: ArrayLike, maps: ArrayLike,
                        top_k: float = 0.25) -> dict[str, np.ndarray]:
  """Per-image agreement of ``maps`` with the ``reference`` maps (same shape ``(B, ...)``).

  Returns:
    ``{'spearman': (B,), 'iou': (B,), 'cosine': (B,)}``: Spearman rank
    correlation (NaN for a constant map), top-``top_k`` IoU, cosine similarity.
  """
  if np.shape(reference) != np.shape(maps):
    raise ValueError(f"shape mismatch: {np.shape(reference)} vs {np.shape(maps)}")
  return {"spearman": spearman(reference, maps), "iou": top_k_iou(reference, maps, top_k),
          "cosine": cosine(reference, maps)}


def summarize(metrics: Mapping[str, ArrayLike]) -> dict[str, float]:
  """Mean ± std over images: ``{'<name>_mean', '<name>_std', '<name>_nan'}`` per metric.

  NaNs (undefined Spearman) are left out of mean/std and counted in ``_nan``.
  """
  out: dict[str, float] = {}
  for name, values in metrics.items():
    v = np.asarray(values, np.float64)
    ok = v[np.isfinite(v)]
    out[f"{name}_mean"] = float(ok.mean()) if ok.size else float("nan")
    out[f"{name}_std"] = float(ok.std()) if ok.size else float("nan")
    out[f"{name}_nan"] = int(v.size - ok.size)
  return out
