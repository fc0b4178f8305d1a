"""Parameter-corruption criteria (Zhang et al., AAAI 2021, arXiv 2006.05620).

The indicator of a layer is the worst loss increase over corruptions ``a`` of
its kernel within a p-norm ball,

  Delta(eps) = max_{||a||_p <= eps_abs, ||a||_0 <= n} L(W + a) - L(W),

with every other parameter fixed and ``L`` averaged over the given batches.
``eps`` is *relative* to the layer's weights, ``eps_abs = eps * ||W||_p`` (our
choice, so that layers of different scales are comparable; pass
``relative=False`` to use ``eps`` as an absolute radius).
"""

from __future__ import annotations

import functools
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from safer_jax import layers as layers_lib
from safer_jax import norms
from safer_jax.criteria import _common
from safer_jax.norms import dual_norm, project  # noqa: F401  (public here too)


def _check_n(n: Any) -> int | None:
  return norms.check_sparsity(n, "n_sparse")


def eps_absolute(kernel: jax.Array, eps: float, p: Any, relative: bool = True) -> float:
  """The absolute radius ``eps * ||W||_p`` (or ``eps`` if not ``relative``)."""
  return _radii({"": kernel}, eps, p, relative)[""]


@functools.partial(jax.jit, static_argnames="p")
def _norms(kernels, p):
  return {name: norms.vector_norm(k, p) for name, k in kernels.items()}


def _radii(kernels: dict[str, jax.Array], eps: float, p: Any,
           relative: bool = True) -> dict[str, float]:
  """:func:`eps_absolute` of every kernel of ``{layer: kernel}``: the norms in one program."""
  p = norms.normalize_p(p)
  eps = _common.check_nonneg_float("eps", eps)
  if not relative:
    return {name: eps for name in kernels}
  return {name: eps * _common.to_float(n) for name, n in _norms(dict(kernels), p).items()}


@_common.accepts_nnx_state
def corruption_first_order(loss_fn: _common.LossFn, params: _common.Params, batches: Any, *,
                           layers: Any = None, key: jax.Array | None = None, eps: float = 1e-2,
                           p: Any = 2, n_sparse: int | None = None,
                           relative: bool = True) -> _common.Scores:
  """First-order estimate of the worst-case corruption loss increase, eps_abs * ||g||_q.

  The maximiser of <g, a> over ``||a||_p <= eps_abs`` (and at most ``n_sparse``
  non-zeros) is ``safer_jax.norms.steepest_ascent``; its value is
  ``eps_abs * ||g||_q`` with ``1/p + 1/q = 1`` (p=2: ||g||_2, p=inf: sum |g|,
  p=1: max |g|). With ``n_sparse`` the q-norm is taken over the ``n_sparse``
  largest |g| (p=inf: their sum; p=2: their 2-norm; p=1: unchanged).

  Args:
    loss_fn, params, batches, layers: the criterion signature (:mod:`safer_jax.criteria`).
    key: ignored.
    eps: radius, relative to ``||W||_p`` (absolute if ``relative=False``).
    p: 1, 2 or inf (``float('inf')`` or ``'inf'``).
    n_sparse: optional maximum number of corrupted weights.
    relative: whether ``eps`` is relative to the layer's ``||W||_p``.

  Returns:
    ``{layer: eps_abs * ||g||_q}`` (units: loss). COST: 1 forward + 1
    backward pass per batch (all layers at once).

  Raises:
    ValueError: bad ``p``/``eps``/``n_sparse``, non-finite parameters, a
      pattern matching no layer, no data.
  """
  del key
  p = norms.normalize_p(p)
  n_sparse = _check_n(n_sparse)
  _common.check_nonneg_float("eps", eps)
  names, batches = _common.setup(loss_fn, params, batches, layers)
  _, grads = _common.mean_value_and_grads(loss_fn, params, batches, names)
  radii = _radii(layers_lib.get_kernels(params, names), eps, p, relative)
  return {name: radii[name] * _common.to_float(dual_norm(grads[name], p, n_sparse))
          for name in names}


class PGAResult(NamedTuple):
  """Outcome of ``pga_corruption`` for one layer.

  Attributes:
    corruption: the best corruption found, same shape as the kernel.
    loss_increase: ``L(W + corruption) - L(W)`` (the best over all iterates).
    initial_increase: the loss increase of the start (first-order maximiser).
    eps_abs: the absolute radius used.
    losses: ``L(W + a_t)`` for every iterate t = 0..steps (a_0 = start).
  """
  corruption: jax.Array
  loss_increase: float
  initial_increase: float
  eps_abs: float
  losses: list[float]


