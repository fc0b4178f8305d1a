"""Integrated gradients over the weights of each layer (cf. SInGE, Yvinec et al.).

For a layer with kernel ``W`` and a baseline ``W0`` (zero, or the quantized
kernel ``Q_b(W)``), the signed attribution of weight i is

  A_i = (W - W0)_i * int_0^1 dL/dW_i (W0 + alpha (W - W0)) d alpha,

all other parameters held fixed, ``L`` averaged over the given batches. By the
fundamental theorem of calculus ``sum_i A_i = L(W) - L(W0)`` (completeness), up
to the quadrature error. The layer score is ``sum_i |A_i|``.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from safer_jax.core import layers as layers_lib
from safer_jax.core.perturb import quantize
from safer_jax.core.progress import Progress
from safer_jax.criteria import _common

_BASELINES = ("zero", "quantized")
_RULES = ("gauss_legendre", "riemann")


def quadrature(steps: int, rule: str = "gauss_legendre") -> tuple[np.ndarray, np.ndarray]:
  """Nodes ``alpha`` in (0, 1) and weights (summing to 1) of a quadrature rule.

  ``'gauss_legendre'``: ``steps``-point Gauss-Legendre (exact for polynomials of
  degree < 2*steps). ``'riemann'``: the midpoint Riemann sum,
  alpha_k = (k + 1/2) / steps, weights 1/steps.
  """
  steps = _common.check_positive_int("steps", steps)
  if rule == "gauss_legendre":
    x, w = np.polynomial.legendre.leggauss(steps)
    return (x + 1.0) / 2.0, w / 2.0
  if rule == "riemann":
    return (np.arange(steps) + 0.5) / steps, np.full(steps, 1.0 / steps)
  raise ValueError(f"Unsupported rule={rule!r}; allowed: {list(_RULES)}.")


def _baseline(kernel: jax.Array, baseline: str, bits: int, full_range: bool) -> jax.Array:
  if baseline == "zero":
    return _common.zeros_like(kernel)
  return quantize(kernel, bits, full_range=full_range)


@functools.partial(jax.jit, static_argnums=0)
def _node_point(names, index, kernels, w0, alpha):
  """The kernels with layer ``l = names[index]``'s at ``W0_l + alpha (W_l - W0_l)``."""
  moved = {n: w0[n] + alpha.astype(k.dtype) * (k - w0[n]) for n, k in kernels.items()}
  return _common.at_one_layer(names, index, moved, kernels)


@functools.partial(jax.jit, static_argnums=0)
def _add_node(names, index, total, grads, weight):
  """``total`` with ``weight * grads_l`` added to entry ``l = names[index]`` only."""
  added = {n: total[n] + weight.astype(g.dtype) * g for n, g in grads.items()}
  return _common.at_one_layer(names, index, added, total)


@jax.jit
def _attributions(total, kernels, w0, count):
  """``A = (W - W0) * total / count`` of every layer, in one program."""
  return {n: total[n] / count * (k - w0[n]) for n, k in kernels.items()}


