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
import numpy as np

from safer_jax.core import layers as layers_lib
from safer_jax.core import norms
from safer_jax.core.progress import Progress
from safer_jax.criteria import _common
from safer_jax.core.norms import dual_norm, project  # noqa: F401  (public here too)


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
  non-zeros) is ``safer_jax.core.norms.steepest_ascent``; its value is
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
    saves a compilation); a first call compiles the layer's
    value-and-gradient program, the start and the step.

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
  return _pga_layers(loss_fn, params, batches, {names[0]: e}, p, int(steps), step_size,
                     n_sparse)[names[0]]


@functools.partial(jax.jit, static_argnums=0)
def _corrupted(names, index, kernels, corruptions):
  """The kernels with layer ``names[index]``'s corrupted, ``W_l + a_l``; one program for all."""
  moved = {n: kernels[n] + corruptions[n] for n in names}
  return _common.at_one_layer(names, index, moved, kernels)


@functools.partial(jax.jit, static_argnames=("p", "n"))
def _pga_start(g, radii, p, n):
  """The first-order maximiser of every layer (``{layer: a_0}``), in one program."""
  return {name: project(norms.steepest_ascent(g[name], e, p, n), e, p, n)
          for name, e in radii.items()}


@functools.partial(jax.jit, static_argnames=("p", "n"))
def _pga_step(a, grad_a, radii, step_size, p, n):
  """One ascent step of every layer (``{layer: a_t}``), in one program."""
  return {name: project(a[name] + norms.steepest_ascent(grad_a[name], step_size * e, p),
                        e, p, n) for name, e in radii.items()}


def _pga_layers(loss_fn, params, batches, radii, p, steps, step_size, n_sparse,
                progress=False):
  """PGA on every layer of ``radii`` (``{layer: eps_abs}``): ``{layer: PGAResult}``.

  The layers ascend in lockstep. Each layer's loss and gradient at ``W_l + a_l``
  (the other kernels at ``W``) comes from one program shared by every layer
  (:func:`_common.kernels_value_and_grad`), called once per layer per iterate; the start
  and every step of all layers are one program each. The gradient at ``a = 0``,
  the same for every layer, is one call. ``progress``: iterates done (stderr).
  """
  names = list(radii)
  kernels = layers_lib.get_kernels(params, names)
  vg = _common.cached_jit(_common.kernels_value_and_grad, loss_fn, tuple(names))

  def value_and_grad(point):
    return _common.batch_mean(vg(params, point, b) for b in batches)

  base, g = value_and_grad(kernels)
  a = _pga_start(g, radii, p, n_sparse)
  iterates, losses = [], []  # per iterate: {layer: a_t}, [L(W_l + a_t) per layer]
  bar = Progress(steps + 1, "corruption PGA", enabled=progress, unit="iteration")
  for t in range(steps + 1):
    results = [value_and_grad(_corrupted(tuple(names), np.int32(i), kernels, a))
               for i in range(len(names))]
    iterates.append(a)
    losses.append([loss for loss, _ in results])
    if t < steps:
      a = _pga_step(a, {n: grads[n] for n, (_, grads) in zip(names, results)}, radii,
                    step_size, p, n_sparse)
    if progress:
      bar.update(1, postfix=f"{len(names)} layers, {_common.to_float(losses[-1][-1]):.4g} "
                 "last loss")  # a sync: the ETA counts finished work
  bar.close()
  base = _common.to_float(base)
  losses = np.asarray(jax.device_get(losses), np.float64)  # (steps + 1, layers)
  out = {}
  for i, name in enumerate(names):
    best = int(np.argmax(losses[:, i]))  # the first of equal maxima, as a running best keeps
    out[name] = PGAResult(iterates[best][name], float(losses[best, i]) - base,
                          float(losses[0, i]) - base, radii[name],
                          [float(x) for x in losses[:, i]])
  return out


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
    increase). COST: one forward+backward pass per batch at ``W`` (every
    layer's start), then per layer ``steps + 1`` full forward+backward passes
    per batch (one at each iterate ``a_0 .. a_steps``; each differentiates the
    whole network, the layer's gradient is the one used). Compiles one
    value-and-gradient program for all layers (not one per layer), plus small
    programs (the radii, the point, the start, the step) once each.

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
  results = _pga_layers(loss_fn, params, batches, radii, p, int(steps), step_size, n_sparse,
                        progress)
  return {name: results[name].loss_increase for name in names}

