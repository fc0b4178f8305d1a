"""First-order criteria: the loss gradient w.r.t. each layer's kernel.

``g`` below is the gradient of the loss w.r.t. one kernel, averaged over the
given batches (each batch weighted equally). One call computes ``g`` for all
selected layers at once: COST one forward + one backward pass per batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from safer_jax.core import layers as layers_lib
from safer_jax.criteria import _common


@_common.accepts_nnx_state
def grad_norm(loss_fn: _common.LossFn, params: _common.Params, batches: Any, *,
              layers: Any = None, key: jax.Array | None = None) -> _common.Scores:
  """Euclidean norm ||g||_2 of the mean loss gradient w.r.t. each kernel.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` mean loss over the batch.
    params: Flax params pytree (or ``variables``), as taken by ``loss_fn``.
    batches: sequence of batches (pytrees of arrays with a leading batch axis).
    layers: ``None`` (all layers) or regex pattern(s).
    key: ignored.

  Returns:
    ``{layer: ||g||_2}`` (units: loss / weight). COST: 1 forward + 1 backward
    pass per batch.

  Raises:
    ValueError: non-finite parameters, a pattern matching no layer, no data.
  """
  del key
  names, batches = _common.setup(loss_fn, params, batches, layers)
  _, grads = _common.mean_value_and_grads(loss_fn, params, batches, names)
  return {n: _common.to_float(jnp.linalg.norm(jnp.ravel(grads[n]))) for n in names}


@_common.accepts_nnx_state
def taylor(loss_fn: _common.LossFn, params: _common.Params, batches: Any, *,
           layers: Any = None, key: jax.Array | None = None) -> _common.Scores:
  """First-order Taylor estimate |sum(g * w)| of the loss change when zeroing a layer.

  L(W=0) - L(W) ~ -<g, W>; the score is its absolute value.

  Args:
    loss_fn, params, batches, layers: the criterion signature (:mod:`safer_jax.criteria`).
    key: ignored.

  Returns:
    ``{layer: |<g, W>|}`` (units: loss). COST: 1 forward + 1 backward pass per
    batch.

  Raises:
    ValueError: non-finite parameters, a pattern matching no layer, no data.
  """
  del key
  names, batches = _common.setup(loss_fn, params, batches, layers)
  _, grads = _common.mean_value_and_grads(loss_fn, params, batches, names)
  return {n: _common.to_float(jnp.abs(jnp.vdot(grads[n], layers_lib.get_kernel(params, n))))
          for n in names}


@_common.accepts_nnx_state
def taylor_abs(loss_fn: _common.LossFn, params: _common.Params, batches: Any, *,
               layers: Any = None, key: jax.Array | None = None) -> _common.Scores:
  """Sum of per-weight first-order Taylor scores sum(|g * w|).

  Sums the estimated loss changes of removing each weight individually, so
  that gradients of opposite signs do not cancel (unlike ``taylor``).

  Args:
    loss_fn, params, batches, layers: the criterion signature (:mod:`safer_jax.criteria`).
    key: ignored.

  Returns:
    ``{layer: sum |g * W|}`` (units: loss). COST: 1 forward + 1 backward pass
    per batch.

  Raises:
    ValueError: non-finite parameters, a pattern matching no layer, no data.
  """
  del key
  names, batches = _common.setup(loss_fn, params, batches, layers)
  _, grads = _common.mean_value_and_grads(loss_fn, params, batches, names)
  return {n: _common.to_float(jnp.sum(jnp.abs(grads[n] * layers_lib.get_kernel(params, n))))
          for n in names}


@_common.accepts_nnx_state
def fisher(loss_fn: _common.LossFn, params: _common.Params, batches: Any, *,
           layers: Any = None, key: jax.Array | None = None,
           chunk_size: int | None = None) -> _common.Scores:
  """Empirical-Fisher saliency sum(E_x[g_x^2] * w^2) of each kernel.

  ``g_x`` is the gradient of the loss on the single example ``x`` (computed as
  ``loss_fn`` on a batch of size 1, vectorised with ``jax.vmap``); ``E_x``
  averages over every example of every batch (examples weighted equally). The
  score is the diagonal-Fisher estimate of the loss increase of removing the
  layer's weights (Optimal Brain Damage / Theis et al. 2018), up to a factor 1/2.

  Note: ``loss_fn`` must not couple examples within a batch (e.g. BatchNorm in
  training mode); per-example gradients are then ill-defined.

  Args:
    loss_fn, params, batches, layers: the criterion signature (:mod:`safer_jax.criteria`).
    key: ignored.
    chunk_size: number of examples vectorised at once (``None``: the whole
      batch); lowers memory, which is batch x (selected kernel sizes) floats.

  Returns:
    ``{layer: sum_i E_x[g_{x,i}^2] w_i^2}`` (units: loss^2). COST: 1 forward +
    1 backward pass per example (vectorised over the batch).

  Raises:
    ValueError: non-finite parameters, a pattern matching no layer, no data.
  """
  del key
  names, batches = _common.setup(loss_fn, params, batches, layers)
  if chunk_size is not None:
    chunk_size = _common.check_positive_int("chunk_size", chunk_size)

  total, count = sum_sq_grads(loss_fn, params, batches, names, chunk_size=chunk_size)
  return {n: _common.to_float(_fisher_score(total[n], count, layers_lib.get_kernel(params, n)))
          for n in names}


def sum_sq_grads(loss_fn: _common.LossFn, params: _common.Params, batches: Sequence[Any],
                 names: Sequence[str], *,
                 chunk_size: int | None = None) -> tuple[dict[str, jax.Array], int]:
  """Per-example squared kernel gradients summed over every example: ``Σ_x g_x²``.

  ``g_x`` is the gradient of ``loss_fn`` on the single example ``x`` (a batch
  of size 1) w.r.t. each named kernel, vectorised over a batch with
  ``jax.vmap`` (or ``jax.lax.map`` over ``chunk_size`` examples at a time).
  Batches are summed in order. No argument checks (see :func:`fisher`).

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` mean loss over the batch.
    params: Flax params pytree.
    batches: sequence of batches; every leaf of a batch has the same leading size.
    names: layer paths.
    chunk_size: examples vectorised at once (``None``: a whole batch).

  Returns:
    ``({layer: Σ_x g_x²} (kernel shape, float32), number of examples)``.
    COST: 1 forward + 1 backward pass per example.

  Raises:
    ValueError: a batch whose leaves disagree on the batch size.
  """
  step = _common.cached_jit(_sum_sq_grads, loss_fn, tuple(names), chunk_size)
  total, count = None, 0
  for batch in batches:
    sizes = {x.shape[0] for x in jax.tree.leaves(batch)}
    if len(sizes) != 1:
      raise ValueError(f"Batch leaves disagree on the batch size: {sorted(sizes)}.")
    count += sizes.pop()
    s = step(params, batch)
    total = s if total is None else jax.tree.map(jnp.add, total, s)
  return total, count


def fisher_diagonal(loss_fn: _common.LossFn, params: _common.Params, batches: Sequence[Any],
                    names: Sequence[str], *,
                    chunk_size: int | None = None) -> dict[str, jax.Array]:
  """The diagonal empirical Fisher ``E_x[g_x²]`` of each named kernel.

  :func:`sum_sq_grads` divided by the number of examples (examples weighted
  equally, whatever their batch). The :func:`fisher` criterion is
  ``Σ_i E_x[g_{x,i}²] w_i²`` of the same sums.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` mean loss over the batch; it
      must not couple the examples of a batch (e.g. BatchNorm in train mode).
    params: Flax params pytree.
    batches: sequence of batches.
    names: layer paths.
    chunk_size: examples vectorised at once (``None``: a whole batch).

  Returns:
    ``{layer: E_x[g_x²]}``, kernel-shaped float32 arrays (units: (loss / weight)²).

  Raises:
    ValueError: no examples in ``batches`` (the mean would be NaN).
  """
  total, count = sum_sq_grads(loss_fn, params, batches, names, chunk_size=chunk_size)
  if count == 0:
    raise ValueError("fisher_diagonal got no examples (empty batches): the Fisher of 0 "
                     "examples is undefined; pass at least one calibration example.")
  return {n: total[n] / count for n in names}


@jax.jit
def _fisher_score(sum_sq, count, w):
  return jnp.sum(sum_sq / count * jnp.square(w))


@_common.per_example_sum
def _sum_sq_grads(loss_fn, names, chunk_size):
  """``(params, batch) -> {layer: sum_x g_x^2}`` over the examples of the batch."""

  def sum_sq_grads(params, batch):
    def example_sq(example):
      one = jax.tree.map(lambda x: x[None], example)
      f = lambda kernels: loss_fn(layers_lib.replace_kernels(params, kernels), one)
      return jax.tree.map(jnp.square, jax.grad(f)(layers_lib.get_kernels(params, names)))

    if chunk_size is None:
      sq = jax.vmap(example_sq)(batch)
    else:
      sq = jax.lax.map(example_sq, batch, batch_size=chunk_size)
    return jax.tree.map(lambda x: jnp.sum(x, axis=0), sq)

  return sum_sq_grads
