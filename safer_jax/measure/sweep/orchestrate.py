"""Running a sweep: the resumable, threaded loop over layers, and the naive reference.

:func:`run_sweep` perturbs the layers' kernels (:mod:`safer_jax.measure.sweep.perturbed`)
and evaluates the copies with an :class:`~safer_jax.measure.sweep.engine.Engine`, layers on
``workers`` threads, results collected in network order. :func:`naive_sweep`
computes the same table the plain way, one jitted full evaluation per cell.

Resumable: with ``results_path``, the table is rewritten atomically after each
layer (floats written exactly, so a resumed table is byte-identical to an
uninterrupted one); a restarted sweep skips finished cells, and refuses to mix
results from a different setup (fingerprint check). Ctrl-C saves the finished
layers before stopping (:class:`safer_jax.core.errors.Interrupted`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
import pandas as pd

from safer_jax.core import caches
from safer_jax.core import checkpoints
from safer_jax.core import data as data_lib
from safer_jax.core import errors
from safer_jax.core import io
from safer_jax.core import layers as layers_lib
from safer_jax.core import perturb
from safer_jax.core import staged
from safer_jax.core import tasks as tasks_lib
from safer_jax.core import wrapping
from safer_jax.core.progress import Progress
from safer_jax.measure import memory
from safer_jax.measure.sweep import engine as engine_lib
from safer_jax.measure.sweep import perturbed
from safer_jax.measure.sweep import plan as plan_lib
from safer_jax.measure.sweep import tables
from safer_jax.measure.sweep.plan import SweepConfig
from safer_jax.training import train

# The programs of the model swept last (at most one cache: a process that sweeps several
# models, e.g. criteria_benchmark, must not hold every model's executables).
_recent: list[engine_lib.ProgramCache] = []


def programs_for(model: Any) -> engine_lib.ProgramCache:
  """The compiled programs of ``model`` kept from this process's last sweep, or a new cache.

  :func:`run_sweep` and :func:`naive_sweep` use it when not given ``programs``, so
  repeated sweeps of one model (resume, notebooks, several families one after
  another) compile each program once. Only the most recent model's cache is kept:
  asking for another model's drops it (hold a
  :class:`~safer_jax.measure.sweep.engine.ProgramCache` to keep several).
  """
  if not _recent or _recent[0].model is not model:
    _recent[:] = [engine_lib.ProgramCache(model)]
  return _recent[0]


@caches.register
def clear_compiled() -> None:
  """Forgets the programs kept from earlier sweeps (with ``jax.clear_caches()``: a cold start).

  One of the caches :func:`safer_jax.clear_caches` empties.
  """
  _recent.clear()


def _data_hash(split: data_lib.Split) -> str:
  if list(split.arrays) == ["image", "label"]:  # (the hash every earlier table was saved with)
    return hashlib.sha256(np.ascontiguousarray(split.images).tobytes()
                          + split.labels.tobytes()).hexdigest()
  h = hashlib.sha256()
  for name, array in split.arrays.items():
    h.update(name.encode() + str(array.dtype).encode() + str(array.shape).encode())
    h.update(np.ascontiguousarray(array).tobytes())
  return h.hexdigest()


def fingerprint(variables: Mapping[str, Any], split: data_lib.Split, config: SweepConfig,
                extra: Mapping[str, Any] | None = None,
                task: tasks_lib.Task | None = None) -> str:
  """A hash of what determines the table: weights, eval data, grids, seeds, options, task."""
  extra = dict(extra or {})
  task = tasks_lib.get(task)
  if task is not tasks_lib.classification():
    extra["task"] = (task.name, repr(task.inputs), task.columns)
  record = {"weights": checkpoints.checksum(variables),
            "data": _data_hash(split),
            "grids": config.grids(), "seeds": list(config.seeds),
            "options": {k: dict(v) for k, v in config.family_options.items()},
            "extra": extra}
  return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def _load_partial(results_path: str | None, fp: str,
                  columns: Sequence[str] = tables.COLUMNS) -> pd.DataFrame:
  if not results_path or not os.path.exists(results_path):
    return pd.DataFrame(columns=list(columns))
  meta_path = results_path + ".fingerprint"
  stored = open(meta_path, encoding="utf-8").read().strip() if os.path.exists(meta_path) else ""
  if stored != fp:
    raise errors.ConfigError(
        f"{results_path} holds results of a different sweep setup (weights, data, grids, seeds "
        f"or options differ). Delete it or use another workdir.")
  return io.read_csv(results_path)  # exact floats: a resumed table equals an uninterrupted one


def run_sweep(model: Any, variables: Mapping[str, Any] | None, split: data_lib.Split,
              config: SweepConfig = SweepConfig(), *, results_path: str | None = None,
              progress: bool = True, grads: Mapping[str, Any] | None = None,
              programs: engine_lib.ProgramCache | None = None,
              task: tasks_lib.Task | str | None = None) -> pd.DataFrame:
  """Runs the sensitivity sweep; returns (and optionally saves) the tidy table.

  Args:
    model: a staged zoo model (prefix reuse), a :func:`safer_jax.wrap`-ped
      model (linen, nnx or apply function), an ``nnx.Module`` (wrapped here),
      a linen module, or any ``apply_fn(variables, images (B, H, W, C)) ->
      logits (B, K)`` (full forwards). Always run in inference mode.
    variables: model variables (``params`` and, if any, ``batch_stats``);
      ``None`` for a wrapped or nnx model (its own variables).
    split: held-out data (:class:`~safer_jax.core.data.Split`).
    config: families, grids, seeds, layers and chunking.
    results_path: CSV path; enables resuming (see module docstring).
    progress: show cells done / total and an ETA.
    grads: loss gradient w.r.t. params for the ``'corrupt'`` family (computed
      on ``split`` with :func:`~safer_jax.measure.sweep.perturbed.loss_gradients` if
      needed and not given).
    programs: the compiled programs to use and extend
      (:class:`~safer_jax.measure.sweep.engine.ProgramCache` of ``model``, or of the
      model :func:`safer_jax.core.wrapping.as_model` makes of it); None:
      :func:`programs_for` ``(model)``, those of the model swept last.
    task: what each copy is scored on (:mod:`safer_jax.core.tasks`: a
      :class:`~safer_jax.core.tasks.Task` or a preset name; default classification).
      A task that compares with the float model (``kl_to_reference``) gets the
      unperturbed model's outputs added to ``split`` here.

  Returns:
    DataFrame with :func:`~safer_jax.measure.sweep.tables.columns` of the task's metrics
    (classification: :data:`~safer_jax.measure.sweep.tables.COLUMNS`), sorted by layer
    order, family, magnitude index and seed. ``accuracy`` is a fraction,
    ``loss`` the task's weighted mean loss (nats per example for
    classification, per token for a language model).

  Raises:
    ValueError: unknown family, magnitude out of range, layer pattern matching
      nothing, NaN/inf weights, an empty split, ``eval_batch_size`` < 1, or a
      results file of another setup (:class:`~safer_jax.core.errors.ConfigError`).
    safer_jax.core.errors.Interrupted: Ctrl-C (a ``KeyboardInterrupt``); every layer
      finished by then is saved to ``results_path`` first, for a rerun to resume.

  The table's ``attrs`` hold ``baseline_<column>`` for each of the task's
  columns (``baseline_accuracy``, ``baseline_loss``), ``task`` (its name), and
  ``reused_cells`` / ``computed_cells``: rows read back from ``results_path``
  vs evaluated in this call.
  """
  model, variables = wrapping.as_model(model, variables)
  task = tasks_lib.get(task)
  grids = config.grids()
  if config.max_parallel < 1:
    raise ValueError(f"max_parallel={config.max_parallel} must be >= 1.")
  if config.copies_per_step is not None and config.copies_per_step < 1:
    raise ValueError(f"copies_per_step={config.copies_per_step} must be >= 1 or None.")
  if config.workers is not None and config.workers < 1:
    raise ValueError(f"workers={config.workers} must be >= 1 or None.")
  if config.eval_batch_size < 1 or len(split) == 0:
    raise ValueError(f"eval_batch_size={config.eval_batch_size} must be >= 1 and the split "
                     f"non-empty ({len(split)} examples).")
  layers_lib.check_finite(variables)
  split = tasks_lib.prepare_split(task, model, variables, split, "eval split",
                                  config.eval_batch_size)
  tasks_lib.check_outputs(model, variables, split, task)
  if programs is None:
    programs = programs_for(model)
  layer_names = staged.ordered_layers(
      model, variables, split, config.layers,
      order=programs.execution_order(variables, staged.split_inputs(split, task)))
  fp = fingerprint(variables, split, config, task=task)
  columns = tables.columns(tuple(task.metrics))
  done = _load_partial(results_path, fp, columns)
  finished = {(r.layer, r.family, int(r.magnitude_index), int(r.seed))
              for r in done.itertuples()}
  plan = plan_lib.cell_plan(layer_names, config, finished)
  if config.memory_budget_bytes is not None:  # pick max_parallel / eval_batch_size
    if task is not tasks_lib.classification():
      raise errors.ConfigError(
          f"memory_budget_bytes plans chunks for image classification splits; with task "
          f"{task.name!r} set max_parallel and eval_batch_size instead (memory_budget_bytes=None).")
    config = auto_chunking(model, variables, split, config, layer_names, finished, plan=plan)
  if "corrupt" in grids and grads is None:
    grads = perturbed.loss_gradients(model, variables, split, config.eval_batch_size, task)

  engine = engine_lib.Engine(model, variables, split, config, layer_names,
                             cells=sum(len(g[2]) for _, groups in plan for g in groups),
                             programs=programs, task=task)

  per_layer = [sum(len(g[2]) for g in groups) for _, groups in plan]
  total = sum(per_layer)
  first = layer_names[0]
  # The unperturbed model: with the 'stage' strategy an extra copy in the first layer's
  # first chunk (when that layer is to do), else one evaluation of its own.
  fold = engine.strategy == "stage" and bool(plan) and plan[0][0] == first
  if fold:
    per_layer[0] += 1
  # One chunk size for every layer ('stage': one per stage program): each program compiles once.
  chunk = min(config.max_parallel, max(per_layer, default=1))
  chunk = -(-chunk // engine.num_devices) * engine.num_devices  # whole copies per device
  if engine.step and chunk > engine.step and engine.strategy == "layer":
    # whole steps per chunk: one loop body, no remainder
    up = -(-chunk // engine.step) * engine.step
    chunk = up if up <= config.max_parallel else chunk // engine.step * engine.step
  engine.chunk = chunk
  if engine.strategy == "stage":
    # One chunk per stage program: the baseline's extra copy in the first layer pads only the
    # layers of its own stage (resnet8, 41 cells a layer: 9 wasted copies, ~2% of the work).
    for (layer, _), count in zip(plan, per_layer):
      stage, size = engine.stage_of(layer), min(chunk, count)
      engine.stage_chunks[stage] = max(engine.stage_chunks.get(stage, 0), size)
  stop = threading.Event()  # Ctrl-C: layers still running stop at their next chunk
  first_kernel = np.asarray(layers_lib.get_kernel(variables, first))
  layout = perturbed.padded_layout(variables, layer_names)
  if layout[0] * layout[1] > perturbed.MAX_PADDED:  # e.g. one huge embedding: per-shape programs
    layout = None
  draw_size = perturbed.shared_draw_size(variables, layer_names)
  if engine.strategy == "stage":
    engine.precompile(list(dict.fromkeys(
        [engine.stage_of(first)] + [engine.stage_of(layer) for layer, _ in plan])), stop)
  base: dict[str, float] = {}
  if not fold:
    baseline = engine.evaluate_kernels(first, first_kernel[None])
    base.update({k: float(v[0]) for k, v in baseline.items()})
  bar = Progress(total, "sweep", enabled=progress and total > 0, unit="cell")
  rows = [done] if len(done) else []
  lock = threading.Lock()

  def run_layer(layer, groups) -> tuple[pd.DataFrame, dict[str, float] | None] | None:
    """Perturbs ``layer`` for every cell of ``groups`` and evaluates the copies, chunk by chunk.

    Returns the layer's rows (drops not yet filled in) and, when the baseline is
    folded into this layer, its scores.
    """
    kernel = jnp.asarray(layers_lib.get_kernel(variables, layer))
    grad = None if grads is None else layers_lib.get_kernel(grads, layer)
    with_base = fold and layer == first
    stacks, meta = ([first_kernel[None]] if with_base else []), []
    for family, opts, todo in groups:
      mags = [c[0] for c in todo]
      keys = (plan_lib.cell_keys([c[2] for c in todo], layer, family, [c[1] for c in todo])
              if plan_lib.is_stochastic(family, opts) else [None] * len(todo))
      stacks.append(perturbed.perturb_stack(family, opts, layout, draw_size)(kernel, mags, keys,
                                                                            grad))
      meta += [(family, *c) for c in todo]
    kernels = np.concatenate(stacks)  # on the host: copies are gathered into chunks there
    count = len(kernels)
    parts: dict[str, list] = {c: [] for c in task.columns}
    size = engine.layer_chunk(layer)
    for lo in range(0, count, size):
      if stop.is_set():
        return None
      idx = np.arange(lo, lo + size).clip(max=count - 1)  # pad with the last copy
      scores = engine.evaluate_kernels(layer, kernels[idx])
      valid = min(size, count - lo)
      for c in task.columns:
        parts[c].append(scores[c][:valid])
      with lock:
        bar.update(valid - (with_base and lo == 0), postfix=layer)
    values = {c: np.concatenate(v) for c, v in parts.items()}
    own = {c: float(v[0]) for c, v in values.items()} if with_base else None
    values = {c: v[int(with_base):] for c, v in values.items()}
    frame = pd.DataFrame({
        "layer": layer, "family": [m[0] for m in meta], "magnitude": [m[1] for m in meta],
        "magnitude_index": [m[2] for m in meta], "seed": [m[3] for m in meta],
        **values, "num_params": int(kernel.size)})
    return frame, own

  def finish(result) -> pd.DataFrame:
    """The layer's rows with the drops filled in (the first result may bring the baseline)."""
    frame, own = result
    if own is not None:
      base.update(own)
    for m in task.metrics:
      frame[f"{m}_drop"] = base[m] - frame[m].to_numpy()
    frame["loss_increase"] = frame["loss"].to_numpy() - base["loss"]
    return frame[columns]

  # Layers run on `engine.workers` threads (see SweepConfig.workers); results are collected in
  # network order and saved after each layer, so a killed sweep resumes from whole layers.
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=engine.workers)
  futures = []
  try:
    futures = [pool.submit(run_layer, layer, groups) for layer, groups in plan]
    for future in futures:
      rows.append(finish(future.result()))
      if results_path:
        _save(results_path, pd.concat(rows, ignore_index=True), fp)
  except KeyboardInterrupt:  # Ctrl-C: keep every layer that finished, then stop.
    stop.set()
    pool.shutdown(cancel_futures=True)  # running layers return at their next chunk
    bar.close()
    kept = [finish(f.result()) for f in futures[len(rows) - bool(len(done)):]
            if base and not f.cancelled() and f.exception() is None and f.result() is not None]
    saved = pd.concat(rows + kept, ignore_index=True) if rows or kept else done
    if results_path and (rows or kept):  # (Ctrl-C may have cut the last save short)
      _save(results_path, tables.sorted_table(saved[columns], layer_names, list(grids)), fp)
    raise errors.Interrupted(len(saved) if results_path else 0, results_path) from None
  finally:
    stop.set()  # (also ends the precompiling thread)
    pool.shutdown(cancel_futures=True)
  bar.close()
  table = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=columns)
  table = tables.sorted_table(table[columns], layer_names, list(grids))
  table.attrs.update({f"baseline_{c}": base[c] for c in task.columns})
  table.attrs.update(task=task.name, reused_cells=len(done),
                     computed_cells=len(table) - len(done))
  if results_path:
    _save(results_path, table, fp)
  return table


