"""Data parallelism over every device, on one host or many (``jax.sharding`` + ``jax.distributed``).

Evaluation (:func:`safer_jax.training.train.evaluate`) and the data-dependent criteria
split each batch along its leading (example) axis over a 1-D ``'data'`` mesh of
*all* devices, ``jax.devices()``; weights, kernels and probe vectors are
replicated. ``jax.jit`` then propagates the sharding: every device runs the
forward/backward pass of its slice of the batch and XLA inserts the reductions
(sums over examples, mean losses, gradients). The result is the single-device
one up to float reduction order.

Multi-host (multi-controller JAX): call :func:`initialize` (``jax.distributed``)
in every process before anything touches a device; ``jax.devices()`` is then
the global device list, so the mesh spans every host and each jitted call runs
SPMD across processes. Every process must make the same calls in the same
order. Data: **every process holds the full batch** (the datasets are loaded
identically everywhere) and :func:`shard_batch` builds the global array from
it with ``jax.make_array_from_callback``, each process copying only the rows
its own devices hold (no cross-host transfer and no equality check). Results
of the reductions are replicated, so every process reads the same numbers; only
:func:`is_primary` (process 0) should write files. The sensitivity sweep
(:mod:`safer_jax.measure.sweep`) spreads its perturbed copies over a ``'copies'`` mesh
of the same devices; zoo models are trained or restored by process 0 and sent
to the others with :func:`broadcast_from_primary` after a :func:`wait_for_all`.

On a single device nothing is sharded and the numbers are bit-identical to
plain ``jax.jit``. :func:`use_data_sharding` turns the data axis off (e.g. to
compare against the single-device result).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"

_data_sharding = contextvars.ContextVar("safer_jax_data_sharding", default=True)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Starts multi-controller JAX (``jax.distributed.initialize``) in this process.

  Must run before anything touches a device. With no arguments the cluster is
  auto-detected (Cloud TPU, SLURM, Open MPI, ...); give all three for a manual
  setup. On CPU the cross-process collectives use gloo (JAX's default).

  Args:
    coordinator_address: ``'host:port'`` of process 0's coordinator service.
    num_processes: total number of processes (>= 1).
    process_id: this process's index in ``[0, num_processes)``.

  Raises:
    ValueError: a bad ``num_processes`` / ``process_id``.
  """
  if num_processes is not None and (isinstance(num_processes, bool) or
                                    not isinstance(num_processes, (int, np.integer)) or
                                    num_processes < 1):
    raise ValueError(f"`num_processes` must be a positive integer, got {num_processes!r}.")
  if process_id is not None:
    if isinstance(process_id, bool) or not isinstance(process_id, (int, np.integer)):
      raise ValueError(f"`process_id` must be an integer, got {process_id!r}.")
    if process_id < 0 or (num_processes is not None and process_id >= num_processes):
      raise ValueError(f"`process_id` must be in [0, num_processes={num_processes}), "
                       f"got {process_id!r}.")
  kwargs = {k: v for k, v in (("coordinator_address", coordinator_address),
                              ("num_processes", num_processes),
                              ("process_id", process_id)) if v is not None}
  jax.distributed.initialize(**kwargs)


def is_primary() -> bool:
  """Whether this is process 0, the one that writes result files."""
  return jax.process_index() == 0


def data_mesh() -> Mesh:
  """A 1-D mesh with axis ``'data'`` over every device of every process (``jax.devices()``)."""
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


@contextlib.contextmanager
def use_data_sharding(enabled: bool) -> Iterator[None]:
  """Context manager turning data sharding of evaluation and criteria on or off.

  Example: ``with use_data_sharding(False): scores = criteria.fisher(...)``
  computes on one device. The switch is context-local (:mod:`contextvars`): it
  holds in this thread (and asyncio task) only; other threads keep sharding on.
  """
  token = _data_sharding.set(bool(enabled))
  try:
    yield
  finally:
    _data_sharding.reset(token)


def data_sharding_enabled() -> bool:
  """True when batches are sharded: more than one device and not switched off."""
  return _data_sharding.get() and jax.device_count() > 1


def num_data_shards() -> int:
  """Number of slices a batch is split into: ``jax.device_count()`` when enabled, else 1."""
  return jax.device_count() if data_sharding_enabled() else 1


def _canonical_host(x: Any) -> np.ndarray:
  host = np.asarray(jax.device_get(x))
  return host.astype(jax.dtypes.canonicalize_dtype(host.dtype), copy=False)


def _put(x: Any, sharding: NamedSharding) -> jax.Array:
  """``x`` as a global array with ``sharding``; multi-host: from this process's full copy."""
  if sharding.is_fully_addressable:
    return jax.device_put(x, sharding)
  if isinstance(x, jax.Array) and (not x.is_fully_addressable or x.sharding == sharding):
    return jax.device_put(x, sharding)  # Already global: reshard on device.
  if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return jax.device_put(x, sharding)  # Key arrays cannot go through NumPy.
  host = _canonical_host(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _is_array(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray)) and not isinstance(x, jax.core.Tracer)


def replicate(tree: Any, mesh: Mesh | None = None) -> Any:
  """Every array leaf of ``tree`` copied whole to every device of ``mesh``.

  Args:
    tree: pytree (e.g. model variables); leaves that are not arrays
      (Python scalars, strings) are returned unchanged.
    mesh: default :func:`data_mesh`.

  Returns:
    The same pytree with ``NamedSharding(mesh, P())`` array leaves.
  """
  sharding = NamedSharding(mesh or data_mesh(), PartitionSpec())
  return jax.tree.map(lambda x: _put(x, sharding) if _is_array(x) else x, tree)


