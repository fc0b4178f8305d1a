"""Interaction-aware budgets: measure whole allocations, many at once, and search them.

Every additive allocator (HAWQ's ILP, ModelOpt's LP, :mod:`safer_jax.budgeting.budget`'s
knapsack) sums per-layer costs, but layers interact: two layers quantized
together can cost more (or less) than the sum of each alone. This module
measures *whole* perturbed models instead.

* :class:`AllocationEvaluator` evaluates ``P`` candidate allocations (each a
  complete mixed-precision or pruned model) per compiled call. Each layer's
  kernel options are computed once (``(K_l, *kernel.shape)`` per layer); a
  candidate is one row of option indices, so a chunk of ``P`` candidates costs
  ``P x L`` integers on the device rather than ``P`` model copies. It reuses the
  sweep engine's settings (:class:`~safer_jax.measure.sweep.SweepConfig`: eval batch,
  ``shard`` over local devices, ``memory_budget_bytes``, copies per step) and is
  deterministic.
* :func:`search` improves given starts (e.g. the knapsack solutions of the
  oracle and of every criterion) under a resource budget, by measured loss on a
  calibration split: batched local moves (raise one layer, lower another until
  the budget holds), a fixed number of whole-model evaluations.
* :func:`search_allocation` does the same over named layers and option values
  (bit widths, pruning ratios), with tie groups.
* :func:`interactions` measures, for the most sensitive layers, the joint loss
  increase of every pair against the sum of the two single-layer increases.

>>> opts = quantized_options(variables, names, (2, 4, 8))
>>> ev = AllocationEvaluator(model, variables, calib, opts)
>>> acc, loss = ev.evaluate([{"conv": 4, "fc": 2}, {"conv": 8, "fc": 2}])
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from safer_jax.core import data as data_lib
from safer_jax.core import errors
from safer_jax.core import layers as layers_lib
from safer_jax.core import perturb
from safer_jax.core import tasks as tasks_lib
from safer_jax.core import wrapping
from safer_jax.core.progress import Progress
from safer_jax.measure import sweep
from safer_jax.training import train

# Candidates per compiled call on one CPU device: the copies run one after another there
# (lax.map), so a larger chunk only adds padding to small batches.
CPU_CHUNK = 8


# ---------------------------------------------------------------------------
# Per-layer kernel options.
# ---------------------------------------------------------------------------


def quantized_options(variables: Mapping[str, Any], names: Sequence[str],
                      candidates: Sequence[int], *, full_range: bool = True,
                      group_size: int | None = None) -> dict[str, dict[int, np.ndarray]]:
  """``{layer: {bits: kernel fake-quantized to bits}}`` for every candidate bit width.

  The kernels are those of :func:`safer_jax.budgeting.mixed_precision.quantize_model`
  (:func:`safer_jax.core.perturb.quantize`, per output channel), bit for bit.
  """
  out = {}
  for name in names:
    w = jnp.asarray(layers_lib.get_kernel(variables, name))
    out[name] = {int(b): np.asarray(perturb.quantize(w, int(b), full_range=full_range,
                                                     group_size=group_size))
                 for b in candidates}
  return out


def pruned_options(variables: Mapping[str, Any],
                   ratios: Mapping[str, Sequence[float]]) -> dict[str, dict[float, np.ndarray]]:
  """``{layer: {ratio: kernel magnitude-pruned at ratio}}``
  (:func:`safer_jax.core.perturb.prune`)."""
  out = {}
  for name, rs in ratios.items():
    w = jnp.asarray(layers_lib.get_kernel(variables, name))
    out[name] = {float(r): np.asarray(perturb.prune(w, float(r))) for r in rs}
  return out


# ---------------------------------------------------------------------------
# Batched whole-model evaluation.
# ---------------------------------------------------------------------------


def allocation_program(model: Any, names: Sequence[str], step: int | None = None,
                       transform: Callable | None = None,
                       task: tasks_lib.Task | None = None) -> Callable:
  """The function :class:`AllocationEvaluator` jits, not yet jitted.

  ``(variables, tables (one (K_l, *kernel.shape) array per layer of names),
  choices (P, L) int32, inputs (B, ...), batch {name: (B, ...)}, mask (B,) float32)
  -> (score (P, B), loss (P, B))``: copy ``p`` is the model with the kernel of
  ``names[l]`` replaced by ``tables[l][choices[p, l]]``; per copy and example,
  ``score`` is the task's first metric and ``loss`` its loss, each times the
  example's weight (0 on masked examples). Classification: 1 for a right
  answer, and the cross-entropy (nats); a task without metrics: score 0. ``step``: copies side by side (``vmap``) per ``lax.map``
  step; None: all ``P`` in one ``vmap``. ``transform``: ``variables ->
  variables`` applied to each copy after its kernels are replaced (e.g.
  :func:`safer_jax.training.train.recalibrate_bn`), traced into the program.
  """
  apply = sweep.apply_fn(model)
  names = tuple(names)
  task = tasks_lib.get(task)
  metric = next(iter(task.metrics.values()), None)

  def one(variables, tables, choice, images, labels, mask):
    v = layers_lib.replace_kernels(
        variables, {name: tables[i][choice[i]] for i, name in enumerate(names)})
    if transform is not None:
      v = transform(v)
    outputs = tasks_lib.forward(apply, v, images)
    w = task.example_weights(labels, mask)
    score = (jnp.zeros_like(w) if metric is None
             else metric(outputs, labels).astype(jnp.float32))
    return score * w, task.loss(outputs, labels) * w

  def chunk_fn(variables, tables, choices, images, labels, mask):
    def f(c):
      return one(variables, tables, c, images, labels, mask)
    if step is None or step >= choices.shape[0]:
      return jax.vmap(f)(choices)
    return jax.lax.map(f, choices, batch_size=step)

  return chunk_fn


class AllocationEvaluator:
  """Accuracy and loss of many whole perturbed models on one split.

  Args:
    model: a zoo model, a :func:`safer_jax.wrap`-ped model (linen, nnx or apply
      function), an ``nnx.Module``, a linen module or an ``apply_fn(variables,
      images) -> logits``; run in inference mode.
    variables: model variables (``None`` for a wrapped or nnx model).
    split: the data candidates are scored on (a calibration split).
    task: what candidates are scored on (:mod:`safer_jax.core.tasks`; default
      classification). "accuracy" below is the task's first metric (none: 0),
      "loss" its weighted mean loss; per-example losses are scaled by each
      example's weight over the mean weight, so their mean is that loss.
    options: ``{layer: {value: kernel}}``: the kernels layer ``layer`` may take
      (e.g. :func:`quantized_options`); at least one per layer, each the shape
      of the layer's kernel. Layers not listed keep their kernel.
    config: the engine settings used: ``eval_batch_size``, ``max_parallel``
      (upper bound on candidates per call), ``copies_per_step`` (None: one
      after another on a CPU device, all side by side on accelerators),
      ``shard`` (candidates spread over the local devices of one process; each
      is computed whole on one device, so the numbers do not change),
      ``memory_budget_bytes`` / ``memory_margin`` (the largest chunk whose
      compiled call, per XLA's memory analysis, fits).
    chunk: candidates per compiled call (None: :data:`CPU_CHUNK` on one CPU
      device, else ``config.max_parallel``), rounded up to whole copies per
      device. Every call pads to it, so there is one compilation.
    transform: ``variables -> variables`` applied to every candidate model before
      it is scored, inside the compiled call (e.g. ``lambda v:
      train.recalibrate_bn(model, v, calib_images)``: BatchNorm statistics
      re-estimated per pruned model).

  Attributes:
    layers: the layers of ``options``, in its order (the columns of a choice row).
    values: ``{layer: [option values]}`` in the order of the choice indices.
    evaluations: whole models evaluated so far (padding excluded).

  Raises:
    ValueError: an unknown layer (allowed ones named), an option of the wrong
      shape or with NaN/inf, no options, NaN/inf weights, an empty split, or a
      memory budget that does not fit one candidate
      (:class:`~safer_jax.core.errors.ConfigError`).
  """

  def __init__(self, model: Any, variables: Mapping[str, Any] | None, split: data_lib.Split,
               options: Mapping[str, Mapping[Any, Any]],
               config: sweep.SweepConfig | None = None, *, chunk: int | None = None,
               transform: Callable | None = None, task: tasks_lib.Task | str | None = None):
    model, variables = wrapping.as_model(model, variables)
    self.task = tasks_lib.get(task)
    self.metric = next(iter(self.task.metrics), None)
    config = config or sweep.SweepConfig()
    if not options:
      raise ValueError("options is empty: give {layer: {value: kernel}} for at least one layer.")
    if len(split) == 0 or config.eval_batch_size < 1:
      raise ValueError(f"eval_batch_size={config.eval_batch_size} must be >= 1 and the split "
                       f"non-empty ({len(split)} examples).")
    layers_lib.check_finite(variables)
    known = layers_lib.find_layers(variables)
    self.layers = list(options)
    self.values: dict[str, list] = {}
    tables = []
    for name in self.layers:
      if name not in known:
        raise ValueError(f"options name layer {name!r}, which the model does not have; "
                         f"layers: {known}.")
      kernel = layers_lib.get_kernel(variables, name)
      opts = options[name]
      if not opts:
        raise ValueError(f"options[{name!r}] is empty: give at least one kernel.")
      self.values[name] = list(opts)
      stack = np.stack([np.asarray(k) for k in opts.values()])
      if stack.shape[1:] != tuple(kernel.shape):
        raise ValueError(f"options[{name!r}] kernels have shape {stack.shape[1:]}; the layer's "
                         f"kernel is {tuple(kernel.shape)}.")
      layers_lib.check_finite({name: stack}, "Option kernel")
      tables.append(jnp.asarray(stack, kernel.dtype))
    self.model, self.variables, self.config = model, variables, config
    self.transform = transform
    split = tasks_lib.prepare_split(self.task, model, variables, split, "split",
                                    config.eval_batch_size)
    tasks_lib.check_outputs(model, variables, split, self.task)
    self.batches = list(sweep.eval_batches(split, config.eval_batch_size, self.task))
    self.n = len(split)
    weights = [np.asarray(self.task.example_weights(b, m), np.float64)
               for _, b, m in self.batches]
    self.total_weight = float(sum(w.sum() for w in weights))
    if not self.total_weight > 0:
      raise ValueError(f"The split's examples weigh nothing under task {self.task.name!r} "
                       f"(e.g. every token masked); nothing to score.")
    # per-example losses are w·loss; dividing by the mean weight makes their mean the loss
    self._mean_weight = self.total_weight / self.n
    devices = jax.local_devices()
    self.sharding = None
    if config.shard and len(devices) > 1 and jax.process_count() == 1:
      mesh = jax.sharding.Mesh(np.asarray(devices), (sweep.COPIES_AXIS,))
      self.sharding = jax.sharding.NamedSharding(
          mesh, jax.sharding.PartitionSpec(sweep.COPIES_AXIS))
      replicated = self.sharding.update(spec=jax.sharding.PartitionSpec())
      self.variables = jax.device_put(variables, replicated)
      tables = jax.device_put(tables, replicated)
    self.tables = tables
    self.num_devices = len(devices) if self.sharding is not None else 1
    on_cpu = self.sharding is None and jax.default_backend() == "cpu"
    self.step = config.copies_per_step if config.copies_per_step is not None else (
        1 if on_cpu else None)
    limit = max(1, min(config.max_parallel, chunk or (CPU_CHUNK if on_cpu else
                                                      config.max_parallel)))
    if config.memory_budget_bytes is not None:
      limit = self._fitting_chunk(limit)
    self.chunk = -(-limit // self.num_devices) * self.num_devices
    self.evaluations = 0
    self._fn = None

  def lowered(self, chunk: int) -> jax.stages.Lowered:
    """The evaluation program for ``chunk`` candidates, lowered (``.compile()`` it, or read
    ``.compile().memory_analysis()``): what :meth:`evaluate` runs and the memory budget sizes."""
    images, labels, mask = self.batches[0]
    choices = jax.ShapeDtypeStruct((chunk, len(self.layers)), jnp.int32,
                                   sharding=self.sharding)
    program = jax.jit(allocation_program(self.model, self.layers, self.step, self.transform,
                                         self.task))
    return program.lower(self.variables, self.tables, choices, images, labels, mask)

  def _fitting_chunk(self, limit: int) -> int:
    """The largest chunk up to ``limit`` whose compiled call fits the memory budget."""
    from safer_jax.measure import memory  # pylint: disable=import-outside-toplevel
    budget, margin = self.config.memory_budget_bytes, self.config.memory_margin

    def need(p: int) -> int:
      stats = self.lowered(p).compile().memory_analysis()
      if stats is None:
        raise ValueError(f"The {jax.default_backend()!r} backend gives no memory analysis; "
                         f"set memory_budget_bytes=None or pass chunk=.")
      program = (stats.argument_size_in_bytes + stats.output_size_in_bytes
                 + stats.temp_size_in_bytes - stats.alias_size_in_bytes)
      return int(math.ceil(margin * program))

    fits = memory.largest_fitting(1, limit, need, budget)
    if fits is None:
      raise errors.ConfigError(
          f"memory budget {budget} bytes is too small: one candidate per call needs "
          f"{need(1)} bytes (margin {margin} x XLA's estimate, eval_batch_size="
          f"{self.config.eval_batch_size}); allowed: a budget >= that or a smaller "
          f"eval_batch_size.")
    return fits

  def index(self, allocation: Mapping[str, Any]) -> np.ndarray:
    """The choice row (L,) int32 of ``{layer: value}`` (every layer of :attr:`layers`)."""
    missing = [n for n in self.layers if n not in allocation]
    if missing:
      raise ValueError(f"allocation has no value for layer(s) {missing}.")
    row = []
    for name in self.layers:
      value = allocation[name]
      match = [i for i, v in enumerate(self.values[name]) if v == value]
      if not match:
        raise ValueError(f"{value!r} for layer {name!r} is not one of its options "
                         f"{self.values[name]}.")
      row.append(match[0])
    return np.asarray(row, np.int32)

  def evaluate(self, allocations: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """``(accuracy (P,), mean loss (P,) nats)`` of ``{layer: value}`` allocations."""
    return self(np.stack([self.index(a) for a in allocations]) if len(allocations) else
                np.zeros((0, len(self.layers)), np.int32))

  def __call__(self, choices: Any, *, per_example: bool = False) -> tuple[np.ndarray, ...]:
    """``(accuracy (P,), mean loss (P,) nats)`` of the choice rows ``choices`` (P, L) int.

    Row ``p`` gives each layer's option index (into :attr:`values`).
    ``per_example``: also return the loss of every example, (P, N) nats.
    """
    choices = np.asarray(choices)
    if choices.ndim != 2 or choices.shape[1] != len(self.layers):
      raise ValueError(f"choices has shape {choices.shape}; expected (P, {len(self.layers)}) "
                       f"(one option index per layer of {self.layers}).")
    for l, name in enumerate(self.layers):
      bad = choices[:, l][(choices[:, l] < 0) | (choices[:, l] >= len(self.values[name]))]
      if bad.size:
        raise ValueError(f"option index {int(bad[0])} for layer {name!r} is out of range; "
                         f"allowed: 0..{len(self.values[name]) - 1}.")
    count = choices.shape[0]
    correct = np.zeros(count, np.float64)
    losses = np.zeros((count, self.n), np.float32)
    if count and self._fn is None:
      self._fn = self.lowered(self.chunk).compile()
    for lo in range(0, count, self.chunk):
      part = choices[lo:lo + self.chunk].astype(np.int32)
      m = part.shape[0]
      if m < self.chunk:  # pad with the last candidate (results dropped)
        part = np.concatenate([part, np.repeat(part[-1:], self.chunk - m, axis=0)])
      rows = part if self.sharding is None else jax.device_put(part, self.sharding)
      at = 0
      for images, labels, mask in self.batches:
        c, l = self._fn(self.variables, self.tables, rows, images, labels, mask)
        real = int(mask.sum())
        correct[lo:lo + m] += np.asarray(c, np.float64)[:m].sum(axis=1)
        losses[lo:lo + m, at:at + real] = np.asarray(l)[:m, :real]
        at += real
    self.evaluations += count
    if self._mean_weight != 1.0:  # (classification: every weight is 1, nothing to scale)
      losses = (losses / np.float32(self._mean_weight)).astype(np.float32)
    loss = losses.astype(np.float64).mean(axis=1) if count else np.zeros(0)
    out = (correct / self.total_weight, loss)
    return out + (losses,) if per_example else out


# ---------------------------------------------------------------------------
# Search under a budget.
# ---------------------------------------------------------------------------

OBJECTIVES = ("loss", "accuracy")


@dataclasses.dataclass(frozen=True)
class SearchResult:
  """What :func:`search` found.

  Attributes:
    choice: (G,) option index per group: the best candidate evaluated.
    accuracy: its accuracy on the search split (fraction).
    loss: its mean loss there (nats/example).
    start: the name of the start it descends from.
    evaluations: whole models evaluated (starts included).
    seconds: wall time of the search (compilation included).
    converged: True when it stopped before the budget because every move from
      the best candidates had been evaluated.
    starts: ``{name: (accuracy, loss)}`` of each start on the search split.
    history: the best objective after each batch (the starts' batch first).
    z: the paired z-score of the returned candidate's per-example loss
      improvement over the best start (nan when it is that start, or when the
      evaluations give no per-example losses).
    kept_start: True when candidates with a lower mean loss than the best start
      were found but none significantly lower (``min_z``), so the best start is
      returned.
  """
  choice: np.ndarray
  accuracy: float
  loss: float
  start: str
  evaluations: int
  seconds: float
  converged: bool
  starts: dict
  history: tuple
  z: float = float("nan")
  kept_start: bool = False


def _key(objective: str, acc: float, loss: float, row: tuple) -> tuple:
  """Sort key: best first, ties broken by the other metric, then by the row itself."""
  return (loss, -acc, row) if objective == "loss" else (-acc, loss, row)


def search(evaluate: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
           resources: Sequence[Sequence[float]], capacity: float,
           starts: Mapping[str, Sequence[int]], *, evaluations: int, batch: int = 32,
           seed: int = 0, elites: int = 3, objective: str = "loss", min_z: float = 2.0,
           progress: bool = False) -> SearchResult:
  """Batched local search for the allocation with the best measured objective under a budget.

  A candidate gives each of ``G`` groups one option index; its resource is
  ``sum_g resources[g][choice[g]]`` and must not exceed ``capacity``. From the
  best ``elites`` candidates evaluated so far, each batch proposes moves not yet
  evaluated — raise one group to its next option by resource (alone when that
  fits, else lowering one other group option by option until the budget holds)
  — in an order drawn from ``seed``, round-robin over the elites (best first),
  and evaluates them in one call. It stops after ``evaluations`` whole-model
  evaluations (starts included; every start is evaluated even if there are
  more of them), or earlier when no unevaluated move remains.

  The minimum over many noisy evaluations is biased low (the winner's curse).
  When ``evaluate`` also returns per-example losses and the objective is the
  loss, the returned candidate is the lowest-loss one whose per-example
  improvement over the best start is significant (paired z-score >=
  ``min_z``); the best start if there is none.

  Args:
    evaluate: ``choices (P, G) int -> (accuracy (P,), loss (P,))`` or ``->
      (accuracy, loss, per-example loss (P, N))``, e.g. an
      :class:`AllocationEvaluator` on a calibration split.
    resources: per group, the resource of each option (e.g. bits x weights).
    capacity: the budget on the summed resource.
    starts: ``{name: (G,) option indices}``, every one within the budget.
    evaluations: the evaluation budget (>= 0).
    batch: candidates proposed per call (>= 1).
    seed: the proposal order (same seed, same result).
    elites: candidates moves are proposed from (>= 1).
    objective: ``'loss'`` (lowest mean loss, ties: higher accuracy) or
      ``'accuracy'`` (ties: lower loss).
    min_z: the significance the returned candidate's improvement over the best
      start needs (0: the plain minimum).
    progress: print evaluations done and an ETA.

  Returns:
    A :class:`SearchResult`; its candidate is always within the budget.

  Raises:
    ValueError: no starts, a start of the wrong length, out of range or over
      the budget (named), a bad objective, batch, elites or evaluations.
  """
  t0 = time.perf_counter()
  if objective not in OBJECTIVES:
    raise ValueError(f"objective={objective!r}; allowed: {list(OBJECTIVES)}.")
  for arg, value, low in (("evaluations", evaluations, 0), ("batch", batch, 1),
                          ("elites", elites, 1)):
    if int(value) != value or value < low:
      raise ValueError(f"{arg}={value!r} must be an integer >= {low}.")
  res = [np.asarray(r, np.float64) for r in resources]
  groups = len(res)
  if not groups or any(r.ndim != 1 or r.size == 0 for r in res):
    raise ValueError("resources must give at least one option for each of at least one group.")
  order = [np.argsort(r, kind="stable") for r in res]  # option indices by resource
  rank = [np.argsort(o, kind="stable") for o in order]  # option index -> position
  if not starts:
    raise ValueError("search needs at least one start.")

  def cost(pos: np.ndarray) -> float:
    return float(sum(res[g][order[g][p]] for g, p in enumerate(pos)))

  def to_choice(pos: np.ndarray) -> np.ndarray:
    return np.asarray([order[g][p] for g, p in enumerate(pos)], np.int64)

  seen: dict[tuple, tuple[float, float, str]] = {}  # positions -> (accuracy, loss, start)
  per_example: dict[tuple, np.ndarray] = {}  # positions -> (N,) losses, when given
  positions = {}  # start name -> positions (two names may share one)
  for name, choice in starts.items():
    choice = np.asarray(choice)
    if choice.shape != (groups,) or np.any(choice < 0) or np.any(
        choice >= np.asarray([r.size for r in res])):
      raise ValueError(f"start {name!r} = {choice.tolist()} must give one option index per "
                       f"group, each in range (options per group: {[r.size for r in res]}).")
    pos = np.asarray([rank[g][c] for g, c in enumerate(choice)], np.int64)
    if cost(pos) > capacity:
      raise ValueError(f"start {name!r} uses {cost(pos):g}, over the budget {capacity:g}.")
    positions[name] = tuple(int(p) for p in pos)
  start_pos = {}  # distinct positions -> the first start name with them
  for name, pos in positions.items():
    start_pos.setdefault(pos, name)
  bar = Progress(max(evaluations, len(start_pos)), "search", enabled=progress, unit="model")
  history = []

  def run(rows: list[tuple], origins: list[str]) -> None:
    out = evaluate(np.stack([to_choice(np.asarray(r)) for r in rows]))
    acc, loss = out[0], out[1]
    for i, (r, a, l, o) in enumerate(zip(rows, acc, loss, origins)):
      seen[r] = (float(a), float(l), o)
      if len(out) > 2:
        per_example[r] = np.asarray(out[2][i], np.float64)
    best = min(_key(objective, a, l, r) for r, (a, l, _) in seen.items())
    history.append(float(best[0]) if objective == "loss" else -float(best[0]))
    bar.update(len(rows), postfix=f"best {objective} {history[-1]:.4g}")

  run(list(start_pos), list(start_pos.values()))
  start_scores = {name: seen[pos][:2] for name, pos in positions.items()}
  rng = np.random.default_rng(seed)
  tops = np.asarray([r.size - 1 for r in res])
  converged = False
  while len(seen) < evaluations:
    ranked = sorted(seen, key=lambda r: _key(objective, seen[r][0], seen[r][1], r))
    pools = []
    for parent in ranked[:elites]:
      moves = [m for m in _moves(np.asarray(parent), tops, cost, capacity) if m not in seen]
      pools.append([moves[i] for i in rng.permutation(len(moves))])
    proposals, origins = [], []
    want = min(batch, evaluations - len(seen))
    for i in itertools.count():
      if len(proposals) >= want or all(i >= len(p) for p in pools):
        break
      for parent, pool in zip(ranked, pools):
        if i < len(pool) and pool[i] not in proposals and len(proposals) < want:
          proposals.append(pool[i])
          origins.append(seen[parent][2])
    if not proposals:
      converged = True
      break
    run(proposals, origins)
  bar.close()
  ranked = sorted(seen, key=lambda r: _key(objective, seen[r][0], seen[r][1], r))
  best, z, kept = ranked[0], float("nan"), False
  if per_example and objective == "loss" and min_z > 0:
    top_start = min(start_pos, key=lambda r: _key(objective, seen[r][0], seen[r][1], r))
    for r in ranked:
      if r == top_start:
        best, kept = r, r != ranked[0]
        break
      score = paired_z(per_example[top_start], per_example[r])
      if score >= min_z:
        best, z = r, score
        break
  accuracy, loss, origin = seen[best]
  return SearchResult(choice=to_choice(np.asarray(best)), accuracy=accuracy, loss=loss,
                      start=origin, evaluations=len(seen), seconds=time.perf_counter() - t0,
                      converged=converged, starts=start_scores, history=tuple(history),
                      z=z, kept_start=kept)


def paired_z(before: np.ndarray, after: np.ndarray) -> float:
  """z-score of the mean per-example improvement ``before - after`` (N,) over its std error.

  ``inf`` for an improvement without spread, 0 for none.
  """
  d = np.asarray(before, np.float64) - np.asarray(after, np.float64)
  mean = float(d.mean())
  sd = float(d.std(ddof=1)) if d.size > 1 else 0.0
  if sd == 0.0:
    return math.inf if mean > 0 else 0.0
  return mean / (sd / math.sqrt(d.size))


def _moves(pos: np.ndarray, tops: np.ndarray, cost: Callable, capacity: float) -> list[tuple]:
  """Neighbours of ``pos`` within the budget: one group up, other groups down as needed."""
  out = []
  for i in range(len(pos)):
    if pos[i] >= tops[i]:
      continue
    up = pos.copy()
    up[i] += 1
    if cost(up) <= capacity:
      out.append(tuple(int(x) for x in up))
      continue
    for j in range(len(pos)):
      if j == i or pos[j] == 0:
        continue
      c = up.copy()
      while cost(c) > capacity and c[j] > 0:
        c[j] -= 1
      if cost(c) <= capacity:
        out.append(tuple(int(x) for x in c))
  return out


@dataclasses.dataclass(frozen=True)
class AllocationSearch:
  """:func:`search_allocation`'s answer: the allocation and how it was found.

  Attributes:
    allocation: ``{layer: value}`` (e.g. bits or pruning ratio per layer).
    resource: its summed resource (within the budget).
    result: the :class:`SearchResult` (calibration scores, evaluations, seconds).
  """
  allocation: dict
  resource: float
  result: SearchResult


def search_allocation(evaluator: AllocationEvaluator,
                      resource: Mapping[str, Mapping[Any, float]], capacity: float,
                      starts: Mapping[str, Mapping[str, Any]], *,
                      tie_groups: Sequence[Sequence[str]] | None = None, evaluations: int,
                      batch: int = 32, seed: int = 0, objective: str = "loss",
                      min_z: float = 2.0, progress: bool = False) -> AllocationSearch:
  """:func:`search` over the named layers and option values of ``evaluator``.

  Args:
    evaluator: whole-model evaluation on the search (calibration) split.
    resource: ``{layer: {value: resource}}`` for every option of every layer
      (e.g. ``weights[layer] * bits``, or the weights a pruning ratio keeps).
    capacity: the budget on the summed resource.
    starts: ``{name: {layer: value}}`` (e.g. the knapsack allocations).
    tie_groups: layers that must share one value (they need the same options;
      every start must respect the ties).
    evaluations, batch, seed, objective, min_z, progress: see :func:`search` (the
      evaluator's per-example losses feed ``min_z``).

  Raises:
    ValueError: see :func:`search`; also a layer without a resource, tied layers
      with different options, or a start that breaks a tie.
  """
  names = evaluator.layers
  groups = [list(g) for g in (tie_groups or []) if g]
  tied = {n for g in groups for n in g}
  unknown = sorted(tied - set(names))
  if unknown:
    raise ValueError(f"tie_groups name {unknown}, not among the searched layers {names}.")
  groups += [[n] for n in names if n not in tied]
  values = []
  for g in groups:
    vals = evaluator.values[g[0]]
    if any(evaluator.values[n] != vals for n in g):
      raise ValueError(f"tied layers {g} must have the same options.")
    values.append(vals)
  missing = [n for n in names if n not in resource or set(resource[n]) != set(
      evaluator.values[n])]
  if missing:
    raise ValueError(f"resource must give every option of layer(s) {missing}.")
  res = [[sum(float(resource[n][v]) for n in g) for v in vals] for g, vals in zip(groups, values)]
  column = {n: gi for gi, g in enumerate(groups) for n in g}
  layer_cols = np.asarray([column[n] for n in names])
  start_rows = {}
  for name, alloc in starts.items():
    row = evaluator.index(alloc)
    for g in groups:
      if len({alloc[n] for n in g}) > 1:
        raise ValueError(f"start {name!r} gives the tied layers {g} different values "
                         f"{[alloc[n] for n in g]}.")
    start_rows[name] = np.asarray([row[names.index(g[0])] for g in groups])
  result = search(lambda choices: evaluator(np.asarray(choices)[:, layer_cols], per_example=True),
                  res, capacity, start_rows, evaluations=evaluations, batch=batch, seed=seed,
                  objective=objective, min_z=min_z, progress=progress)
  allocation = {n: evaluator.values[n][int(result.choice[column[n]])] for n in names}
  total = sum(float(resource[n][allocation[n]]) for n in names)
  return AllocationSearch(allocation=allocation, resource=total, result=result)


# ---------------------------------------------------------------------------
# How far additivity fails.
# ---------------------------------------------------------------------------


def interactions(model: Any, variables: Mapping[str, Any] | None, split: data_lib.Split,
                 perturbed: Mapping[str, Any], *, top: int = 6,
                 config: sweep.SweepConfig | None = None,
                 task: tasks_lib.Task | str | None = None) -> pd.DataFrame:
  """Joint vs additive loss increase of pairs of the most sensitive layers.

  Evaluates (one :class:`AllocationEvaluator`) the unperturbed model, each layer
  of ``perturbed`` alone with its perturbed kernel, then every pair of the
  ``top`` layers with the largest single-layer loss increase, both perturbed.

  Args:
    perturbed: ``{layer: perturbed kernel}`` (e.g. quantized to 3 bits).
    top: how many layers (by single-layer loss increase) to pair (>= 2).
    task: what the loss is (:mod:`safer_jax.core.tasks`; None: classification);
      the "accuracy" columns hold its first metric.

  Returns:
    One row per pair (``layer_a`` before ``layer_b`` in ``perturbed``'s order):
    ``single_a``, ``single_b`` (loss increase of each alone, nats),
    ``additive`` (their sum), ``joint`` (both together), ``excess`` (joint -
    additive), ``ratio`` (joint / additive), ``drop_a``, ``drop_b``,
    ``joint_drop`` (accuracy drops, fractions). ``attrs``: ``singles``
    ``{layer: loss increase}`` of every layer, ``baseline_loss``,
    ``baseline_accuracy``.
  """
  if int(top) != top or top < 2:
    raise ValueError(f"top={top!r} must be an integer >= 2 (layers to pair).")
  model, variables = wrapping.as_model(model, variables)
  names = list(perturbed)
  options = {n: {0: np.asarray(layers_lib.get_kernel(variables, n)),
                 1: np.asarray(perturbed[n])} for n in names}
  ev = AllocationEvaluator(model, variables, split, options, config, task=task)
  eye = np.eye(len(names), dtype=np.int32)
  acc, loss = ev(np.concatenate([np.zeros((1, len(names)), np.int32), eye]))
  single = loss[1:] - loss[0]
  drop = acc[0] - acc[1:]
  chosen = sorted(np.argsort(-single, kind="stable")[:top])
  pairs = list(itertools.combinations(chosen, 2))
  rows_in = np.stack([eye[a] + eye[b] for a, b in pairs]) if pairs else np.zeros((0, len(names)))
  pacc, ploss = ev(rows_in)
  rows = []
  for (a, b), ja, jl in zip(pairs, pacc, ploss):
    additive = single[a] + single[b]
    joint = jl - loss[0]
    rows.append({"layer_a": names[a], "layer_b": names[b], "single_a": single[a],
                 "single_b": single[b], "additive": additive, "joint": joint,
                 "excess": joint - additive,
                 "ratio": joint / additive if additive > 0 else np.nan,
                 "drop_a": drop[a], "drop_b": drop[b], "joint_drop": acc[0] - ja})
  table = pd.DataFrame(rows)
  table.attrs.update(singles={n: float(s) for n, s in zip(names, single)},
                     baseline_loss=float(loss[0]), baseline_accuracy=float(acc[0]))
  return table
