"""The sweep engine: perturbed copies of one layer evaluated in compiled calls.

:class:`ProgramCache` holds the compiled programs of one model (built once
each, shared by every sweep that holds the cache); :class:`Engine` evaluates
the perturbed copies of a sweep's layers with them: prefix activations,
chunking, device placement (a ``'copies'`` mesh, one process or several) and
the two evaluation strategies (see :class:`~safer_jax.measure.sweep.SweepConfig`).
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from safer_jax.core import data as data_lib
from safer_jax.core import distributed
from safer_jax.core import layers as layers_lib
from safer_jax.core import staged
from safer_jax.core import tasks as tasks_lib
from safer_jax.measure.sweep.plan import SweepConfig

COPIES_AXIS = "copies"  # The mesh axis perturbed copies are spread over.
STRATEGIES = ("auto", "stage", "layer")
# 'auto' on CPU: one program per stage only for sweeps with at least this many cells per
# extra program; smaller ones run every copy from the input in one program. An extra stage
# program costs ~0.5 s to compile and saves a few ms per cell (measured on resnet8 and
# mobilenet_v2, 2 cores: 60 cells over 5 stages cold 1.8 s in one program vs 4.9 s per
# stage; 410 cells 6.1 s vs 7.0 s cold but 2.5 s vs 1.3 s warm).
CELLS_PER_STAGE_PROGRAM = 50
_MAX_PREFIX_BYTES = 1 << 30  # every stage's input at once ('stage' strategy), if it fits


def copies_devices(config: SweepConfig) -> list:
  """The devices the engine spreads perturbed copies over (``[]``: not sharded).

  ``config.shard`` and more than one device: ``jax.local_devices()`` in one
  process; under ``jax.distributed`` (``jax.process_count() > 1``) every
  process's devices, ``jax.devices()``, so the processes split each chunk
  between them instead of each repeating the whole sweep.
  """
  devices = jax.devices() if jax.process_count() > 1 else jax.local_devices()
  return list(devices) if config.shard and len(devices) > 1 else []


def engine_step(config: SweepConfig, sharded: bool) -> int | None:
  """The engine's copies per step: ``config.copies_per_step``, else 2 on one CPU, else None."""
  if config.copies_per_step is None and not sharded and jax.default_backend() == "cpu":
    return 2
  return config.copies_per_step


def engine_workers(config: SweepConfig, sharded: bool) -> int:
  """Layers evaluated concurrently: ``config.workers``, else 2 on one CPU device, else 1."""
  if config.workers is not None:
    return config.workers
  if not sharded and jax.process_count() == 1 and jax.default_backend() == "cpu":
    return min(2, os.cpu_count() or 1)
  return 1


def engine_strategy(config: SweepConfig, sharded: bool) -> str:
  """``config.strategy`` with ``'auto'`` resolved (see :class:`SweepConfig`)."""
  if config.strategy not in STRATEGIES:
    raise ValueError(f"strategy={config.strategy!r}; allowed: {list(STRATEGIES)}.")
  if config.strategy != "auto":
    return config.strategy
  single_cpu = (not sharded and jax.process_count() == 1 and jax.default_backend() == "cpu")
  return "stage" if single_cpu and config.memory_budget_bytes is None else "layer"


class ProgramCache:
  """The compiled programs of one model, each built once, however many threads ask.

  Hold one to keep a model's programs across sweeps (resume, notebooks,
  several families run one after another): each program compiles once.
  :func:`safer_jax.measure.sweep.run_sweep` keeps the cache of the model it swept
  last (:func:`safer_jax.measure.sweep.programs_for`). Thread-safe: a thread that
  needs a program another thread is building waits for it instead of
  building it too.

  Attributes:
    model: the model (zoo, wrapped or apply function) the programs run.
  """

  def __init__(self, model: Any):
    self.model = model
    self._lock = threading.Lock()
    self._programs: dict[tuple, concurrent.futures.Future] = {}
    self._traces: dict[tuple, tuple[list[str], dict[str, int]]] = {}

  def get(self, key: tuple, build: Callable[[], Callable]) -> Callable:
    """``build()``'s result for ``key``, built on the first request only.

    A failed build is forgotten (raised to every thread waiting for it) and
    retried by the next request.
    """
    with self._lock:
      future = self._programs.get(key)
      owner = future is None
      if owner:
        future = self._programs[key] = concurrent.futures.Future()
    if owner:
      try:
        future.set_result(build())
      except BaseException as e:  # pylint: disable=broad-except
        with self._lock:
          self._programs.pop(key, None)
        future.set_exception(e)
        raise
    return future.result()

  def keys(self) -> list[tuple]:
    """The keys of the programs built (or being built) so far."""
    with self._lock:
      return list(self._programs)

  def execution_order(self, variables: Mapping[str, Any], images: np.ndarray) -> list[str]:
    """:func:`safer_jax.core.staged.execution_order`, traced once per layer set and image shape."""
    return self.execution_trace(variables, images)[0]

  def execution_trace(self, variables: Mapping[str, Any],
                      images: np.ndarray) -> tuple[list[str], dict[str, int]]:
    """:func:`safer_jax.core.staged.execution_trace`, traced once per layer set and image shape."""
    key = (tuple(layers_lib.find_layers(variables)),
           tasks_lib.signature(images, per_example=True))
    with self._lock:
      trace = self._traces.get(key)
    if trace is None:
      trace = staged.execution_trace(self.model, variables, images)
      with self._lock:
        self._traces[key] = trace
    return trace