@jax.jit
def _sums_of_abs(tree: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """``sum |A|`` of every array of ``tree``, in one compiled program (not one per shape)."""
  return jax.tree.map(lambda a: jnp.sum(jnp.abs(a)), tree)


@_common.accepts_nnx_state
def integrated_gradients_attributions(
    loss_fn: _common.LossFn, params: _common.Params, batches: Any, *, layers: Any = None,
    baseline: str = "zero", bits: int = 4, steps: int = 32, rule: str = "gauss_legendre",
    chunk_size: int | None = None, full_range: bool = True,
    progress: bool = False) -> dict[str, jax.Array]:
  """Signed per-weight integrated-gradient attributions of each selected kernel.

  Args:
    loss_fn, params, batches, layers: the criterion signature (:mod:`safer_jax.criteria`).
    baseline: ``'zero'`` (path from W0 = 0: removing the layer) or
      ``'quantized'`` (path from W0 = Q_b(W): quantizing it).
    bits: bit width of the ``'quantized'`` baseline, an integer in [1, 16].
    steps: number of quadrature nodes alpha.
    rule: ``'gauss_legendre'`` or ``'riemann'`` (midpoint), see ``quadrature``.
    chunk_size: checked, otherwise unused (kept for compatibility): the nodes run
      one per call. Vectorising them would batch every kernel of the all-layer
      program: on XLA:CPU, 4 nodes in one call took 15x one node's time (zoo
      mobilenet_v2, 32 images).
    full_range: the ``'quantized'`` baseline on qwix's full signed grid
      (:func:`safer_jax.core.perturb.quantize_grid`).
    progress: show layers done and an ETA (stderr).

  Returns:
    ``{layer: A}`` with ``A`` the kernel's shape; ``sum(A) ~ L(W) - L(W0)``
    (units: loss). COST per layer: ``steps`` full forward + backward passes
    per batch (each differentiates the whole network; the layer's gradient is
    the one used). A first call compiles that gradient once for all layers
    (:func:`_common.kernels_value_and_grad`) plus four small programs (point,
    node sum, attributions, sums), not one program per layer.

  Raises:
    ValueError: bad ``baseline``/``rule``/``bits``/``steps``, non-finite
      parameters, a pattern matching no layer, no data.
  """
  if baseline not in _BASELINES:
    raise ValueError(f"Unsupported baseline={baseline!r}; allowed: {list(_BASELINES)}.")
  bits = _common.check_bits(bits)
  alphas, weights = quadrature(steps, rule)
  if chunk_size is not None:
    chunk_size = _common.check_positive_int("chunk_size", chunk_size)
  names, batches = _common.setup(loss_fn, params, batches, layers)
  kernels = _common.replicated(layers_lib.get_kernels(params, names))
  w0 = {n: _baseline(k, baseline, bits, full_range) for n, k in kernels.items()}
  grad = _common.cached_jit(_common.kernels_value_and_grad, loss_fn, tuple(names))
  total = {n: _common.zeros_like(k) for n, k in kernels.items()}
  bar = Progress(len(names), "integrated gradients", enabled=progress, unit="layer")
  for index, name in enumerate(names):
    index = np.int32(index)
    for alpha, weight in zip(alphas, weights):
      point = _node_point(tuple(names), index, kernels, w0, np.float32(alpha))
      for batch in batches:
        _, g = grad(params, point, batch)
        total = _add_node(tuple(names), index, total, g, np.float32(weight))
    if progress:
      jax.block_until_ready(total)  # the ETA counts finished work
      bar.update(1, postfix=name)
  bar.close()
  return _attributions(total, kernels, w0, np.float32(len(batches)))


@_common.accepts_nnx_state
def integrated_gradients(loss_fn: _common.LossFn, params: _common.Params, batches: Any, *,
                         layers: Any = None, key: jax.Array | None = None,
                         baseline: str = "zero", bits: int = 4, steps: int = 32,
                         rule: str = "gauss_legendre",
                         chunk_size: int | None = None, full_range: bool = True,
                         progress: bool = False) -> _common.Scores:
  """Integrated-gradient importance sum_i |A_i| of each layer's kernel.

  Estimates how much the loss depends on the layer's weights along the path
  that removes (``baseline='zero'``) or quantizes (``'quantized'``) them; see
  ``integrated_gradients_attributions`` for the attributions ``A``.

  Args:
    loss_fn, params, batches, layers: the criterion signature (:mod:`safer_jax.criteria`).
    key: ignored.
    baseline, bits, steps, rule, chunk_size, full_range, progress: see
      ``integrated_gradients_attributions``.

  Returns:
    ``{layer: sum |A|}`` (units: loss). COST per layer: ``steps`` full forward +
    backward passes per batch; one compiled gradient for all layers (see
    ``integrated_gradients_attributions``).

  Raises:
    ValueError: bad options, non-finite parameters, a pattern matching no
      layer, no data.
  """
  del key
  attr = integrated_gradients_attributions(loss_fn, params, batches, layers=layers,
                                           baseline=baseline, bits=bits, steps=steps, rule=rule,
                                           chunk_size=chunk_size, full_range=full_range,
                                           progress=progress)
  sums = _sums_of_abs(attr)
  return {n: _common.to_float(sums[n]) for n in attr}
