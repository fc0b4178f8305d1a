"""Second-order criteria on each layer's Hessian block.

For a layer with kernel ``W`` (n weights) the block is ``H = d^2 L / dW^2``
(n x n), all other parameters held fixed, ``L`` the loss averaged over the
given batches. ``H`` is never formed: the criteria use Hessian-vector products
(HVPs) computed forward-over-reverse, ``jax.jvp(jax.grad(f), (W,), (v,))``.
One HVP costs about one forward + one backward pass and its forward-mode
derivative, i.e. ~2-3x a gradient, per batch. The probes of one call of the
Hutchinson estimators share one linearisation (``jax.linearize``: the forward
and backward pass once, then only the linear map per probe).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from safer_jax.core import layers as layers_lib
from safer_jax.criteria import _common
from safer_jax.criteria._common import kernels_hvp  # every layer's HVP in one call (tests)
from safer_jax.core.progress import Progress
from safer_jax.criteria import confidence as confidence_lib
from safer_jax.criteria.data_free import quant_sq_errors


class TraceEstimate(NamedTuple):
  """Hutchinson estimate of a layer's Hessian trace.

  Attributes:
    mean: the estimate of tr(H) (units: loss / weight^2).
    stderr: standard error of ``mean`` (sample std of the probes / sqrt(count)).
    num_probes: number of Rademacher probes used.
    confidence: the probability that the call's ranking is right, and more:
      every pair of layers in different tie groups (with ``top_k``: every pair
      across the top-k boundary) ordered like the true traces and more than
      ``tie_rtol`` apart (posterior draws of the
      means, :func:`safer_jax.criteria.confidence.verdict`; the same value for
      every layer of one call).
    group: the layer's tie group, 0 for the largest traces; the order of the
      layers of one group is not claimed: they are within ``tie_rtol`` of each
      other, or not yet told apart (:func:`safer_jax.criteria.trace_ranking`
      lists the groups).
    converged: whether the stopping rule's target was reached (None for
      ``stop=None``, which asks for no target).
    warning: why not, when ``converged`` is False (the unsettled neighbours).
  """
  mean: float
  stderr: float
  num_probes: int
  confidence: float = float("nan")
  group: int = 0
  converged: bool | None = None
  warning: str | None = None


STOP_RULES = ("ranking", "rel_tol", None)
ESTIMATORS = ("all_layers", "per_layer")


def _shared_linearisation_quads(grad_at: Callable, point: Any, vs: Any,
                                 products: Callable) -> jax.Array:
  """``products(v, H v)`` for every probe ``v`` of ``vs`` (leading axis), one linearisation shared.

  ``grad_at`` maps ``point`` to the gradient (a pytree like ``point``); it is
  linearised once (``jax.linearize``: the forward and backward pass run once per
  call) and only its linear map, the forward-mode derivative of the backward
  pass, runs per probe. On CPU the probes run one after another in straight-line
  code; elsewhere side by side (``vmap``). See :func:`_probes_per_call`.
  """
  _, hvp = jax.linearize(grad_at, point)
  one = lambda v: products(v, hvp(v))
  if jax.default_backend() != "cpu":
    return jax.vmap(one)(vs)
  count = jax.tree.leaves(vs)[0].shape[0]
  return jnp.stack([one(jax.tree.map(lambda x, i=i: x[i], vs)) for i in range(count)])


def rademacher_tree(key: jax.Array, kernels: Mapping[str, jax.Array],
                    names: Sequence[str]) -> dict[str, jax.Array]:
  """``{name: v}``: independent Rademacher entries (+-1, each with probability 1/2) shaped like
  each kernel, all drawn at once.

  One ``jax.random.bits`` call gives ``ceil(n / 32)`` uint32 words for the ``n``
  entries of all kernels together; each bit is one sign. One random-number
  program instead of one per kernel: on the zoo mobilenet_v2 (20 kernels) the
  all-layer HVP program compiled in 5.6 s against 8.2 s with one
  ``jax.random.rademacher`` per kernel, and ran in 4.9 against 11.1 ms.
  """
  sizes = [int(np.prod(kernels[n].shape)) for n in names]
  words = jax.random.bits(key, (-(-sum(sizes) // 32),), jnp.uint32)
  shifts = jnp.arange(32, dtype=jnp.uint32)
  bits = ((words[:, None] >> shifts) & 1).reshape(-1)
  out, offset = {}, 0
  for name, size in zip(names, sizes):
    k = kernels[name]
    out[name] = (1 - 2 * bits[offset:offset + size].astype(k.dtype)).reshape(k.shape)
    offset += size
  return out


def _quad_fn(loss_fn, name):
  """``(params, kernel, vs, batch) -> [v^T H v for v in vs]``, one linearisation per call."""
  f = _common.layer_loss(loss_fn, name)

  def quad(params, kernel, vs, batch):
    return _shared_linearisation_quads(lambda k: jax.grad(f, argnums=1)(params, k, batch),
                                       kernel, vs, jnp.vdot)

  return quad


def _all_layers_quad_fn(loss_fn, names, impl, examples=None):
  """``(params, key_data, batch) -> (P, L)``: ``v_l^T (H v)_l`` per probe and layer, one HVP each.

  ``v`` is a Rademacher vector over all ``L`` selected kernels at once and
  ``H v`` the full Hessian (of the loss w.r.t. those kernels) times ``v``:
  forward-over-reverse. ``E[v_l^T (H v)_l] = tr(H_ll)`` since the cross-layer
  terms ``v_l^T H_lm v_m`` vanish in expectation. The probes are drawn inside
  from ``key_data`` (``(P, ...)`` uint32: the raw data of one key of
  implementation ``impl`` per probe). The probes of one call share one
  linearisation of the gradient (:func:`_shared_linearisation_quads`). With
  ``examples`` (an int), each probe's HVP is on its own ``examples`` examples
  of ``batch``, drawn uniformly without replacement from the probe's key (no
  linearisation to share: one HVP per probe, vmapped).
  """
  names = tuple(names)
  rademacher = lambda key, kernels: rademacher_tree(key, kernels, names)
  per_layer = lambda v, hv: jnp.stack([jnp.vdot(v[n], hv[n]) for n in names])

  def quad(params, key_data, batch):
    kernels = layers_lib.get_kernels(params, names)
    keys = jax.random.wrap_key_data(key_data, impl=impl)  # raw uint32: placeable on any mesh
    grad_on = lambda b: jax.grad(lambda k: loss_fn(layers_lib.replace_kernels(params, k), b))
    if examples is None:
      vs = jax.vmap(lambda key: rademacher(key, kernels))(keys)
      return _shared_linearisation_quads(grad_on(batch), kernels, vs, per_layer)

    def one(key):
      size = jax.tree.leaves(batch)[0].shape[0]
      idx = jax.random.choice(jax.random.fold_in(key, len(names)), size, (examples,),
                              replace=False)
      v = rademacher(key, kernels)
      return per_layer(v, jax.jvp(grad_on(jax.tree.map(lambda x: x[idx], batch)),
                                  (kernels,), (v,))[1])

    if keys.shape[0] == 1:  # one probe per call (CPU): no size-1 vmap (compile 17.9 against
      return one(keys[0])[None]  # 19.0 s, call 8.6 against 10.7 ms; mobilenet_v2, loaded CPU)
    return jax.vmap(one)(keys)

  return quad


# Probes per call on CPU when they share a linearisation (run one after another in one
# program). Zoo mobilenet_v2, all-layer HVP on 128 images, ms per probe: 1 per call 125, 2: 98,
# 4: 83, 8: 84; hessian_trace (64 probes, 2 x 128 images) cold / warm s: 1 per call 16.7-16.9 /
# 6.6-7.7, 2: 17.3-18.3 / 5.1-5.8, 4: 22.5-24.0 / 4.3-4.4. Two: first runs compile about as
# long as with one probe per call.
_CPU_SHARED_PROBES = 2


def _probes_per_call(chunk: int, shared: bool = True) -> int:
  """Probes one compiled call evaluates (``shared``: they share one linearisation).

  Accelerators: the whole chunk, side by side (``vmap``). CPU: the largest divisor
  of ``chunk`` up to ``_CPU_SHARED_PROBES``, one after another in straight-line code
  (one compiled program per run); one probe per call when nothing is shared.
  XLA:CPU runs grouped (e.g. depthwise) convolutions with a batch of kernel
  tangents (what ``vmap`` over probes makes of them) far slower than one probe
  after another (a mobilenet_v2 with ``nn.Conv`` depthwise layers, 128 images: 4
  vmapped probes 75 s, 4 separate calls 0.9 s), and convolutions inside a loop
  body (``lax.map``/``scan``) too: the zoo mobilenet_v2's 1x1 kernel gradient of
  ``block6/project`` took 3.8 ms per probe there, against ~0.1 ms in straight-line
  code.
  """
  if jax.default_backend() != "cpu":
    return chunk
  if not shared:
    return 1
  return max(d for d in range(1, min(chunk, _CPU_SHARED_PROBES) + 1) if chunk % d == 0)


def _in_calls(fn: Callable, xs: jax.Array, *args, shared: bool = True) -> jax.Array:
  """``fn(xs, *args)`` for a leading probe axis, in calls of :func:`_probes_per_call` probes."""
  step = _probes_per_call(xs.shape[0], shared)
  if step >= xs.shape[0]:
    return fn(xs, *args)
  return jnp.concatenate([fn(xs[i:i + step], *args) for i in range(0, xs.shape[0], step)])


@_common.accepts_nnx_state
def hutchinson_trace(loss_fn: _common.LossFn, params: _common.Params, batches: Any, *,
                     layers: Any = None, key: jax.Array | None = None,
                     stop: str | None = "ranking", target: float | None = None,
                     tie_rtol: float = 0.05, top_k: int | None = None,
                     rel_tol: float | None = None, max_probes: int = 1024,
                     min_probes: int | None = None, chunk_size: int = 16,
                     estimator: str = "all_layers", n_boot: int = 400,
                     probe_examples: int | None = None,
                     progress: bool = False) -> dict[str, TraceEstimate]:
  """Hutchinson estimates of the trace of every layer's Hessian block.

  tr(H_ll) = E_v[v^T H_ll v] with Rademacher probes v (entries +-1); every
  probe sees every batch, so the only noise is the probes'.

  * ``estimator='all_layers'`` (default): one probe is a Rademacher vector over
    *all* selected kernels and costs one full Hessian-vector product, which
    gives ``v_l^T (H v)_l`` for every layer ``l`` at once (cross-layer terms
    vanish in expectation; they add variance, not bias). One compiled program.
  * ``estimator='per_layer'``: one HVP per layer per probe on that layer's
    block only (lower variance per probe, ``L`` times the work and ``L``
    compilations).

  Probes are drawn ``chunk_size`` at a time and the stopping rule is checked
  after each chunk, once ``min_probes`` are in. The probes of one call share one
  linearisation of the gradient (per batch): the forward and backward pass are
  paid once per call, then each probe only the linear map of an HVP. On
  accelerators a call is the whole chunk (``vmap``), on CPU up to 2 probes in
  straight-line code (see :func:`_probes_per_call`). The rules:

  * ``stop='ranking'`` (default): stop once the ranking is settled
    (:mod:`safer_jax.criteria.confidence`): every pair of neighbours in it
    (with ``top_k``: the pair at the top-k boundary, the set a budget keeps) is
    either *ordered* (more than ``tie_rtol`` apart) or *tied* (within
    ``tie_rtol`` of each other), each with posterior probability ``>= target``,
    and the probability that every claimed order is right by more than
    ``tie_rtol`` (``confidence``) is ``>= target``. Neighbours neither
    ordered nor tied are reported as tied (within the noise). With
    ``estimator='per_layer'`` each layer has its own probes and the rule
    applies to them jointly.
  * ``stop='rel_tol'``: stop when every layer's ``stderr <= rel_tol * |mean|``.
  * ``stop=None``: exactly ``max_probes`` probes (rounded up to a multiple of
    ``chunk_size``); the groups and confidence are reported (at ``target``),
    no target is sought. With 8 probes ``per_layer``'s reported confidence is
    optimistic on lenet (0.96 reported, 0.88 right; ``experiments/trace_calibration.py``).

  Either way at most ``max_probes`` (rounded up to a multiple of ``chunk_size``).
  Reaching it before the target gives ``converged=False`` and a ``warning``
  naming the least settled pairs, in the result and as a ``RuntimeWarning``.

  ``probe_examples`` (``all_layers`` only) makes each probe cheaper: its HVP is
  on ``probe_examples`` examples drawn afresh (uniformly, without replacement)
  from all of ``batches`` pooled, instead of on every batch. Each probe is then
  an unbiased estimate of the trace for the loss averaged over the pooled
  examples (each example weighted equally: the same as the default when the
  batches have equal sizes), with the sampling of examples added to the probes'
  noise — which ``stderr`` and the stopping rules see, so a noisier probe is
  paid for with more probes, but each costs ``probe_examples / examples`` of a
  full one.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` mean loss over the batch.
    params: Flax params pytree (or ``variables``, or an ``nnx.State``).
    batches: sequence of batches (pytrees with a leading batch axis).
    layers: ``None`` (all layers) or regex pattern(s).
    key: ``jax.random`` key for the probes (``None``: ``jax.random.key(0)``).
    stop: ``'ranking'``, ``'rel_tol'`` or ``None``.
    target: probability each settled pair and the whole claimed order must
      reach (``stop='ranking'``; with ``stop=None`` the level the report uses;
      ``None``: 0.9), in (0, 1).
    tie_rtol: relative difference within which neighbours may be called tied (>= 0).
    top_k: ``None`` (the whole ranking) or the size of the top set whose
      membership must be right, 1 to L - 1.
    rel_tol: target relative standard error (``stop='rel_tol'`` only; ``None``: 0.01).
    max_probes: upper bound on the number of probes.
    min_probes: probes drawn before the rule is first checked (not with
      ``stop=None``; ``None``: 32, at most ``max_probes``).
    chunk_size: probes between two checks of the stopping rule (accelerators:
      one call, memory ~ chunk_size x one HVP).
    estimator: ``'all_layers'`` or ``'per_layer'``.
    n_boot: bootstrap resamples of the confidence.
    probe_examples: ``None`` (every probe sees every batch) or the number of
      examples each probe draws from the pooled batches (``all_layers`` only).
    progress: show probes drawn (of ``max_probes``), an ETA and the current
      confidence (stderr).

  Returns:
    ``{layer: TraceEstimate(mean, stderr, num_probes, confidence, group,
    converged, warning)}``. COST: ``num_probes`` full HVPs per batch
    (``all_layers``), or that per layer (``per_layer``).

  Raises:
    ValueError: non-finite parameters, a pattern matching no layer, no data,
      a bad option, or options that contradict each other (named, with what
      is allowed).
  """
  names, batches = _common.setup(loss_fn, params, batches, layers)
  stop, target, rel_tol, min_probes, max_probes = _check_stop_options(
      stop, target, rel_tol, min_probes, max_probes)
  if estimator not in ESTIMATORS:
    raise ValueError(f"Unsupported estimator={estimator!r}; allowed: {list(ESTIMATORS)}.")
  tie_rtol = _common.check_nonneg_float("tie_rtol", tie_rtol)
  if top_k is not None and not (isinstance(top_k, int) and 1 <= top_k < len(names)):
    raise ValueError(f"top_k={top_k!r} is not a size of a top set of the {len(names)} "
                     f"layers; allowed: None or an integer from 1 to {len(names) - 1}.")
  chunk_size = _common.check_positive_int("chunk_size", chunk_size)
  n_boot = _common.check_positive_int("n_boot", n_boot)
  key = jax.random.key(0) if key is None else key
  kernels = layers_lib.get_kernels(params, names)
  if probe_examples is not None:
    probe_examples = _common.check_positive_int("probe_examples", probe_examples)
    if estimator != "all_layers":
      raise ValueError(f"probe_examples={probe_examples} needs estimator='all_layers', got "
                       f"estimator={estimator!r}; allowed: probe_examples=None with it.")
    pool = jax.tree.map(lambda *xs: jnp.concatenate(xs), *batches)
    pooled = jax.tree.leaves(pool)[0].shape[0]
    if probe_examples > pooled:
      raise ValueError(f"probe_examples={probe_examples} exceeds the {pooled} examples of "
                       f"`batches`; allowed: 1 to {pooled}, or None.")

  if estimator == "all_layers":
    quad = _common.cached_jit(_all_layers_quad_fn, loss_fn, tuple(names),
                              jax.random.key_impl(key), probe_examples)

    def draw(chunk):  # (chunk_size, L)
      keys = jax.random.key_data(jax.random.split(jax.random.fold_in(key, chunk), chunk_size))
      if probe_examples is not None:
        return _in_calls(lambda k: quad(params, k, pool), keys, shared=False)
      return _common.batch_mean(_in_calls(lambda k, b: quad(params, k, b), keys, b)
                                for b in batches)
  else:
    quads = {n: _common.cached_jit(_quad_fn, loss_fn, n) for n in names}

    def draw(chunk):
      cols = []
      for index, name in enumerate(names):
        k = kernels[name]
        vs = jax.random.rademacher(jax.random.fold_in(jax.random.fold_in(key, index), chunk),
                                   (chunk_size,) + k.shape, dtype=k.dtype)
        cols.append(_common.batch_mean(
            _in_calls(lambda v, b, name=name, k=k: quads[name](params, k, v, b), vs, b)
            for b in batches))
      return jnp.stack(cols, axis=1)

  samples: list[np.ndarray] = []
  chunk, verdict = 0, None
  bar = Progress(-(-max_probes // chunk_size) * chunk_size, "hutchinson", enabled=progress,
                 unit="probe")
  while True:
    samples.append(np.asarray(jax.device_get(draw(chunk)), dtype=np.float64))
    chunk += 1
    x = np.concatenate(samples)  # (P, L)
    verdict = confidence_lib.verdict(x, tie_rtol=tie_rtol, target=target, top_k=top_k,
                                     n_draws=n_boot)
    bar.update(chunk_size, postfix=f"confidence {verdict.confidence:.3f}")
    if x.shape[0] >= max_probes or (x.shape[0] >= min_probes and
                                    _target_reached(stop, verdict, x, rel_tol)):
      break
  bar.close()
  converged = None if stop is None else _target_reached(stop, verdict, x, rel_tol)
  warning = None
  if converged is False:
    goal = (f"confidence {verdict.confidence:.3f} (target {target}); neither ordered nor "
            f"tied: {confidence_lib.describe_unresolved(names, verdict)}" if stop == "ranking"
            else f"relative stderr above rel_tol={rel_tol}")
    warning = (f"hutchinson_trace stopped at max_probes={max_probes} before its target: "
               f"{goal}. Those layers are reported as tied; raise max_probes or tie_rtol, or "
               f"use top_k.")
    warnings.warn(warning, RuntimeWarning, stacklevel=3)
  count = x.shape[0]
  mean = x.mean(axis=0)
  stderr = (x.std(axis=0, ddof=1) / math.sqrt(count) if count > 1
            else np.full(len(names), math.inf))
  return {n: TraceEstimate(float(mean[i]), float(stderr[i]), int(count), verdict.confidence,
                           int(verdict.groups[i]), converged, warning)
          for i, n in enumerate(names)}


def _target_reached(stop: str | None, verdict: confidence_lib.Verdict, samples: np.ndarray,
                    rel_tol: float) -> bool:
  if stop == "ranking":
    return verdict.settled
  if stop == "rel_tol":
    count = samples.shape[0]
    if count < 2:
      return False
    stderr = samples.std(axis=0, ddof=1) / math.sqrt(count)
    return bool(np.all(stderr <= rel_tol * np.abs(samples.mean(axis=0))))
  return False


def _check_stop_options(stop, target, rel_tol, min_probes, max_probes):
  """The stopping options with their defaults, or a ValueError naming a contradiction."""
  if stop not in STOP_RULES:
    raise ValueError(f"Unsupported stop={stop!r}; allowed: {list(STOP_RULES)}.")
  if target is not None and stop == "rel_tol":
    raise ValueError(f"target={target} is the confidence stop='ranking' seeks (and stop=None "
                     f"reports at), but stop={stop!r}; allowed: stop='ranking' or None with "
                     f"it, or no target.")
  if rel_tol is not None and stop != "rel_tol":
    raise ValueError(f"rel_tol={rel_tol} is the tolerance stop='rel_tol' seeks, but "
                     f"stop={stop!r}; allowed: stop='rel_tol' with it, or no rel_tol.")
  if min_probes is not None and stop is None:
    raise ValueError(f"min_probes={min_probes} has no effect with stop=None, which draws "
                     f"exactly max_probes probes; allowed: min_probes=None with it.")
  max_probes = _common.check_positive_int("max_probes", max_probes)
  if min_probes is None:
    min_probes = min(32, max_probes)
  min_probes = _common.check_positive_int("min_probes", min_probes)
  if min_probes > max_probes:
    raise ValueError(f"min_probes={min_probes} exceeds max_probes={max_probes}; allowed: "
                     f"min_probes <= max_probes.")
  target = 0.9 if target is None else _common.check_nonneg_float("target", target)
  if not 0 < target < 1:
    raise ValueError(f"target={target!r} is not a probability the rule can reach; "
                     f"allowed: 0 < target < 1.")
  rel_tol = 1e-2 if rel_tol is None else _common.check_nonneg_float("rel_tol", rel_tol)
  return stop, target, rel_tol, min_probes, max_probes


@_common.accepts_nnx_state
def hessian_trace(loss_fn: _common.LossFn, params: _common.Params, batches: Any, *,
                  layers: Any = None, key: jax.Array | None = None, progress: bool = False,
                  **options) -> _common.Scores:
  """Trace of each layer's Hessian block (Hutchinson), i.e. the sum of its eigenvalues.

  See :func:`hutchinson_trace` for the estimator, its stopping rules and
  ``options`` (``stop``, ``target``, ``tie_rtol``, ``top_k``, ``rel_tol``, ``max_probes``,
  ``min_probes``, ``chunk_size``, ``estimator``); this returns only the means.

  Returns:
    ``{layer: tr(H)}`` (units: loss / weight^2).

  Raises:
    ValueError: non-finite parameters, a pattern matching no layer, no data,
      or a bad option.
  """
  est = hutchinson_trace(loss_fn, params, batches, layers=layers, key=key, progress=progress,
                         **options)
  return {n: e.mean for n, e in est.items()}


@jax.tree_util.register_pytree_node_class
class _Packed:
  """Every layer's vector in one flat ``(N,)`` array, layer after layer in ``names`` order.

  ``segments`` ``(N,)`` int32 (the only array; a pytree leaf): the layer index
  of each entry. ``sizes``, ``shapes``, ``dtypes``: each layer's entry count,
  kernel shape and dtype (static). The flat vectors have the kernels' common
  dtype ``dtype``.
  """

  def __init__(self, names, sizes, shapes, dtypes, segments):
    self.names, self.sizes, self.shapes, self.dtypes = names, sizes, shapes, dtypes
    self.segments = segments
    self.dtype = jnp.result_type(*dtypes)

  @classmethod
  def of(cls, kernels: Mapping[str, jax.Array], names: Sequence[str]) -> _Packed:
    sizes = tuple(int(np.prod(kernels[n].shape)) for n in names)
    return cls(tuple(names), sizes, tuple(tuple(kernels[n].shape) for n in names),
               tuple(jnp.dtype(kernels[n].dtype) for n in names),
               jnp.asarray(np.repeat(np.arange(len(names), dtype=np.int32), sizes)))

  def tree_flatten(self):
    return (self.segments,), (self.names, self.sizes, self.shapes, self.dtypes)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*aux, *children)

  def sums(self, x: jax.Array) -> jax.Array:
    """``(..., N) -> (..., L)``: the sum of each layer's entries."""
    out = jax.ops.segment_sum(jnp.moveaxis(x, -1, 0), self.segments,
                              num_segments=len(self.names), indices_are_sorted=True)
    return jnp.moveaxis(out, 0, -1)

  def spread(self, per_layer: jax.Array) -> jax.Array:
    """``(..., L) -> (..., N)``: each layer's value on each of its entries."""
    return jnp.take(per_layer, self.segments, axis=-1)

  def unpack(self, flat: jax.Array) -> dict[str, jax.Array]:
    """``(N,) -> {name: kernel-shaped array}`` in each kernel's dtype."""
    out, offset = {}, 0
    for name, size, shape, dtype in zip(self.names, self.sizes, self.shapes, self.dtypes):
      out[name] = flat[offset:offset + size].reshape(shape).astype(dtype)
      offset += size
    return out

  def pack(self, tree: Mapping[str, jax.Array]) -> jax.Array:
    """``{name: kernel-shaped array} -> (N,)``."""
    return jnp.concatenate([jnp.ravel(tree[n]).astype(self.dtype) for n in self.names])


@functools.partial(jax.jit, static_argnums=2)
def _lanczos_start(packed, key, m):
  """Normalised start vectors of every layer (one normal draw over all ``N`` entries) and an
  ``(m + 1, N)`` basis holding them in row 0."""
  v0 = jax.random.normal(key, packed.segments.shape, packed.dtype)
  v = v0 / packed.spread(jnp.sqrt(packed.sums(v0 * v0)))
  basis = jnp.zeros((m + 1,) + v.shape, v.dtype).at[0].set(v)
  return v, jnp.zeros_like(v), jnp.zeros(len(packed.names), v.dtype), basis


@jax.jit
def _lanczos_step(packed, basis, j, v, v_prev, beta, w, running):
  """Step ``j`` of every layer's Lanczos, given ``w = H v`` (each layer's block times its own
  vector), with full reorthogonalisation against the basis (twice is enough).

  Per layer (``(L,)``): ``alpha = w.v``, ``beta_next = ||w'||``; the vectors and
  basis ``(m + 1, N)`` change only on the entries of ``running`` layers. One
  program for every layer (segment sums over the flat entries), whatever their
  number and sizes.
  """
  alpha = packed.sums(w * v)
  w = w - packed.spread(alpha) * v - packed.spread(beta) * v_prev
  for _ in range(2):
    w = w - jnp.sum(basis * packed.spread(packed.sums(basis * w)), axis=0)
  beta_next = jnp.sqrt(packed.sums(w * w))
  v_next = w / packed.spread(jnp.where(beta_next > 0, beta_next, 1.0))
  keep = packed.spread(running)
  v_next = jnp.where(keep, v_next, v)
  basis = jax.lax.dynamic_update_index_in_dim(
      basis, jnp.where(keep, v_next, basis[j + 1]), j + 1, axis=0)
  return alpha, beta_next, jnp.where(keep, v, v_prev), v_next, jnp.where(running, beta_next,
                                                                          beta), basis


@jax.jit
def _one_layer_tangent(packed, index, v):
  """Kernel-shaped tangents: layer ``index``'s part of the flat ``v``, zero elsewhere."""
  return packed.unpack(jnp.where(packed.segments == index, v, 0))


@jax.jit
def _place(packed, index, w, hv):
  """``w`` with layer ``index``'s entries taken from the kernel-shaped products ``hv``."""
  return jnp.where(packed.segments == index, packed.pack(hv), w)


class _Lanczos:
  """Lanczos with full reorthogonalisation for every layer's block at once, stepped from outside.

  The device half of a step is one program for every layer (:func:`_lanczos_step`
  on the flat vectors of :class:`_Packed`); :meth:`record` takes each layer's
  ``alpha``/``beta`` and marks it done once converged: the residual bound
  ``beta_j * |s_j|`` of its top Ritz pair is ``<= tol * |theta|`` (an eigenvalue
  lies within ``tol * |theta|`` of ``theta``), its Krylov space is invariant,
  or ``m = min(max_iter, n)`` steps were taken (with n steps the result is exact
  up to rounding). Memory: an ``(max m + 1, N)`` basis over all ``N`` entries.
  """

  def __init__(self, packed: _Packed, start: tuple, ms: Sequence[int], tol: float):
    """``start``: ``(v, v_prev, beta, basis)`` from :func:`_lanczos_start`."""
    self.packed, self.ms, self.tol = packed, tuple(ms), tol
    self.vector, self._v_prev, self._beta, self._basis = start
    count = len(self.ms)
    self.alphas: list[list[float]] = [[] for _ in range(count)]
    self.betas: list[list[float]] = [[] for _ in range(count)]
    self.theta = np.zeros(count)
    self.done = np.zeros(count, bool)

  def step(self, w: jax.Array) -> None:
    """One step of every running layer, given ``w``: ``H_ll v_l`` on each running layer's entries."""
    j = len(self.alphas[int(np.flatnonzero(~self.done)[0])])
    alpha, beta_next, self._v_prev, self.vector, self._beta, self._basis = _lanczos_step(
        self.packed, self._basis, np.int32(j), self.vector, self._v_prev, self._beta, w,
        jnp.asarray(~self.done))
    alpha, beta_next = (np.asarray(x, np.float64) for x in jax.device_get((alpha, beta_next)))
    for i in np.flatnonzero(~self.done):
      self.alphas[i].append(float(alpha[i]))
      if j == 0:
        evals, evecs = np.array([alpha[i]]), np.ones((1, 1))
      else:
        evals, evecs = scipy.linalg.eigh_tridiagonal(np.array(self.alphas[i]),
                                                     np.array(self.betas[i]))
      top = int(np.argmax(evals))
      self.theta[i] = float(evals[top])
      residual = beta_next[i] * abs(float(evecs[-1, top]))
      if (residual <= self.tol * abs(self.theta[i])
          or beta_next[i] <= 1e-7 * max(abs(self.theta[i]), 1e-30) or j + 1 >= self.ms[i]):
        self.done[i] = True
      else:
        self.betas[i].append(float(beta_next[i]))


@jax.jit
def _power_step(packed, v, w, running):
  """Every layer's Rayleigh quotient ``v.w`` and ``||w||`` ``(L,)``, and the next vectors
  ``w / ||w||`` on the entries of ``running`` layers with ``||w|| > 0``."""
  theta, norm = packed.sums(v * w), jnp.sqrt(packed.sums(w * w))
  keep = packed.spread(running & (norm > 0))
  return theta, norm, jnp.where(keep, w / packed.spread(jnp.where(norm > 0, norm, 1.0)), v)


class _Power:
  """Power iteration (Rayleigh quotient) of every layer's block at once, stepped from outside;
  see :func:`top_eigenvalue`."""

  def __init__(self, packed: _Packed, v0: jax.Array, max_iter: int, tol: float):
    """``v0``: every layer's normalised start vector, flat (:func:`_lanczos_start`)."""
    self.packed, self.vector, self.max_iter, self.tol = packed, v0, max_iter, tol
    count = len(packed.names)
    self.theta = np.full(count, np.nan)
    self.iters = 0
    self.done = np.zeros(count, bool)

  def step(self, w: jax.Array) -> None:
    """One step of every running layer, given ``w``: ``H_ll v_l`` on each running layer's entries."""
    self.iters += 1
    running = ~self.done
    new, norm, self.vector = _power_step(self.packed, self.vector, w, jnp.asarray(running))
    new, norm = (np.asarray(x, np.float64) for x in jax.device_get((new, norm)))
    for i in np.flatnonzero(running):
      if norm[i] == 0.0:
        self.theta[i], self.done[i] = 0.0, True
        continue
      converged = not np.isnan(self.theta[i]) and abs(new[i] - self.theta[i]) <= self.tol * abs(
          new[i])
      self.theta[i] = new[i]
      self.done[i] = converged or self.iters >= self.max_iter


@_common.accepts_nnx_state
def top_eigenvalue(loss_fn: _common.LossFn, params: _common.Params, batches: Any, *,
                   layers: Any = None, key: jax.Array | None = None,
                   method: str = "lanczos", max_iter: int = 100,
                   tol: float = 1e-3, progress: bool = False) -> _common.Scores:
  """Top eigenvalue of each layer's Hessian block (local sharpness along that layer).

  ``method='lanczos'`` (default): the largest *algebraic* eigenvalue, by
  Lanczos with full reorthogonalisation; stops when the Ritz residual bound is
  ``<= tol * |lambda|`` (so an eigenvalue of H lies within that distance), or
  after ``min(max_iter, n)`` steps (exact up to rounding when n <= max_iter).
  ``method='power'``: power iteration, which returns the eigenvalue of largest
  *magnitude* (signed; equal to the largest one when H is PSD, e.g. the last
  layer under cross-entropy); stops when successive Rayleigh quotients differ by
  ``<= tol * |lambda|``; converges slowly when the top two eigenvalues are close.

  All layers iterate together: each iteration multiplies every still-running
  layer's vector by its block, ``H_ll v_l``, taken from a full Hessian-vector
  product with ``v`` zero outside the layer (one compiled program for every
  layer, :func:`_common.kernels_hvp`), then steps every layer's solver in one
  program on the layers' vectors laid end to end (segment sums: the same
  program whatever the number and sizes of the layers); each layer stops on its
  own tolerance and is skipped from then on.

  Args:
    loss_fn, params, batches, layers: the criterion signature (:mod:`safer_jax.criteria`).
    key: ``jax.random`` key for the start vectors (``None``: ``key(0)``): one
      standard normal draw over every selected kernel's entries (in ``layers``
      order), each layer's part normalised.
    method: ``'lanczos'`` or ``'power'``.
    max_iter: maximum number of HVPs per layer.
    tol: relative tolerance (see above).
    progress: show iterations (of at most ``max_iter``), an ETA and the layers
      still running (stderr).

  Returns:
    ``{layer: lambda}`` (units: loss / weight^2). COST: per iteration one
    full HVP per running layer, per batch; at most ``max_iter`` iterations. A
    first call compiles the HVP once for all layers, plus small programs of
    every layer at once: the start, the tangent, the placement of a product and
    the step.

  Raises:
    ValueError: bad ``method``, non-finite parameters, a pattern matching no
      layer, no data.
  """
  if method not in ("lanczos", "power"):
    raise ValueError(f"Unsupported method={method!r}; allowed: ['lanczos', 'power'].")
  names, batches = _common.setup(loss_fn, params, batches, layers)
  max_iter = _common.check_positive_int("max_iter", max_iter)
  tol = _common.check_nonneg_float("tol", tol)
  key = jax.random.key(0) if key is None else key
  hvp = _common.cached_jit(_common.kernels_hvp, loss_fn, tuple(names))
  kernels = layers_lib.get_kernels(params, names)
  # The start vectors go where the parameters are: the products (and so every later vector)
  # come out committed to the parameters' device, and a first vector that is not would make
  # jit compile the product, and the Lanczos step, a second time.
  committed = [x for x in jax.tree.leaves(params) if isinstance(x, jax.Array) and x.committed]
  place = ((lambda x: jax.device_put(x, committed[0].sharding)) if committed
           else (lambda x: x))
  packed = place(_Packed.of(kernels, names))

  def products(v, running):  # flat: H_ll v_l on the entries of every running layer l
    w = v
    for i in np.flatnonzero(running):
      tangent = _one_layer_tangent(packed, np.int32(i), v)
      w = _place(packed, np.int32(i), w,
                 _common.batch_mean([hvp(params, tangent, b) for b in batches]))
    return w

  ms = [min(max_iter, size) for size in packed.sizes]
  solver = (_Lanczos(packed, place(_lanczos_start(packed, key, max(ms))), ms, tol)
            if method == "lanczos" else
            _Power(packed, place(_lanczos_start(packed, key, 0)[0]), max_iter, tol))
  bar = Progress(max_iter, "top eigenvalue", enabled=progress, unit="iteration")
  while not solver.done.all():
    solver.step(products(solver.vector, ~solver.done))
    bar.update(1, postfix=f"{int((~solver.done).sum())} of {len(names)} layers still running")
  bar.close()
  return {n: float(solver.theta[i]) for i, n in enumerate(names)}


@_common.accepts_nnx_state
def hawq_v2(loss_fn: _common.LossFn, params: _common.Params, batches: Any, *,
            layers: Any = None, key: jax.Array | None = None, bits: int = 4,
            progress: bool = False, **options) -> _common.Scores:
  """HAWQ-v2 sensitivity: mean Hessian eigenvalue times squared quantization error.

  score = tr(H) / n * ||Q_b(W) - W||_2^2 (Dong et al. 2020), the second-order
  loss increase of quantizing the layer to ``bits`` bits when the error is
  spread isotropically. ``Q_b`` is ``safer_jax.core.perturb.quantize``; tr(H) is
  the Hutchinson estimate (see ``hutchinson_trace``).

  Args:
    loss_fn, params, batches, layers: the criterion signature (:mod:`safer_jax.criteria`).
    key: probe key (``None``: ``key(0)``).
    bits: bit width, an integer in [1, 16].
    **options: :func:`hutchinson_trace` options (``max_probes``, ``stop``, ...).

  Returns:
    ``{layer: score}`` (units: loss). COST: that of :func:`hutchinson_trace`,
    plus one quantization per layer.

  Raises:
    ValueError: bad ``bits``, non-finite parameters, a pattern matching no
      layer, no data.
  """
  bits = _common.check_bits(bits)
  est = hutchinson_trace(loss_fn, params, batches, layers=layers, key=key, progress=progress,
                         **options)
  errors = quant_sq_errors(layers_lib.get_kernels(params, list(est)), bits)
  return {name: e.mean / layers_lib.get_kernel(params, name).size * _common.to_float(errors[name])
          for name, e in est.items()}
