"""The zoo's checkpoint format: orbax ``CheckpointManager`` step 0 with a SHA-256 checksum.

A checkpoint holds the variables and a JSON record (``meta``) with
:func:`checksum` of every parameter leaf; :func:`restore_checkpoint` refuses a
checkpoint that fails to restore, has another structure or whose checksum
differs (:class:`CorruptCheckpointError`). Used by the zoo cache
(:mod:`safer_jax.zoo`) and by :func:`safer_jax.zoo.convert.load_orbax`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class CorruptCheckpointError(RuntimeError):
  """A cached checkpoint could not be restored intact."""


def checksum(tree: Any) -> str:
  """SHA-256 over every leaf's path, dtype, shape and bytes (order-independent of dict order)."""
  h = hashlib.sha256()
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
    arr = np.asarray(leaf)
    h.update(jax.tree_util.keystr(path).encode())
    h.update(str(arr.dtype).encode())
    h.update(str(arr.shape).encode())
    h.update(np.ascontiguousarray(arr).tobytes())
  return h.hexdigest()


def process_local() -> bool:
  """Whether checkpoints are handled per process (under ``jax.distributed``, > 1 process)."""
  return jax.process_count() > 1


def _manager_options(**kwargs) -> ocp.CheckpointManagerOptions:
  """CheckpointManager options; under ``jax.distributed``, this process alone.

  Zoo variables are host-local (trained or restored by one process, see
  :func:`safer_jax.zoo.cache.pretrained`), so a checkpoint is saved or restored by the calling
  process by itself: orbax's primary host and only active process, with its
  own barrier names (no cross-process barriers), and the arrays go through
  NumPy (orbax refuses host-local ``jax.Array`` leaves when
  ``jax.process_count() > 1``). Single process: orbax's defaults.
  """
  if process_local():
    index = jax.process_index()
    kwargs.update(create=False, multiprocessing_options=ocp.options.MultiprocessingOptions(
        primary_host=index, active_processes={index},
        barrier_sync_key_prefix=f"safer_jax_zoo_process_{index}"))
  return ocp.CheckpointManagerOptions(**kwargs)


def save_checkpoint(path: str, variables: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
  """Saves ``variables`` and ``meta`` (+ checksum) as step 0 of a CheckpointManager at ``path``.

  Under ``jax.distributed`` only process 0 can save (orbax writes host-local
  NumPy arrays from process 0 only); it saves alone (see :func:`_manager_options`).

  Raises:
    ValueError: called in a process other than 0 under ``jax.distributed``.
  """
  if process_local() and jax.process_index() != 0:
    raise ValueError(f"save_checkpoint({path!r}) runs in process {jax.process_index()}; under "
                     f"jax.distributed only process 0 saves zoo checkpoints.")
  meta = dict(meta, checksum=checksum(variables))
  if process_local():
    variables = jax.device_get(variables)  # NumPy leaves: orbax's host-local array handler.
    os.makedirs(path, exist_ok=True)  # `create=True` is unsupported with `active_processes`.
  with ocp.CheckpointManager(path, options=_manager_options(max_to_keep=1)) as mngr:
    mngr.save(0, args=ocp.args.Composite(variables=ocp.args.StandardSave(dict(variables)),
                                         meta=ocp.args.JsonSave(meta)), force=True)
    mngr.wait_until_finished()


def restore_checkpoint(path: str, abstract_variables: Any) -> tuple[dict, dict]:
  """Restores and verifies a checkpoint written by :func:`save_checkpoint`.

  Args:
    path: checkpoint directory.
    abstract_variables: the expected tree (arrays or ``jax.ShapeDtypeStruct``).

  Returns:
    ``(variables, meta)``.

  Raises:
    FileNotFoundError: no finished checkpoint at ``path``.
    CorruptCheckpointError: restore failed, structure differs or checksum mismatch.
  """
  if not os.path.isdir(path):
    raise FileNotFoundError(path)
  if process_local():  # Host-local NumPy leaves, as saved (see `_manager_options`).
    abstract_variables = jax.tree.map(
        lambda x: np.zeros(x.shape, x.dtype), abstract_variables)
  with ocp.CheckpointManager(path, options=_manager_options()) as mngr:
    step = mngr.latest_step()
    if step is None:
      raise FileNotFoundError(f"No finished checkpoint in {path}")
    try:
      restored = mngr.restore(step, args=ocp.args.Composite(
          variables=ocp.args.StandardRestore(abstract_variables), meta=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      raise CorruptCheckpointError(f"Checkpoint {path} failed to restore: {e!r}") from e
  variables, meta = dict(restored["variables"]), dict(restored["meta"])
  expected = jax.tree.structure(abstract_variables)
  if jax.tree.structure(variables) != expected:
    raise CorruptCheckpointError(f"Checkpoint {path} has a different structure than the model.")
  got = checksum(variables)
  if got != meta.get("checksum"):
    raise CorruptCheckpointError(
        f"Checkpoint {path} checksum mismatch (stored {meta.get('checksum')}, restored {got}).")
  return variables, meta