def shard_batch(batch: Any, mesh: Mesh | None = None, axis: str = DATA_AXIS) -> Any:
  """Every array leaf of ``batch`` split along its leading axis over the ``axis`` mesh axis.

  A leaf whose leading size is not a multiple of the number of devices (or a
  0-d leaf) is replicated instead: criteria see ``loss_fn`` as a black box, so
  they cannot pad a batch without changing its mean loss. :func:`safer_jax.training.train.evaluate`
  pads its batches (masked) to a multiple of :func:`num_data_shards`, so they
  always shard. Multi-host: every process passes the same full batch.

  Args:
    batch: pytree of arrays with a leading batch axis ``(B, ...)`` (NumPy or
      JAX); non-array leaves are returned unchanged.
    mesh: default :func:`data_mesh`.
    axis: the mesh axis to split over (e.g. ``'copies'`` for the stacked
      perturbed kernels of :mod:`safer_jax.measure.sweep`).

  Returns:
    The same pytree of global ``jax.Array`` leaves, sharded
    ``NamedSharding(mesh, P(axis))`` (or replicated, see above).

  Raises:
    ValueError: ``axis`` is not an axis of ``mesh``.
  """
  mesh = mesh or data_mesh()
  if axis not in mesh.shape:
    raise ValueError(f"`axis` must be one of the mesh axes {tuple(mesh.shape)}, got {axis!r}.")
  n = mesh.shape[axis]
  split = NamedSharding(mesh, PartitionSpec(axis))
  whole = NamedSharding(mesh, PartitionSpec())

  def put(x):
    if not _is_array(x):
      return x
    shape = np.shape(x)
    return _put(x, split if shape and shape[0] % n == 0 else whole)

  return jax.tree.map(put, batch)


def on_mesh(x: Any, mesh: Mesh) -> bool:
  """Whether ``x`` is a (non-traced) ``jax.Array`` laid out on exactly ``mesh``'s devices."""
  return (_is_array(x) and isinstance(x, jax.Array) and
          x.sharding.device_set == set(mesh.devices.flat))


def place_replicated(tree: Any, mesh: Mesh | None = None) -> Any:
  """Replicates the array leaves of ``tree`` that are not already on ``mesh``.

  Leaves already on the mesh (e.g. batches from :func:`shard_batch`) keep their
  sharding; other arrays (weights on one device, probe vectors, NumPy) are
  replicated so that one jitted call can take them all. Scalars pass through.
  """
  mesh = mesh or data_mesh()
  sharding = NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(
      lambda x: x if not _is_array(x) or on_mesh(x, mesh) else _put(x, sharding), tree)


# A barrier generous enough for process 0 to train a zoo model while the others wait.
BARRIER_TIMEOUT_S = 24 * 3600
_barriers = 0


def wait_for_all(name: str, timeout_s: float = BARRIER_TIMEOUT_S) -> None:
  """Blocks until every process reaches this barrier (coordination service, no devices).

  Unlike a device collective (whose first use times out after ~30 s on CPU /
  gloo), the barrier waits up to ``timeout_s`` seconds, e.g. while process 0
  trains or restores a model. Every process must call it, in the same order.
  No-op with one process.

  Args:
    name: barrier label (made unique per call: ``name`` + a call counter).
    timeout_s: seconds to wait (> 0).

  Raises:
    ValueError: a non-positive ``timeout_s``.
  """
  global _barriers  # pylint: disable=global-statement
  if not timeout_s > 0:
    raise ValueError(f"`timeout_s` must be a positive number of seconds, got {timeout_s!r}.")
  if jax.process_count() == 1:
    return
  from orbax.checkpoint import multihost  # pylint: disable=import-outside-toplevel
  _barriers += 1
  multihost.get_barrier_sync_fn()(key=f"safer_jax:{name}:{_barriers}",
                                  timeout_ms=int(timeout_s * 1000))


def broadcast_from_primary(tree: Any) -> Any:
  """Process 0's values of ``tree``, bit for bit, in every process (NumPy leaves).

  Every process passes a tree of the same structure, shapes and dtypes (values
  of other processes are ignored, e.g. zeros). The bytes travel as ``uint8``
  (``jax.experimental.multihost_utils.broadcast_one_to_all`` sums over
  processes, which would turn ``-0.0`` into ``0.0``). A device collective: every
  process must call it, in the same order. One process: the leaves as NumPy.

  Args:
    tree: pytree of arrays (NumPy or JAX; not PRNG keys).

  Returns:
    The same pytree with ``np.ndarray`` leaves holding process 0's values.
  """
  leaves, treedef = jax.tree.flatten(tree)
  hosts = [_canonical_host(x) for x in leaves]
  if jax.process_count() == 1:
    return jax.tree.unflatten(treedef, hosts)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  raw = [np.ascontiguousarray(h).reshape(-1).view(np.uint8) for h in hosts]
  got = multihost_utils.broadcast_one_to_all(raw)
  out = [np.asarray(g).view(h.dtype).reshape(h.shape) for g, h in zip(got, hosts)]
  return jax.tree.unflatten(treedef, out)