def auto_chunking(model: Any, variables: Mapping[str, Any], split: data_lib.Split,
                  config: SweepConfig, layer_names: Sequence[str],
                  finished: set = frozenset(), *, plan: list | None = None) -> SweepConfig:
  """``config`` with ``max_parallel`` / ``eval_batch_size`` fitting ``config.memory_budget_bytes``.

  See :func:`safer_jax.measure.memory.plan_chunking`: the budget is per device; with
  ``shard`` over ``D`` devices each holds ``max_parallel / D`` copies.

  Args:
    layer_names: the swept layers, in network order.
    finished: ``(layer, family, magnitude_index, seed)`` cells already done.
    plan: :func:`safer_jax.measure.sweep.plan.cell_plan` of these (computed if not given).

  Raises:
    ValueError: the budget does not fit one copy of one example (sizes stated).
  """
  if plan is None:
    plan = plan_lib.cell_plan(layer_names, config, finished)
  copies = dict.fromkeys(layer_names, 0)
  copies.update({layer: sum(len(g[2]) for g in groups) for layer, groups in plan})
  layer_names = [l for l in layer_names if copies[l]] or list(layer_names[:1])
  devices = max(len(engine_lib.copies_devices(config)), 1)
  sharded = devices > 1
  cap = min(config.max_parallel, max(max(copies.values(), default=1), 1))
  # The 'corrupt' family keeps the loss gradient (one parameter tree) on the device.
  extra = memory.tree_bytes(variables["params"]) if "corrupt" in config.families else 0
  plan = memory.plan_chunking(
      model, variables, split.images.shape[1:], layer_names, config.memory_budget_bytes,
      max_parallel=-(-cap // devices), eval_batch_size=config.eval_batch_size,
      num_examples=len(split), copies=copies, margin=config.memory_margin, extra_bytes=extra,
      use_prefix=config.use_prefix, copies_per_step=engine_lib.engine_step(config, sharded))
  return dataclasses.replace(config, max_parallel=plan.max_parallel * (devices if sharded else 1),
                             eval_batch_size=plan.eval_batch_size)


def _save(path: str, table: pd.DataFrame, fp: str) -> None:
  """Writes the table (exact floats, so reused rows are written as recomputed ones would be)."""
  io.write_text(path + ".fingerprint", fp)
  io.write_csv(path, table, exact=True)


def naive_sweep(model: Any, variables: Mapping[str, Any] | None, split: data_lib.Split,
                config: SweepConfig = SweepConfig(), *, progress: bool = True,
                grads: Mapping[str, Any] | None = None,
                task: tasks_lib.Task | str | None = None) -> pd.DataFrame:
  """The reference: a Python loop, one jitted full evaluation per perturbed model.

  Same cells, keys and table as :func:`run_sweep`, computed the plain way: the
  family function on one kernel, :func:`safer_jax.core.layers.replace_kernel`, and
  :func:`safer_jax.training.train.evaluate` on the full model.
  Used by tests and by the ``bench_sweep`` experiment.
  """
  model, variables = wrapping.as_model(model, variables)
  task = tasks_lib.get(task)
  grids = config.grids()
  layers_lib.check_finite(variables)
  split = tasks_lib.prepare_split(task, model, variables, split, "eval split",
                                  config.eval_batch_size)
  apply = staged.apply_fn(model)
  layer_names = staged.ordered_layers(
      model, variables, split, config.layers,
      order=programs_for(model).execution_order(variables, staged.split_inputs(split, task)))
  if "corrupt" in grids and grads is None:
    grads = perturbed.loss_gradients(model, variables, split, config.eval_batch_size, task)
  base = train.evaluate(apply, variables, split, config.eval_batch_size, task=task)
  todo = [(layer, family, c) for layer in layer_names for family, grid in grids.items()
          for c in plan_lib.cells(layer, family, grid, config.seeds,
                                  config.family_options.get(family, {}))]
  bar = Progress(len(todo), "naive", enabled=progress, unit="cell")
  rows = []
  for layer, family, (mag, mi, seed) in todo:
    opts = config.family_options.get(family, {})
    kernel = layers_lib.get_kernel(variables, layer)
    grad = None if grads is None else layers_lib.get_kernel(grads, layer)
    new = perturb.get_family(family).fn(kernel, mag, plan_lib.cell_key(seed, layer, family, mi),
                                        grad=grad, **opts)
    m = train.evaluate(apply, layers_lib.replace_kernel(variables, layer, new), split,
                       config.eval_batch_size, check_finite=False,  # e.g. bit flips: inf
                       task=task)
    rows.append({"layer": layer, "family": family, "magnitude": mag, "magnitude_index": mi,
                 "seed": seed, **{c: m[c] for c in task.columns},
                 **{f"{k}_drop": base[k] - m[k] for k in task.metrics},
                 "loss_increase": m["loss"] - base["loss"],
                 "num_params": int(layers_lib.get_kernel(variables, layer).size)})
    bar.update(1)
  bar.close()
  return tables.sorted_table(pd.DataFrame(rows, columns=tables.columns(tuple(task.metrics))),
                             layer_names, list(grids))