class Engine:
  """Evaluates a sweep's perturbed copies with compiled programs (one sweep's state).

  The programs live in :attr:`programs` (a :class:`ProgramCache` of the model,
  given or new); the engine keeps the eval batches, the prefix activations it
  computed, the device placement and the chunk size. Thread-safe for
  :meth:`evaluate_kernels` from several threads (``workers``).

  Multi-process (``jax.distributed``, ``config.shard``): every process makes the
  same calls with the same host data (kernels are generated identically from
  :func:`safer_jax.measure.sweep.cell_key`). Kernels become a global array sharded over the
  ``'copies'`` axis of a mesh of ``jax.devices()`` (each process copies only its
  own devices' rows), weights, prefix activations, labels and masks are
  replicated on it, and the per-copy results are gathered
  (``multihost_utils.process_allgather``) so every process reads them all.

  Args:
    model: a staged zoo model, a wrapped model or an apply function.
    variables: its variables.
    split: the eval data.
    config: the sweep's settings.
    layer_names: the swept layers (default: every layer), network order.
    cells: how many cells the sweep evaluates (lets ``strategy='auto'`` drop
      prefix reuse for small sweeps); None: unknown.
    programs: compiled programs of ``model`` to use and extend (default: new).
    task: what the copies are scored on (:mod:`safer_jax.core.tasks`; default
      classification); ``split`` must hold the arrays it reads.

  Raises:
    ValueError: ``programs`` of another model, a bad strategy, or ``workers`` > 1
      under ``jax.distributed``.
  """

  def __init__(self, model: Any, variables: Mapping[str, Any], split: data_lib.Split,
               config: SweepConfig, layer_names: Sequence[str] | None = None,
               cells: int | None = None, *, programs: ProgramCache | None = None,
               task: tasks_lib.Task | None = None):
    if programs is not None and programs.model is not model:
      raise ValueError(f"programs: a ProgramCache of another model (a "
                       f"{type(programs.model).__name__}); allowed: one made for this "
                       f"{type(model).__name__} (ProgramCache(model)) or None.")
    self.model, self.variables, self.config = model, variables, config
    self.programs = programs if programs is not None else ProgramCache(model)
    self.layer_names = list(layer_names or layers_lib.find_layers(variables))
    self.task = tasks_lib.get(task)
    self.batches = list(staged.eval_batches(split, config.eval_batch_size, self.task))
    self.n = len(split)
    self._prefixes: dict[int, list] = {}  # stage -> activations, the most recent last
    self._fits_all: bool | None = None  # see _all_prefixes
    self._lock = threading.Lock()
    devices = copies_devices(config)
    self.sharding = None
    self.mesh = None  # Multi-process only: the global 'copies' mesh (see `_evaluate_global`).
    if devices:
      mesh = jax.sharding.Mesh(np.asarray(devices), (COPIES_AXIS,))
      self.sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(COPIES_AXIS))
      if jax.process_count() > 1:
        self.mesh = mesh
        self.variables = distributed.replicate(variables, mesh)  # From each host's copy.
        self.labels_masks = [distributed.replicate((batch, mask), mesh)
                             for _, batch, mask in self.batches]
      else:
        # Weights on every device of the mesh: restored checkpoints arrive committed to one
        # device, which jit cannot combine with kernels sharded over the mesh.
        self.variables = jax.device_put(
            variables, self.sharding.update(spec=jax.sharding.PartitionSpec()))
    self.num_devices = len(devices) if self.sharding is not None else 1
    self.step = engine_step(config, self.sharding is not None)
    self.workers = engine_workers(config, self.sharding is not None)
    if self.workers > 1 and self.mesh is not None:
      raise ValueError(f"workers={self.workers}: under jax.distributed the sweep's collectives "
                       f"must run in one order on every process; use workers=1 (or None).")
    self.strategy = engine_strategy(config, self.sharding is not None)
    self.chunk = 1  # copies per compiled call; run_sweep sets it before evaluating
    # 'stage': copies per call of each stage's program where it differs from `chunk` (run_sweep
    # sets them: a stage's program takes the most copies one of its layers needs).
    self.stage_chunks: dict[int, int] = {}
    self.use_prefix = config.use_prefix
    stages = {staged.stage_of(model, name) for name in self.layer_names}
    # 'stage': a stage almost as cheap to run from the one before joins its program
    # (staged.stage_groups); 'layer': every stage its own.
    self._groups = {st: st for st in stages}
    if self.strategy == "stage" and self.use_prefix and len(stages) > 1:
      _, macs = self.programs.execution_trace(variables, self.batches[0][0])
      self._groups = staged.stage_groups(model, macs, stages)
    if (self.strategy == "stage" and config.strategy == "auto" and cells is not None
        and cells < CELLS_PER_STAGE_PROGRAM * (len(set(self._groups.values())) - 1)):
      self.use_prefix = False  # too little work to pay for one program per stage
    # 'stage': the swept layers of each program's stage (without prefix reuse: one, 0).
    self.stage_layers: dict[int, tuple[str, ...]] = {}
    for name in self.layer_names:
      stage = self.stage_of(name)
      self.stage_layers[stage] = self.stage_layers.get(stage, ()) + (name,)
    kernels = [layers_lib.get_kernel(variables, n) for n in self.layer_names]
    self.flat_size = max(int(np.prod(k.shape)) for k in kernels)
    self.flat_dtype = np.result_type(*[k.dtype for k in kernels])  # (float64 kernels stay exact)
    # What an ahead-of-time compiled program was specialised to: part of every program key,
    # so a later sweep of the same model with other batches or weights' dtypes compiles anew.
    inputs, batch, _ = self.batches[0]
    self.signature = (tasks_lib.signature(inputs), tasks_lib.signature(batch),
                      str(self.flat_dtype), self.task, tasks_lib.signature(variables))

  def prefix(self, stage: int) -> list:
    """Activations entering ``stage`` for every eval batch.

    Cached for the ``workers`` most recently used stages (layers run in network
    order, so concurrent workers need at most that many), or, with the
    ``'stage'`` strategy when they fit in :data:`_MAX_PREFIX_BYTES`, for every
    stage at once from one program; thread-safe.
    """
    if stage == 0:
      return [inputs for inputs, _, _ in self.batches]
    with self._lock:
      if stage in self._prefixes:
        self._prefixes[stage] = self._prefixes.pop(stage)  # most recent last
        return self._prefixes[stage]
      if self._all_prefixes():
        stages, run = self.prefixes_fn()
        outs = [run(self.variables, inputs) for inputs, _, _ in self.batches]
        for i, st in enumerate(stages):
          self._prefixes[st] = [out[i] for out in outs]
        return self._prefixes[stage]
      while len(self._prefixes) >= self.workers:  # free the oldest before computing these
        self._prefixes.pop(next(iter(self._prefixes)))
      hs = self._compute_prefix(stage)
      self._prefixes[stage] = hs
      return hs

  def _compute_prefix(self, stage: int) -> list:
    if stage == 0:
      hs = [inputs for inputs, _, _ in self.batches]
    else:
      if self.strategy == "stage":
        run = self.prefix_fn(stage)
      else:
        run = self.programs.get(("layer_prefix", stage), lambda: jax.jit(
            staged.prefix_program(self.model, stage)))
      if self.mesh is None:
        hs = [run(self.variables, inputs) for inputs, _, _ in self.batches]
      else:  # Replicated inputs: every device computes the prefix; the output is replicated.
        hs = [run(self.variables, distributed.replicate(inputs, self.mesh))
              for inputs, _, _ in self.batches]
    return hs

  def eval_fn(self, layer: str, stage: int) -> Callable:
    """jit: ``(variables, kernels (P, ...), h, batch, mask) -> sums (P, num_sums)``.

    :func:`safer_jax.core.staged.eval_program` of ``layer`` from ``stage`` (the
    ``'layer'`` strategy's program), one per (layer, stage, copies per step, task).
    """
    return self.programs.get(("layer", layer, stage, self.step, self.task), lambda: jax.jit(
        staged.eval_program(self.model, layer, stage, self.step, self.task)))

  def stage_of(self, layer: str) -> int:
    """The stage ``layer`` is evaluated from (0 without prefix reuse).

    Its own stage, or with the ``'stage'`` strategy the start of its group
    (:func:`safer_jax.core.staged.stage_groups`).
    """
    return self._groups[staged.stage_of(self.model, layer)] if self.use_prefix else 0

  def layer_chunk(self, layer: str) -> int:
    """Copies per compiled call for ``layer``: its stage's (``'stage'``), else :attr:`chunk`."""
    return self._stage_chunk(self.stage_of(layer)) if self.strategy == "stage" else self.chunk

  def stage_fn(self, stage: int) -> Callable:
    """:func:`safer_jax.core.staged.stage_program` of ``stage``, compiled once for its chunk of
    copies.

    The chunk: ``stage_chunks[stage]``, else :attr:`chunk`. Thread-safe: concurrent
    callers share one compilation (see :meth:`precompile`).
    """
    key = ("stage", stage, self.stage_layers[stage], self._stage_chunk(stage), self.flat_size,
           self.signature)
    return self.programs.get(key, lambda: self._compile_stage(stage))

  def _stage_chunk(self, stage: int) -> int:
    return self.stage_chunks.get(stage, self.chunk)

  def _all_prefixes(self) -> bool:
    """'stage' strategy: every stage's input from one program, if they fit in memory."""
    if self.strategy != "stage":
      return False
    if self._fits_all is None:
      stages, run = self._prefixes_program()
      shapes = jax.eval_shape(run, self.variables, self.batches[0][0])
      size = sum(x.size * x.dtype.itemsize for x in shapes) * len(self.batches)
      self._fits_all = size <= _MAX_PREFIX_BYTES
    return self._fits_all

  def _prefixes_program(self) -> tuple[tuple[int, ...], Callable]:
    stages = tuple(sorted(st for st in self.stage_layers if st > 0))
    return stages, staged.prefixes_program(self.model, stages)

  def prefixes_fn(self) -> tuple[tuple[int, ...], Callable]:
    """The stages after 0 and ``(variables, images) -> (their inputs...)``, compiled once."""
    stages, run = self._prefixes_program()
    images = self.batches[0][0]
    key = ("prefixes", stages, self.signature)
    return stages, self.programs.get(key, lambda: jax.jit(run).lower(self.variables,
                                                                     images).compile())

  def prefix_fn(self, stage: int) -> Callable:
    """``(variables, images) -> activations entering stage``, compiled (once)."""
    images = self.batches[0][0]
    key = ("prefix", stage, self.signature)
    return self.programs.get(key, lambda: jax.jit(
        staged.prefix_program(self.model, stage)).lower(self.variables, images).compile())

  def _compile_stage(self, stage: int) -> Callable:
    inputs, batch, mask = self.batches[0]
    h = inputs if stage == 0 else jax.eval_shape(
        staged.prefix_program(self.model, stage), self.variables, inputs)
    flats = jax.ShapeDtypeStruct((self._stage_chunk(stage), self.flat_size), self.flat_dtype)
    which = jax.ShapeDtypeStruct((), jnp.int32)
    program = jax.jit(staged.stage_program(self.model, stage, self.stage_layers[stage],
                                           self.task))
    return program.lower(self.variables, flats, which, h, batch, mask).compile()

  def precompile(self, stages: Sequence[int], stop: threading.Event) -> None:
    """Compiles the ``'stage'`` programs of ``stages`` on a background thread, in order.

    The sweep calls this first, so compilation overlaps with perturbing the first
    layers; a layer that needs a program still being compiled waits for it. The
    thread stops before its next program once ``stop`` is set. Errors surface in
    the layer that needs the program.
    """
    def work():
      jobs = [functools.partial(self.stage_fn, st) for st in stages]
      if any(st > 0 for st in stages):
        # Right after the first stage's program: every later stage needs its input.
        jobs[1:1] = ([self.prefixes_fn] if self._all_prefixes() else
                     [functools.partial(self.prefix_fn, st) for st in stages if st > 0])
      for job in jobs:
        if stop.is_set():
          return
        try:
          job()
        except Exception:  # pylint: disable=broad-except
          return  # (raised again where the program is needed)

    threading.Thread(target=work, name="safer_jax-precompile", daemon=False).start()

  def evaluate_kernels(self, layer: str, kernels: jax.Array) -> dict[str, np.ndarray]:
    """The task's scores of ``P`` perturbed copies (kernels stacked on axis 0).

    Returns ``{column: (P,) float32}`` for :attr:`task`'s columns (``'loss'`` and
    each metric; classification: ``'loss'`` in nats/example, ``'accuracy'``):
    weighted means over the split. With the ``'stage'`` strategy the copies are
    padded to the chunk of the layer's stage (:meth:`layer_chunk`: one compiled
    shape per stage); the first ``P`` results are returned.
    """
    stage = self.stage_of(layer)
    if self.strategy == "stage":
      return self._evaluate_stage(layer, stage, np.asarray(kernels))
    fn = self.eval_fn(layer, stage)
    if self.mesh is not None:
      return self._evaluate_global(fn, stage, kernels)
    hs = self.prefix(stage)
    if self.sharding is not None:  # split over the devices, or (odd count) on every device
      kernels = jax.device_put(kernels, self.sharding if kernels.shape[0] % self.num_devices == 0
                               else self.sharding.update(spec=jax.sharding.PartitionSpec()))
    # Sums on the host (float32, as on the device): no small programs to compile for them.
    total = None
    for h, (_, batch, mask) in zip(hs, self.batches):
      sums = np.asarray(fn(self.variables, kernels, h, batch, mask))
      total = sums if total is None else total + sums
    return self._means(total)

  def _means(self, total: np.ndarray) -> dict[str, np.ndarray]:
    """``{column: (P,)}``: Σ weight·score / Σ weight, in float32 (``total`` (P, num_sums)).

    Raises:
      ValueError: no copy has an example whose outputs look fine for the task
        (:meth:`safer_jax.core.tasks.Task.check_sums`: probabilities for logits), so
        a sweep stops at its first compiled call.
    """
    self.task.check_sums(total)
    total = np.asarray(total, np.float32)
    return {name: total[:, i + 1] / total[:, 0] for i, name in enumerate(self.task.columns)}

  def _evaluate_stage(self, layer: str, stage: int, kernels: np.ndarray) -> dict[str, np.ndarray]:
    count = kernels.shape[0]
    size = max(self._stage_chunk(stage), count)
    flats = np.zeros((size, self.flat_size), self.flat_dtype)
    flats[:count, :kernels[0].size] = kernels.reshape(count, -1)
    flats[count:, :kernels[0].size] = kernels[-1].reshape(-1)  # pad with the last copy
    which = np.int32(self.stage_layers[stage].index(layer))
    fn = self.stage_fn(stage)
    total = None
    for h, (_, batch, mask) in zip(self.prefix(stage), self.batches):
      sums = np.asarray(fn(self.variables, flats, which, h, batch, mask))
      total = sums if total is None else total + sums
    return self._means(total[:count])

  def _evaluate_global(self, fn: Callable, stage: int, kernels: jax.Array) -> dict[str, np.ndarray]:
    """Multi-process :meth:`evaluate_kernels`: copies over every process's devices.

    ``kernels`` (P, ...) is this process's full host copy (the same in every
    process). With P a multiple of the global device count it is split over
    ``'copies'`` (each process copies only its devices' rows), otherwise (the
    baseline's single copy) replicated; the (P, num_sums) sums are gathered into
    every process.
    """
    kernels = distributed.shard_batch(kernels, self.mesh, axis=COPIES_AXIS)
    total = None
    for h, (batch, mask) in zip(self.prefix(stage), self.labels_masks):
      h = distributed.place_replicated(h, self.mesh)  # Stage 0: the inputs (NumPy).
      sums = fn(self.variables, kernels, h, batch, mask)
      # sums rather than 0 + sums (non-negative sums: the same numbers as `evaluate_kernels`).
      total = sums if total is None else total + sums
    total = multihost_utils.process_allgather(total, tiled=True)
    return self._means(np.asarray(total))

