"""Shared plumbing for the criteria: argument checks, batch handling, gradients.

Private module. Every public criterion has the signature::

  scores = criterion(loss_fn, params, batches, *, layers=None, key=None, **opts)

and returns ``{layer_path: float}`` (higher = more sensitive / important).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from safer_jax.core import caches
from safer_jax.core import distributed
from safer_jax.core import layers as layers_lib
from safer_jax.core import wrapping
from safer_jax.core.errors import check_bits, check_nonneg_float, check_positive_int  # noqa: F401

Params = Mapping[str, Any]
Batch = Any
LossFn = Callable[[Params, Batch], jax.Array]
Scores = dict[str, float]

def resolve_layers(params: Params, layers: str | Sequence[str] | None) -> list[str]:
  """Layer paths selected by the regex ``layers`` (``None``: all layers)."""
  return layers_lib.select_layers(params, layers)


def as_batch_list(batches: Iterable[Batch] | Batch | None) -> list[Batch]:
  """Materialises ``batches`` as a list (criteria may pass over them several times).

  A single batch given as a ``Mapping`` (e.g. ``{'image': ..., 'label': ...}``)
  is accepted and wrapped in a list. With several devices each batch is split
  along its leading axis over the ``'data'`` mesh (see :func:`shard_batches`).

  Raises:
    ValueError: no batches, or a batch with no examples (an array with a
      leading axis of 0: its mean loss would be NaN), naming it.
  """
  if batches is None:
    raise ValueError(
        "This criterion needs data: `batches` must be a non-empty sequence of batches.")
  out = [batches] if isinstance(batches, Mapping) else list(batches)
  if not out:
    raise ValueError("`batches` is empty; this criterion needs at least one batch.")
  for i, batch in enumerate(out):
    shapes = [tuple(np.shape(x)) for x in jax.tree.leaves(batch)]
    if any(shape and shape[0] == 0 for shape in shapes):
      raise ValueError(f"batch {i} holds no examples (leaf shapes {shapes}); every batch needs at "
                       f"least one example along its leading axis (a mean over none is NaN).")
  return shard_batches(out)


def shard_batches(batches: Sequence[Batch]) -> list[Batch]:
  """Each batch sharded along the data axis (``distributed.shard_batch``) when enabled.

  Leaves of shape ``(B, ...)`` with ``B`` a multiple of ``jax.device_count()``
  are split over the devices, the others replicated. Idempotent. On one device
  (or inside ``distributed.use_data_sharding(False)``) the batches are returned
  unchanged, so single-device numbers do not change.
  """
  if not distributed.data_sharding_enabled():
    return list(batches)
  mesh = distributed.data_mesh()
  return [distributed.shard_batch(b, mesh) for b in batches]


def accepts_nnx_state(criterion: Callable) -> Callable:
  """Lets ``criterion(loss_fn, params, ...)`` take an ``nnx.State`` as ``params``.

  The state is replaced by its pure dict (layer paths as the user's state
  shows them, ``nnx.List`` indices as strings) and ``loss_fn`` by a function of
  that dict that rebuilds the state before calling the user's ``loss_fn``
  (:class:`safer_jax.core.wrapping.StateLossFn`): the numbers equal those of the
  pure-dict path, and scores are keyed by those layer paths.
  """

  @functools.wraps(criterion)
  def wrapper(loss_fn, params, *args, **kwargs):
    loss_fn, params = wrapping.pure_params_and_loss(loss_fn, params)
    return criterion(loss_fn, params, *args, **kwargs)

  return wrapper


def setup(loss_fn: LossFn | None, params: Params, batches: Any,
          layers: Any) -> tuple[list[str], list[Batch]]:
  """Common checks of data-dependent criteria: returns (layer names, batch list)."""
  if loss_fn is None or not callable(loss_fn):
    raise ValueError("This criterion needs a `loss_fn(params, batch) -> scalar`.")
  names = resolve_layers(params, layers)
  layers_lib.check_finite(params)  # data-dependent criteria evaluate the whole network
  return names, as_batch_list(batches)


def setup_data_free(params: Params, layers: Any) -> list[str]:
  names = resolve_layers(params, layers)
  layers_lib.check_finite(layers_lib.get_kernels(params, names), "Kernel of layer")
  return names




def compiler_options() -> dict[str, Any] | None:
  """XLA options of the criteria's compiled programs: on XLA:CPU, the classic fusion emitters.

  ``xla_cpu_use_fusion_emitters=False`` compiled the all-layer Hessian-vector
  product of the zoo mobilenet_v2 in 4.2-4.7 s against 6.0-6.3 s (three
  alternating runs each, jax 0.10.2, 2-core AMD EPYC), running as fast or
  faster (3.7-5.0 against 4.0-5.7 ms) with identical results. Elsewhere: None
  (the option is XLA:CPU's).
  """
  return {"xla_cpu_use_fusion_emitters": False} if jax.default_backend() == "cpu" else None


class _DataParallel:
  """A jitted function whose array arguments meet on the ``'data'`` mesh.

  When data sharding is enabled, arguments not already on the mesh (weights,
  kernels, probe vectors) are replicated before the call, so they combine with
  the sharded batches and jit's sharding propagation runs the per-example work
  data-parallel. Otherwise the call goes straight to the jitted function.

  A :func:`per_example_sum` function ``f(*args, batch)`` instead runs under
  ``jax.shard_map``: each device sums over its own examples and the partial
  sums are ``psum``-ed. (Sharding propagation miscompiles a ``vmap``-ed
  per-example convolution gradient on a batch-sharded input: XLA CPU, jax
  0.10.2, every example outside the first shard comes out wrong.)
  """

  def __init__(self, body: Callable, example_sum: bool = False):
    self.body = body
    self.fn = jax.jit(body, compiler_options=compiler_options())
    self.example_sum = example_sum
    self._mapped: tuple[Any, Callable] | None = None

  def __call__(self, *args):
    if not distributed.data_sharding_enabled():
      return self.fn(*args)
    mesh = distributed.data_mesh()
    args = distributed.place_replicated(args, mesh)
    if self.example_sum and _split_over_data(args[-1]):
      return self._shard_mapped(mesh)(*args)
    return self.fn(*args)

  def _shard_mapped(self, mesh: jax.sharding.Mesh) -> Callable:
    if self._mapped is None or self._mapped[0] != mesh:
      spec = jax.sharding.PartitionSpec
      body = self.body

      def local_sum(rest, batch):
        # Mark the replicated arguments device-varying: otherwise the gradient w.r.t. them
        # would be psum-ed over the devices inside `body`, before any per-example squaring.
        rest = jax.lax.pcast(rest, distributed.DATA_AXIS, to="varying")
        return jax.lax.psum(body(*rest, batch), distributed.DATA_AXIS)

      mapped = jax.jit(jax.shard_map(local_sum, mesh=mesh, out_specs=spec(),
                                     in_specs=(spec(), spec(distributed.DATA_AXIS))))
      self._mapped = (mesh, lambda *args: mapped(args[:-1], args[-1]))
    return self._mapped[1]


def _split_over_data(batch: Batch) -> bool:
  """Whether every leaf of ``batch`` is split along its leading axis over ``'data'``."""
  leaves = jax.tree.leaves(batch)
  spec = jax.sharding.PartitionSpec(distributed.DATA_AXIS)
  return bool(leaves) and all(
      isinstance(x, jax.Array) and isinstance(x.sharding, jax.sharding.NamedSharding)
      and x.sharding.spec == spec for x in leaves)


def per_example_sum(builder: Callable[..., Callable]) -> Callable[..., Callable]:
  """Marks a :func:`cached_jit` builder whose function is a sum over a batch's examples.

  The built function must be ``f(*args, batch) -> pytree`` equal to the sum
  over the examples of ``batch`` (its last argument) of terms that depend on
  one example each. With data sharding it then runs under ``jax.shard_map``
  (local sums, then ``psum``) instead of sharding propagation.
  """
  builder.per_example_sum = True
  return builder


def _is_per_example_sum(builder: Callable[..., Callable]) -> bool:
  return bool(getattr(builder, "per_example_sum", False))


_CACHE_ATTR = "_safer_jax_compiled"  # where a loss function keeps its compiled criteria
_generation = [0]  # bumped by clear_compiled(): older entries are ignored


def cached_jit(builder: Callable[..., Callable], loss_fn: LossFn, *static: Any) -> Callable:
  """``jax.jit(builder(loss_fn, *static))``, memoised on ``(builder, loss_fn, static)``.

  Criteria called one after the other with the same ``loss_fn`` (e.g. by
  ``compute_all``) then share compiled functions. The cache lives *on*
  ``loss_fn`` (an attribute), so it goes away with the loss function: nothing
  module-level keeps a user's closures alive. A ``loss_fn`` that takes no
  attributes (a bound method, a builtin) or an unhashable option is compiled
  afresh each call. With several devices the returned function first
  replicates its array arguments that are not on the data mesh (see
  ``_DataParallel``); call it positionally.
  """
  key = (builder, static)
  try:
    cache = loss_fn.__dict__.get(_CACHE_ATTR)
    if cache is None or cache[0] != _generation[0]:
      cache = (_generation[0], {})
      setattr(loss_fn, _CACHE_ATTR, cache)
    fn = cache[1].get(key)
    if fn is None:
      fn = cache[1][key] = _DataParallel(builder(loss_fn, *static), _is_per_example_sum(builder))
    return fn
  except (AttributeError, TypeError):  # no __dict__ / no attributes, or an unhashable option
    return _DataParallel(builder(loss_fn, *static), _is_per_example_sum(builder))


def _grad_step(loss_fn: LossFn, names: tuple[str, ...]) -> Callable:
  def step(params, batch):
    def f(kernels):
      return loss_fn(layers_lib.replace_kernels(params, kernels), batch)
    return jax.value_and_grad(f)(layers_lib.get_kernels(params, names))
  return step


def batch_mean(values: Sequence[Any]) -> Any:
  """The mean of per-batch results (arrays or pytrees of them), each batch weighted equally.

  One value is returned as it is (``x / 1 == x`` exactly). Several are summed from the
  first (not from a Python ``0``) and divided in one compiled program per structure: eager
  ``add`` and ``divide`` compiled one program per shape each (a per-layer criterion: two
  or more per layer) on a first run.
  """
  values = list(values)
  if len(values) == 1:
    return values[0]
  return _mean_of(values)


@jax.jit
def _mean_of(values: list[Any]) -> Any:
  total = functools.reduce(lambda a, b: jax.tree.map(jnp.add, a, b), values)
  return jax.tree.map(lambda x: x / len(values), total)


def mean_value_and_grads(loss_fn: LossFn, params: Params, batches: Sequence[Batch],
                         names: Sequence[str]) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Loss and gradient w.r.t. the selected kernels, averaged over ``batches``.

  Each batch is weighted equally (``loss_fn`` is a mean over its batch).
  Batches are sharded over the data axis when several devices are present.
  COST: one forward + one backward pass per batch.
  """
  batches = shard_batches(batches)
  step = cached_jit(_grad_step, loss_fn, tuple(names))
  total_loss, total_grad = None, None
  for batch in batches:
    loss, grads = step(params, batch)
    if total_grad is None:
      total_loss, total_grad = loss, grads
    else:
      total_loss = total_loss + loss
      total_grad = jax.tree.map(jnp.add, total_grad, grads)
  n = len(batches)
  return total_loss / n, jax.tree.map(lambda g: g / n, total_grad)


def _identity(loss_fn: LossFn) -> LossFn:
  return loss_fn


def mean_loss(loss_fn: LossFn, params: Params, batches: Sequence[Batch]) -> jax.Array:
  """Loss averaged over ``batches`` (one forward pass per batch; sharded on several devices)."""
  batches = shard_batches(batches)
  f = cached_jit(_identity, loss_fn)
  return batch_mean(f(params, b) for b in batches)


def layer_loss(loss_fn: LossFn, name: str) -> Callable[[Params, jax.Array, Batch], jax.Array]:
  """``f(params, kernel, batch)``: the loss as a function of one layer's kernel."""

  def f(params, kernel, batch):
    return loss_fn(layers_lib.replace_kernel(params, name, kernel), batch)

  return f


def at_one_layer(names: Sequence[str], index: jax.Array, moved: Mapping[str, jax.Array],
                 rest: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """``{name: moved[name] if name is names[index] else rest[name]}``, ``index`` a traced int.

  The layer is picked by an input, not by its name, so one compiled program serves
  every layer. Meant for the small programs that build the point (or tangent) of
  one layer before :func:`kernels_value_and_grad` / :func:`kernels_hvp`: inside
  those, the selection made XLA:CPU compile the zoo mobilenet_v2's gradient 40%
  longer (12.2 s against 8.6 s on a loaded 2-core CPU).
  """
  return {n: jnp.where(index == i, moved[n], rest[n]) for i, n in enumerate(names)}


def _kernels_loss(loss_fn: LossFn, params: Params, batch: Batch) -> Callable:
  return lambda kernels: loss_fn(layers_lib.replace_kernels(params, kernels), batch)


def kernels_value_and_grad(loss_fn: LossFn, names: Sequence[str]) -> Callable:
  """``f(params, kernels, batch) -> (loss, {layer: dL/dW})``, the kernels of ``names`` replaced.

  A :func:`cached_jit` builder. The per-layer criteria (integrated gradients,
  corruption PGA) evaluate every layer with this one program, the point built
  by :func:`at_one_layer` (only that layer's kernel moved) and that layer's entry
  of the gradient used: one compilation for every layer (one per layer cost
  20-40 s on a first run of the zoo mobilenet_v2), but each call differentiates
  the whole network, where a per-layer program differentiated only the network
  from that layer on.
  """
  del names  # part of the cache key: the gradient's structure

  def f(params, kernels, batch):
    return jax.value_and_grad(_kernels_loss(loss_fn, params, batch))(kernels)

  return f


def kernels_hvp(loss_fn: LossFn, names: Sequence[str]) -> Callable:
  """``f(params, tangent, batch) -> H v``, ``H`` the Hessian w.r.t. the kernels of ``names``.

  A :func:`cached_jit` builder (forward-over-reverse, at the kernels of ``params``).
  With ``tangent`` zero outside layer ``l`` (:func:`at_one_layer`), entry ``l`` of
  the result is ``H_ll v_l``, the product with the layer's own block: one compiled
  program for every layer, each call a full Hessian-vector product.
  """
  names = tuple(names)

  def f(params, tangent, batch):
    grad = jax.grad(_kernels_loss(loss_fn, params, batch))
    return jax.jvp(grad, (layers_lib.get_kernels(params, names),), (tangent,))[1]

  return f


def replicated(tree: Any) -> Any:
  """``tree``'s arrays replicated on the ``'data'`` mesh when data sharding is on, else ``tree``.

  For state that meets the data-parallel calls' outputs (replicated) in small
  plain-jitted programs (a sum over nodes, an ascent step): all of it on one mesh.
  """
  if not distributed.data_sharding_enabled():
    return tree
  return distributed.place_replicated(tree, distributed.data_mesh())


def zeros_like(x: jax.Array) -> jax.Array:
  """Zeros of ``x``'s shape and dtype, placed like ``x``, without compiling anything.

  (``jnp.zeros_like`` compiles one ``broadcast_in_dim`` program per shape on a first run:
  a per-layer criterion, one per layer.)
  """
  zeros = np.zeros(x.shape, x.dtype)
  return jax.device_put(zeros, x.sharding) if isinstance(x, jax.Array) else jnp.asarray(zeros)


def to_float(x: Any) -> float:
  return float(jax.device_get(x))


@caches.register
def clear_compiled() -> None:
  """Forgets the memoised compiled functions of :func:`cached_jit` (e.g. between models).

  One of the caches :func:`safer_jax.clear_caches` empties.
  """
  _generation[0] += 1