@_common.accepts_nnx_state
def pga_corruption(loss_fn: _common.LossFn, params: _common.Params, batches: Any, layer: str, *,
                   eps: float = 1e-2, p: Any = 2, steps: int = 10, step_size: float = 0.25,
                   n_sparse: int | None = None, relative: bool = True) -> PGAResult:
  """Worst-case corruption of one layer by projected gradient ascent (PGA).

  Starts from the first-order maximiser ``a_0 = steepest_ascent(g, eps_abs)``
  and iterates ``a <- Proj(a + steepest_ascent(grad_a L(W + a), step_size *
  eps_abs))`` (the steepest-ascent step for the p-norm: normalised gradient for
  p=2, sign for p=inf), projecting exactly onto the ball (see ``project``). The
  best iterate is kept, so the result is never worse than the start and never
  leaves the ball.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` mean loss over the batch.
    params: Flax params pytree.
    batches: sequence of batches.
    layer: the layer path.
    eps: radius, relative to ``||W||_p`` (absolute if ``relative=False``).
    p: 1, 2 or inf.
    steps: number of ascent steps (0: evaluate the first-order maximiser only).
    step_size: step length as a fraction of ``eps_abs``.
    n_sparse: optional maximum number of corrupted weights.
    relative: whether ``eps`` is relative to ``||W||_p``.

  Returns:
    A ``PGAResult``. COST: ``steps + 2`` forward+backward passes per batch
    (at ``W``, then at every iterate ``a_0 .. a_steps``; the last one's
    gradient is unused, but sharing the compiled program with the others
    saves a compilation per layer).

  Raises:
    ValueError: bad options, non-finite parameters, unknown layer, no data.
  """
  p = norms.normalize_p(p)
  n_sparse = _check_n(n_sparse)
  if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
    raise ValueError(f"`steps` must be a non-negative integer, got {steps!r}.")
  step_size = _common.check_nonneg_float("step_size", step_size)
  names, batches = _common.setup(loss_fn, params, batches, re.escape(layer))
  e = eps_absolute(layers_lib.get_kernel(params, names[0]), eps, p, relative)
  return _pga_layer(loss_fn, params, batches, names[0], e, p, int(steps), step_size, n_sparse)


def _corrupted_value_and_grad(loss_fn, name):
  """``(params, kernel, a, batch) -> (L(W + a), dL/da)`` with ``W + a`` the layer's kernel.

  The corruption is added inside the program: an eager ``kernel + a`` compiled one more
  program per layer on a first run.
  """
  f = _common.layer_loss(loss_fn, name)
  return jax.value_and_grad(lambda params, kernel, a, batch: f(params, kernel + a, batch),
                            argnums=2)


@functools.partial(jax.jit, static_argnames=("p", "n"))
def _pga_start(g, eps_abs, p, n):
  return project(norms.steepest_ascent(g, eps_abs, p, n), eps_abs, p, n)


@functools.partial(jax.jit, static_argnames=("p", "n"))
def _pga_step(a, grad_a, eps_abs, step_abs, p, n):
  step = norms.steepest_ascent(grad_a, step_abs, p)
  return project(a + step, eps_abs, p, n)


def _pga_layer(loss_fn, params, batches, name, e, p, steps, step_size, n_sparse):
  """PGA on one layer within the absolute radius ``e`` (see :func:`pga_corruption`)."""
  kernel = layers_lib.get_kernel(params, name)
  vg = _common.cached_jit(_corrupted_value_and_grad, loss_fn, name)

  def value_and_grad(a):
    return _common.batch_mean(vg(params, kernel, a, b) for b in batches)

  base, g = value_and_grad(_common.zeros_like(kernel))
  base = _common.to_float(base)
  a = _pga_start(g, e, p, n_sparse)
  best_a, best_loss, losses = a, None, []
  for t in range(steps + 1):
    loss, ga = value_and_grad(a)
    loss = _common.to_float(loss)
    losses.append(loss)
    if best_loss is None or loss > best_loss:
      best_a, best_loss = a, loss
    if t < steps:
      a = _pga_step(a, ga, e, step_size * e, p, n_sparse)
  return PGAResult(best_a, best_loss - base, losses[0] - base, e, losses)


@_common.accepts_nnx_state
def corruption_pga(loss_fn: _common.LossFn, params: _common.Params, batches: Any, *,
                   layers: Any = None, key: jax.Array | None = None, eps: float = 1e-2,
                   p: Any = 2, steps: int = 10, step_size: float = 0.25,
                   n_sparse: int | None = None, relative: bool = True,
                   progress: bool = False) -> _common.Scores:
  """Worst-case corruption loss increase L(W + a) - L(W) of each layer, by PGA.

  A tighter (larger) estimate of the corruption indicator than
  ``corruption_first_order``: multi-step projected gradient ascent within the
  eps-ball, from the first-order maximiser, keeping the best iterate. See
  ``pga_corruption`` for the algorithm.

  Args:
    loss_fn, params, batches, layers: the criterion signature (:mod:`safer_jax.criteria`).
    key: ignored.
    eps, p, steps, step_size, n_sparse, relative: see ``pga_corruption``.
    progress: show layers done and an ETA (stderr).

  Returns:
    ``{layer: L(W + a) - L(W)}`` (units: loss; >= the first-order start's
    increase). COST per layer: ``steps + 2`` forward+backward passes per batch;
    two layers at a time (one under ``jax.distributed``).

  Raises:
    ValueError: bad options, non-finite parameters, a pattern matching no layer,
      no data.
  """
  del key
  p = norms.normalize_p(p)
  n_sparse = _check_n(n_sparse)
  if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
    raise ValueError(f"`steps` must be a non-negative integer, got {steps!r}.")
  step_size = _common.check_nonneg_float("step_size", step_size)
  _common.check_nonneg_float("eps", eps)
  names, batches = _common.setup(loss_fn, params, batches, layers)
  radii = _radii(layers_lib.get_kernels(params, names), eps, p, relative)
  increase = lambda n: _pga_layer(loss_fn, params, batches, n, radii[n], p, int(steps),
                                  step_size, n_sparse).loss_increase
  return dict(zip(names, _common.map_layers(increase, names, label="corruption PGA",
                                            progress=progress)))

