"""The layer-sensitivity ground truth (the SAfER "dataset"), vectorised.

For every layer ``l``, perturbation family ``f``, magnitude ``m`` and seed ``s``,
perturb the kernel of ``l`` alone and measure accuracy and loss on held-out
data. One row per cell in a tidy table::

    layer, family, magnitude, magnitude_index, seed, accuracy, loss,
    accuracy_drop, loss_increase, num_params

How it is fast:

* **Vectorised** — all perturbed copies of one layer (families x magnitudes x
  seeds) are generated in one compiled call per family and evaluated with
  ``vmap`` over the stacked kernels, in chunks of at most ``max_parallel``
  copies so memory stays bounded (every chunk has the same size, the last one
  padded, so each layer compiles once). Under ``vmap`` the operations that do
  not depend on the perturbed kernel (everything before it) run once per chunk,
  not once per copy.
* **Prefix reuse** — for staged models (every zoo model, see
  :mod:`safer_jax.models.common`) the activations entering the stage that holds
  layer ``l`` are computed once and only the suffix is re-run per copy. For an
  arbitrary ``apply_fn`` the engine falls back to full forwards.
* **No branch over layers** — each layer gets its own compiled function (a
  ``lax.switch`` over layers under ``vmap`` would compute every branch).

Deterministic families (quantize, magnitude/structured prune, corrupt) do not
depend on the seed: they are evaluated once and reported with ``seed = 0``.
Stochastic families (bitflip, noise, random prune) get one row per seed; the
PRNG key of a cell is :func:`cell_key` (seed, layer, family, magnitude index),
so the table is identical across runs, chunk sizes and the naive loop.

Resumable: with ``results_path``, the table is rewritten atomically after each
layer (floats written exactly, so a resumed table is byte-identical to an
uninterrupted one); a restarted sweep skips finished cells, and refuses to mix
results from a different setup (fingerprint check). Ctrl-C saves the finished
layers before stopping (:class:`safer_jax.errors.Interrupted`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import os
import threading
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from jax.experimental import multihost_utils

from safer_jax import data as data_lib
from safer_jax import distributed
from safer_jax import errors
from safer_jax import io
from safer_jax import layers as layers_lib
from safer_jax import perturb
from safer_jax import wrapping
from safer_jax.progress import Progress
from safer_jax.train import cross_entropy

COLUMNS = ["layer", "family", "magnitude", "magnitude_index", "seed", "accuracy", "loss",
           "accuracy_drop", "loss_increase", "num_params"]
DEFAULT_FAMILIES = ("quantize", "prune", "bitflip", "noise")
COPIES_AXIS = "copies"  # The mesh axis perturbed copies are spread over.


@dataclasses.dataclass(frozen=True)
class SweepConfig:
  """What to sweep.

  Attributes:
    families: ``{family: magnitudes}``; magnitudes mildest first (e.g. bits
      ``(8, 6, 4, 3, 2)``). ``None`` grids use the family's default grid.
    seeds: seeds of stochastic families.
    layers: regex patterns (``re.fullmatch``) selecting layers; None = all.
    family_options: ``{family: {option: value}}`` forwarded to the family
      function (e.g. ``{'bitflip': {'representation': 'float32'}}``).
    max_parallel: at most this many perturbed copies per compiled call.
    eval_batch_size: examples per compiled call.
    use_prefix: reuse the activations before the perturbed layer's stage.
    shard: spread the perturbed copies of each chunk over all local devices
      (``jax.sharding.NamedSharding`` on a 1-D ``'copies'`` mesh; weights and
      data replicated). Each copy is computed whole on one device, so the table
      is identical to the single-device one. Chunks are rounded up to a
      multiple of the device count. Under ``jax.distributed`` (several
      processes) the mesh spans every process's devices (``jax.devices()``):
      each process evaluates only its devices' copies and every process gets
      the whole table (see :func:`copies_devices`).
    copies_per_step: how many copies one step of the compiled call evaluates
      side by side (``vmap``); a chunk is a sequential ``lax.map`` over such
      steps. ``None`` picks per backend: the whole chunk on accelerators
      (one wide batched call), 2 on a single CPU device, where wide ``vmap``
      intermediates (copies x eval batch x activations) overflow the caches
      (measured on resnet8: 2 per step made the warm sweep 1.6x faster than 41).
    workers: layers evaluated concurrently, each from its own thread. ``None``
      picks per backend: 2 on a single CPU device, where XLA runs these small
      computations on about 1.5 of 2 cores and two layers at once fill them
      (measured on resnet8: two independent layer evaluations took 0.29 s in
      two threads vs 0.43 s one after the other); 1 elsewhere (accelerators,
      several devices, several processes, whose collectives must run in the
      same order everywhere). The table does not depend on it.
    memory_budget_bytes: device memory the sweep may use, in bytes (e.g.
      ``12 * 10**9``). When set, ``max_parallel`` and ``eval_batch_size`` are
      upper bounds: the sweep takes the largest ``max_parallel`` (and, only if
      one copy does not fit, a smaller ``eval_batch_size``) whose estimated
      need fits, from XLA's memory analysis of the compiled call
      (:func:`safer_jax.memory.plan_chunking`), which is the ``'layer'``
      strategy's (a budget implies it under ``strategy='auto'``). The table
      equals that of a fixed chunking with the chosen sizes. None: the sizes
      as given.
    memory_margin: safety factor (>= 1) on the compiled call's estimate when
      ``memory_budget_bytes`` is set (other compilers and allocators differ).
    strategy: how perturbed copies are evaluated (the table does not depend on
      it beyond float rounding of the loss). ``'stage'``: one compiled program
      per *stage* (a staged zoo model's block; the whole network otherwise) that
      takes any of the stage's layers as its perturbed one, copies one after
      another (``lax.map``): few compilations, the fast first run on CPU.
      ``'layer'``: one program per layer, ``copies_per_step`` copies side by
      side (``vmap``): the wide batched calls accelerators want. ``'auto'``:
      ``'stage'`` on one CPU device without ``memory_budget_bytes`` (and, for
      sweeps of fewer than :data:`CELLS_PER_STAGE_PROGRAM` cells per stage
      program, one program for the whole network, as ``use_prefix=False``),
      else ``'layer'``.
  """
  families: Mapping[str, Sequence[float] | None] = dataclasses.field(
      default_factory=lambda: {f: None for f in DEFAULT_FAMILIES})
  seeds: Sequence[int] = (0, 1, 2)
  layers: Sequence[str] | None = None
  family_options: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
  max_parallel: int = 64
  eval_batch_size: int = 1024
  use_prefix: bool = True
  shard: bool = True
  copies_per_step: int | None = None
  workers: int | None = None
  memory_budget_bytes: int | None = None
  memory_margin: float = 1.25
  strategy: str = "auto"

  def grids(self) -> dict[str, tuple[float, ...]]:
    out = {}
    for name, grid in self.families.items():
      family = perturb.get_family(name)
      grid = tuple(family.default_grid if grid is None else grid)
      if not grid:
        raise ValueError(f"Family {name!r} has an empty magnitude grid.")
      perturb.validate_magnitude(name, np.asarray(grid, np.float64))
      out[name] = grid
    return out


def is_stochastic(family: str, options: Mapping[str, Any]) -> bool:
  return perturb.get_family(family).stochastic or options.get("method") == "random"


def cell_key(seed: int, layer: str, family: str, magnitude_index: int) -> jax.Array:
  """The PRNG key of one cell; stable across runs, processes and chunkings."""
  key = jax.random.key(seed)
  key = jax.random.fold_in(key, zlib.crc32(layer.encode()) & 0x7FFFFFFF)
  key = jax.random.fold_in(key, zlib.crc32(family.encode()) & 0x7FFFFFFF)
  return jax.random.fold_in(key, magnitude_index)


@jax.jit
@jax.vmap
def _keys(seed, layer_hash, family_hash, magnitude_index):
  key = jax.random.fold_in(jax.random.key(seed), layer_hash)
  return jax.random.fold_in(jax.random.fold_in(key, family_hash), magnitude_index)


def cell_keys(seeds: Sequence[int], layer: str, family: str,
              magnitude_indices: Sequence[int]) -> jax.Array:
  """``cell_key`` of many cells of one (layer, family) in one compiled call: keys ``(P,)``."""
  n = len(seeds)
  return _keys(jnp.asarray(seeds, jnp.int32),
               jnp.full((n,), zlib.crc32(layer.encode()) & 0x7FFFFFFF, jnp.int32),
               jnp.full((n,), zlib.crc32(family.encode()) & 0x7FFFFFFF, jnp.int32),
               jnp.asarray(magnitude_indices, jnp.int32))


def cells(layer: str, family: str, grid: Sequence[float], seeds: Sequence[int],
          options: Mapping[str, Any]) -> list[tuple[float, int, int]]:
  """(magnitude, magnitude_index, seed) of every cell of one (layer, family) pair."""
  seeds = list(seeds) if is_stochastic(family, options) else [0]
  return [(float(m), i, int(s)) for i, m in enumerate(grid) for s in seeds]


# ---------------------------------------------------------------------------
# Model access: staged (prefix reuse) or a plain apply function.
# ---------------------------------------------------------------------------


def stage_of(model: Any, layer: str) -> int:
  """The stage (top-level block of a staged zoo model) holding ``layer``; 0 otherwise."""
  names = getattr(model, "stage_names", None)
  if not names:
    return 0
  head = layer.split("/")[0]
  return names.index(head) if head in names else 0


def _ordered_layers(model: Any, variables, split: data_lib.Split,
                    patterns: Sequence[str] | None) -> list[str]:
  """Selected layers, in the order the network runs them (where it can be recovered)."""
  selected = set(layers_lib.select_layers(variables, patterns))
  key = (id(model), tuple(layers_lib.find_layers(variables)), split.images.shape[1:])
  if key not in _ORDERS or _ORDERS[key][0] is not model:  # one traced forward per model
    _ORDERS.clear()
    _ORDERS[key] = (model, layers_lib.execution_order(apply_fn(model), variables,
                                                      split.images[:1]))
  return [name for name in _ORDERS[key][1] if name in selected]


_ORDERS: dict[tuple, tuple[Any, list[str]]] = {}


def apply_fn(model: Any) -> Callable:
  """``model.apply`` (a zoo, linen or wrapped model), else ``model`` (an apply function)."""
  return model.apply if hasattr(model, "apply") else model


def _suffix_fn(model: Any, stage: int) -> Callable:
  if getattr(model, "stage_names", None):
    return lambda v, h: model.apply(v, h, start=stage)
  return apply_fn(model)


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


def masked_scores(logits: jax.Array, labels: jax.Array, mask: jax.Array):
  """``(right answers, summed cross-entropy)`` over the unmasked examples of a batch."""
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  return jnp.sum(correct * mask), jnp.sum(cross_entropy(logits, labels) * mask)


def eval_program(model: Any, layer: str, stage: int, step: int | None = None) -> Callable:
  """The function the engine jits for ``layer`` (suffix from ``stage``), not yet jitted.

  ``(variables, kernels (P, *kernel.shape), h (B, ...), labels (B,) int, mask (B,) float32)
  -> (correct (P,), loss_sum (P,))``: ``h`` is the activation entering ``stage``
  (images for stage 0); per perturbed copy, ``correct`` counts right answers and
  ``loss_sum`` sums the cross-entropy (nats) over unmasked examples. ``step``:
  copies per ``lax.map`` step (None: all ``P`` in one ``vmap``). The memory
  estimate (:mod:`safer_jax.memory`) lowers this same function.
  """
  suffix = _suffix_fn(model, stage)

  def one(variables, kernel, h, labels, mask):
    v = layers_lib.replace_kernel(variables, layer, kernel)
    logits = suffix(v, h)
    return masked_scores(logits, labels, mask)

  batched = jax.vmap(one, in_axes=(None, 0, None, None, None))

  def chunk_fn(variables, kernels, h, labels, mask):
    if step is None or step >= kernels.shape[0]:
      return batched(variables, kernels, h, labels, mask)
    return jax.lax.map(lambda k: one(variables, k, h, labels, mask), kernels, batch_size=step)

  return chunk_fn


STRATEGIES = ("auto", "stage", "layer")
# 'auto' on CPU: one program per stage only for sweeps with at least this many cells per
# extra program; smaller ones run every copy from the input in one program. An extra stage
# program costs ~0.5 s to compile and saves a few ms per cell (measured on resnet8 and
# mobilenet_v2, 2 cores: 60 cells over 5 stages cold 1.8 s in one program vs 4.9 s per
# stage; 410 cells 6.1 s vs 7.0 s cold but 2.5 s vs 1.3 s warm).
CELLS_PER_STAGE_PROGRAM = 50


def engine_strategy(config: SweepConfig, sharded: bool) -> str:
  """``config.strategy`` with ``'auto'`` resolved (see :class:`SweepConfig`)."""
  if config.strategy not in STRATEGIES:
    raise ValueError(f"strategy={config.strategy!r}; allowed: {list(STRATEGIES)}.")
  if config.strategy != "auto":
    return config.strategy
  single_cpu = (not sharded and jax.process_count() == 1 and jax.default_backend() == "cpu")
  return "stage" if single_cpu and config.memory_budget_bytes is None else "layer"


def stage_program(model: Any, stage: int, layers: Sequence[str]) -> Callable:
  """The function the ``'stage'`` strategy jits for ``stage``, not yet jitted.

  ``(variables, flats (P, N) (the kernels' widest dtype), which () int32, h (B, ...), labels (B,) int,
  mask (B,) float32) -> (correct (P,), loss_sum (P,))``: copy ``p`` is the model
  with the kernel of ``layers[which]`` replaced by ``flats[p, :size].reshape(shape)``
  (``N`` >= the largest kernel of ``layers``, zero padded), evaluated from ``h``
  (the activation entering ``stage``); copies run one after another
  (``lax.map``), so every kernel stays unbatched and each copy computes as a
  plain forward. Outputs as in :func:`eval_program`.
  """
  suffix = _suffix_fn(model, stage)
  names = tuple(layers)

  def one(variables, flat, which, h, labels, mask):
    v = variables
    for i, name in enumerate(names):
      kernel = layers_lib.get_kernel(variables, name)
      new = flat[:kernel.size].reshape(kernel.shape).astype(kernel.dtype)
      v = layers_lib.replace_kernel(v, name, new if len(names) == 1
                                    else jnp.where(which == i, new, kernel))
    logits = suffix(v, h)
    return masked_scores(logits, labels, mask)

  def chunk_fn(variables, flats, which, h, labels, mask):
    return jax.lax.map(lambda f: one(variables, f, which, h, labels, mask), flats)

  return chunk_fn


def eval_batches(split: data_lib.Split, batch_size: int):
  """``(images, labels, mask)`` batches of ``split``, all of ``min(batch_size, N)`` examples.

  The last batch is zero padded; ``mask`` (B,) float32 is 1 on real examples.
  """
  n = len(split)
  bs = min(batch_size, n)
  for lo in range(0, n, bs):
    images, labels = split.images[lo:lo + bs], split.labels[lo:lo + bs]
    m = labels.shape[0]
    mask = np.zeros((bs,), np.float32)
    mask[:m] = 1.0
    if m < bs:
      images = np.concatenate([images, np.zeros((bs - m, *images.shape[1:]), images.dtype)])
      labels = np.concatenate([labels, np.zeros((bs - m,), labels.dtype)])
    yield images, labels, mask


# Compiled functions live as long as the process, so repeated sweeps (resume, notebooks,
# several families run one after another) compile each (model, layer) once.
_EVAL_FNS: dict[tuple, tuple[Any, Callable]] = {}
_PREFIX_FNS: dict[tuple, tuple[Any, Callable]] = {}
# 'stage' strategy's programs (suffixes, prefixes), compiled ahead of time: key -> (model,
# Future of the executable). A thread that needs one another thread is compiling waits for
# it instead of compiling too.
_STAGE_FNS: dict[tuple, tuple[Any, concurrent.futures.Future]] = {}
_STAGE_LOCK = threading.Lock()


def clear_compiled() -> None:
  """Forgets every program the engine compiled (with ``jax.clear_caches()``: a cold start)."""
  with _STAGE_LOCK:
    for cache in (_EVAL_FNS, _PREFIX_FNS, _STAGE_FNS, _ORDERS):
      cache.clear()


class _Engine:
  """Compiled pieces, cached per model / layer / stage / family.

  Multi-process (``jax.distributed``, ``config.shard``): every process makes the
  same calls with the same host data (kernels are generated identically from
  :func:`cell_key`). Kernels become a global array sharded over the
  ``'copies'`` axis of a mesh of ``jax.devices()`` (each process copies only its
  own devices' rows), weights, prefix activations, labels and masks are
  replicated on it, and the per-copy results are gathered
  (``multihost_utils.process_allgather``) so every process reads them all.
  """

  def __init__(self, model: Any, variables: Mapping[str, Any], split: data_lib.Split,
               config: SweepConfig, layer_names: Sequence[str] | None = None,
               cells: int | None = None):
    self.model, self.variables, self.config = model, variables, config
    self.layer_names = list(layer_names or layers_lib.find_layers(variables))
    # Keep only the current model's compiled functions: a process that sweeps several models
    # (criteria_benchmark) must not hold every model's executables.
    for cache in (_EVAL_FNS, _PREFIX_FNS, _STAGE_FNS):
      for key in [k for k, (m, _) in cache.items() if m is not model]:
        del cache[key]
    self.batches = list(eval_batches(split, config.eval_batch_size))
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
        self.labels_masks = [distributed.replicate((labels, mask), mesh)
                             for _, labels, mask in self.batches]
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
    self.use_prefix = config.use_prefix
    stages = {stage_of(model, name) for name in self.layer_names}
    if (self.strategy == "stage" and config.strategy == "auto" and cells is not None
        and cells < CELLS_PER_STAGE_PROGRAM * (len(stages) - 1)):
      self.use_prefix = False  # too little work to pay for one program per stage
    # 'stage': the swept layers of each stage (without prefix reuse: one stage, 0).
    self.stage_layers: dict[int, tuple[str, ...]] = {}
    for name in self.layer_names:
      stage = stage_of(model, name) if self.use_prefix else 0
      self.stage_layers[stage] = self.stage_layers.get(stage, ()) + (name,)
    kernels = [layers_lib.get_kernel(variables, n) for n in self.layer_names]
    self.flat_size = max(int(np.prod(k.shape)) for k in kernels)
    self.flat_dtype = np.result_type(*[k.dtype for k in kernels])  # (float64 kernels stay exact)

  def prefix(self, stage: int) -> list:
    """Activations entering ``stage`` for every eval batch.

    Cached for the ``workers`` most recently used stages (layers run in network
    order, so concurrent workers need at most that many), or, with the
    ``'stage'`` strategy when they fit in :data:`_MAX_PREFIX_BYTES`, for every
    stage at once from one program; thread-safe.
    """
    if stage == 0:
      return [images for images, _, _ in self.batches]
    with self._lock:
      if stage in self._prefixes:
        self._prefixes[stage] = self._prefixes.pop(stage)  # most recent last
        return self._prefixes[stage]
      if self._all_prefixes():
        stages, run = self.prefixes_fn()
        outs = [run(self.variables, images) for images, _, _ in self.batches]
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
      hs = [images for images, _, _ in self.batches]
    else:
      if self.strategy == "stage":
        run = self.prefix_fn(stage)
      else:
        key = (id(self.model), stage)
        if key not in _PREFIX_FNS:
          model = self.model
          _PREFIX_FNS[key] = (model, jax.jit(lambda v, x: model.apply(v, x, stop=stage)))
        run = _PREFIX_FNS[key][1]
      if self.mesh is None:
        hs = [run(self.variables, images) for images, _, _ in self.batches]
      else:  # Replicated inputs: every device computes the prefix; the output is replicated.
        hs = [run(self.variables, distributed.replicate(images, self.mesh))
              for images, _, _ in self.batches]
    return hs

  def eval_fn(self, layer: str, stage: int) -> Callable:
    """jit: ``(variables, kernels (P, ...), h, labels, mask) -> (correct (P,), loss_sum (P,))``."""
    key = (id(self.model), layer, stage, self.step)
    if key not in _EVAL_FNS:
      _EVAL_FNS[key] = (self.model, jax.jit(eval_program(self.model, layer, stage, self.step)))
    return _EVAL_FNS[key][1]

  def stage_of(self, layer: str) -> int:
    """The stage ``layer`` is evaluated from (0 without prefix reuse)."""
    return stage_of(self.model, layer) if self.use_prefix else 0

  def stage_fn(self, stage: int) -> Callable:
    """:func:`stage_program` for ``stage``, compiled (once) for :attr:`chunk` copies.

    Thread-safe: concurrent callers share one compilation (see :meth:`precompile`).
    """
    key = (id(self.model), "stage", stage, self.stage_layers[stage], self.chunk,
           self.flat_size)
    return self._compiled(key, lambda: self._compile_stage(stage))

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
    model = self.model

    def run(v, x):
      out, h, at = [], x, 0
      for st in stages:
        h = model.apply(v, h, start=at, stop=st)
        out.append(h)
        at = st
      return tuple(out)

    return stages, run

  def prefixes_fn(self) -> tuple[tuple[int, ...], Callable]:
    """The stages after 0 and ``(variables, images) -> (their inputs...)``, compiled once."""
    stages, run = self._prefixes_program()
    images = self.batches[0][0]
    key = (id(self.model), "prefixes", stages, images.shape, str(images.dtype))
    return stages, self._compiled(key, lambda: jax.jit(run).lower(self.variables,
                                                                  images).compile())

  def prefix_fn(self, stage: int) -> Callable:
    """``(variables, images) -> activations entering stage``, compiled (once)."""
    images = self.batches[0][0]
    key = (id(self.model), "prefix", stage, images.shape, str(images.dtype))
    return self._compiled(key, lambda: jax.jit(
        lambda v, x: self.model.apply(v, x, stop=stage)).lower(self.variables, images).compile())

  def _compiled(self, key: tuple, build: Callable[[], Callable]) -> Callable:
    """``build()``'s result, built once per ``key`` however many threads ask at once."""
    with _STAGE_LOCK:
      entry = _STAGE_FNS.get(key)
      owner = entry is None
      if owner:
        entry = _STAGE_FNS[key] = (self.model, concurrent.futures.Future())
    future = entry[1]
    if owner:
      try:
        future.set_result(build())
      except BaseException as e:  # pylint: disable=broad-except
        with _STAGE_LOCK:
          _STAGE_FNS.pop(key, None)
        future.set_exception(e)
        raise
    return future.result()

  def _compile_stage(self, stage: int) -> Callable:
    images, labels, mask = self.batches[0]
    h = images if stage == 0 else jax.eval_shape(
        lambda v, x: self.model.apply(v, x, stop=stage), self.variables, images)
    flats = jax.ShapeDtypeStruct((self.chunk, self.flat_size), self.flat_dtype)
    which = jax.ShapeDtypeStruct((), jnp.int32)
    program = jax.jit(stage_program(self.model, stage, self.stage_layers[stage]))
    return program.lower(self.variables, flats, which, h, labels, mask).compile()

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
        jobs += ([self.prefixes_fn] if self._all_prefixes() else
                 [functools.partial(self.prefix_fn, st) for st in stages if st > 0])
      for job in jobs:
        if stop.is_set():
          return
        try:
          job()
        except Exception:  # pylint: disable=broad-except
          return  # (raised again where the program is needed)

    threading.Thread(target=work, name="safer_jax-precompile", daemon=False).start()

  def evaluate_kernels(self, layer: str, kernels: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy and mean loss of ``P`` perturbed copies (kernels stacked on axis 0).

    With the ``'stage'`` strategy the copies are padded to :attr:`chunk` (one
    compiled shape per stage); the first ``P`` results are returned.
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
    correct = np.zeros(kernels.shape[0], np.float32)
    loss = np.zeros(kernels.shape[0], np.float32)
    for h, (_, labels, mask) in zip(hs, self.batches):
      c, l = fn(self.variables, kernels, h, labels, mask)
      correct, loss = correct + np.asarray(c), loss + np.asarray(l)
    return correct / self.n, loss / self.n

  def _evaluate_stage(self, layer: str, stage: int,
                      kernels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    count = kernels.shape[0]
    size = max(self.chunk, count)
    flats = np.zeros((size, self.flat_size), self.flat_dtype)
    flats[:count, :kernels[0].size] = kernels.reshape(count, -1)
    flats[count:, :kernels[0].size] = kernels[-1].reshape(-1)  # pad with the last copy
    which = np.int32(self.stage_layers[stage].index(layer))
    fn = self.stage_fn(stage)
    correct = np.zeros(size, np.float32)
    loss = np.zeros(size, np.float32)
    for h, (_, labels, mask) in zip(self.prefix(stage), self.batches):
      c, l = fn(self.variables, flats, which, h, labels, mask)
      correct, loss = correct + np.asarray(c), loss + np.asarray(l)
    return correct[:count] / self.n, loss[:count] / self.n

  def _evaluate_global(self, fn: Callable, stage: int,
                       kernels: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """Multi-process :meth:`evaluate_kernels`: copies over every process's devices.

    ``kernels`` (P, ...) is this process's full host copy (the same in every
    process). With P a multiple of the global device count it is split over
    ``'copies'`` (each process copies only its devices' rows), otherwise (the
    baseline's single copy) replicated; the (P,) results are gathered into
    every process.
    """
    kernels = distributed.shard_batch(kernels, self.mesh, axis=COPIES_AXIS)
    correct = loss = None
    for h, (labels, mask) in zip(self.prefix(stage), self.labels_masks):
      h = distributed.place_replicated(h, self.mesh)  # Stage 0: the images (NumPy).
      c, l = fn(self.variables, kernels, h, labels, mask)
      # c rather than 0 + c (non-negative sums: the same numbers as `evaluate_kernels`).
      correct, loss = (c, l) if correct is None else (correct + c, loss + l)
    correct, loss = multihost_utils.process_allgather((correct, loss), tiled=True)
    return np.asarray(correct) / self.n, np.asarray(loss) / self.n


def check_variables(variables: Mapping[str, Any]) -> None:
  """Raises ValueError naming the first leaf with NaN or inf (see :func:`layers.check_finite`)."""
  layers_lib.check_finite(variables)


_MAX_PREFIX_BYTES = 1 << 30  # every stage's input at once ('stage' strategy), if it fits
_MAX_PADDED = 1 << 24  # elements of the shared padded layout (64 MiB in float32)


def padded_layout(variables: Mapping[str, Any], layers: Sequence[str]) -> tuple[int, int]:
  """``(R, C)``: powers of two holding every kernel of ``layers`` as a (rows, channels) matrix.

  A kernel of shape ``(..., c)`` is the ``(n / c, c)`` matrix of its rows (all
  axes but the last, flattened) by output channels.
  """
  shapes = [layers_lib.get_kernel(variables, name).shape for name in layers]
  rows = max(int(np.prod(s[:-1])) for s in shapes)
  cols = max(int(s[-1]) for s in shapes)
  return 1 << max(rows - 1, 0).bit_length(), 1 << max(cols - 1, 0).bit_length()


def _padded_kind(family: str, options: Mapping[str, Any]) -> str | None:
  """How ``family`` runs on the padded layout: ``'matrix'``, ``'flat'``, or None (per shape)."""
  if (family in ("quantize", "bitflip") and options.get("axis", -1) in (-1, None)
      and options.get("group_size") is None):
    return "matrix"  # per output channel (or per tensor): zero padding changes no scale
  if family == "prune" and options.get("method", "magnitude") == "magnitude":
    return "flat"
  return None


def perturb_stack(family: str, options: Mapping[str, Any],
                  layout: tuple[int, int] | None = None) -> Callable:
  """``(kernel, magnitudes [P floats], keys (P,), grad) -> kernels (P, *kernel.shape)`` (NumPy).

  The family's function on every cell, the same numbers as :func:`naive_sweep`'s
  one call per cell (bit for bit; ``bench_sweep`` and tests/test_sweep.py check
  it), compiled as little as possible:

  * with ``layout`` (:func:`padded_layout`), quantization and bit flips run on
    the kernel zero padded into that matrix, so every layer shares one compiled
    program per family (padding with zeros changes no per-channel or per-tensor
    maximum or minimum), and magnitude pruning on the flat kernel padded to its
    size bucket (:func:`safer_jax.perturb.flat_bucket`; padding ranks last).
    Binary quantization (1 bit, whose scale is a mean) stays per shape.
  * families that draw their randomness apart (:func:`safer_jax.perturb.split_draws`:
    bit flips, noise) draw all ``P`` cells' rows in one call, compiled once per
    flat size bucket: the PRNG is what made per-shape programs slow to compile.
  * everything else: the family function per cell, compiled once per kernel shape.
  """
  fam = perturb.get_family(family)
  opts = dict(options)

  def stack(kernel, magnitudes, keys, grad):
    shape, n = kernel.shape, int(np.prod(kernel.shape))
    fits = layout is not None and n // shape[-1] <= layout[0] and shape[-1] <= layout[1]
    kind = _padded_kind(family, opts) if fits else None
    rows = None
    if perturb.split_draws(fam, opts):
      rows = np.asarray(fam.draw(keys, jnp.asarray(magnitudes, jnp.float32),
                                 perturb.flat_bucket(n), **opts))
    if kind is not None:
      r, c = n // shape[-1], shape[-1]
      host = np.asarray(kernel)
      padded = np.zeros(layout, host.dtype)
      padded[:r, :c] = host.reshape(r, c)
      if kind == "flat":  # (a sort: a size bucket per kernel, not the largest layout)
        flat = np.zeros(perturb.flat_bucket(n), host.dtype)
        flat[:n] = host.reshape(-1)

    out = [None] * len(magnitudes)
    if kind == "flat":
      pruned = np.asarray(perturb.prune_magnitude_padded(
          flat, np.asarray(magnitudes, np.float32), n))
      out = [row[:n].reshape(shape) for row in pruned]
    elif kind == "matrix":
      todo = [i for i, m in enumerate(magnitudes) if not (family == "quantize" and m == 1)]
      if family == "quantize" and todo:
        bits = np.asarray([magnitudes[i] for i in todo], np.float32)
        perturb.validate_magnitude("quantize", bits)
        done = np.asarray(perturb.quantize_many(padded, bits, **opts))
      elif todo:
        masks = np.zeros((len(todo), *layout), rows.dtype)
        masks[:, :r, :c] = rows[todo, :n].reshape(len(todo), r, c)
        done = np.asarray(perturb.bitflip_many(padded, masks, **opts))
      for j, i in enumerate(todo):
        out[i] = done[j, :r, :c].reshape(shape)
    for i, m in enumerate(magnitudes):  # the rest: the family function, per shape
      if out[i] is None:
        out[i] = np.asarray(fam.apply(kernel, m, rows[i], grad=grad, **opts) if rows is not None
                            else fam.fn(kernel, m, keys[i], grad=grad, **opts))
    return np.stack(out)

  return stack


def loss_gradients(model: Any, variables: Mapping[str, Any], split: data_lib.Split,
                   batch_size: int = 1024) -> dict:
  """Gradient of the mean cross-entropy on ``split`` w.r.t. ``variables['params']``."""
  model, variables = wrapping.as_model(model, variables)
  apply = apply_fn(model)
  n = len(split)

  @jax.jit
  def grad_sum(params, images, labels, mask):
    def f(p):
      logits = apply({**variables, "params": p}, images)
      return jnp.sum(cross_entropy(logits, labels) * mask)
    return jax.grad(f)(params)

  total = None
  for images, labels, mask in eval_batches(split, batch_size):
    g = grad_sum(variables["params"], images, labels, mask)
    total = g if total is None else jax.tree.map(jnp.add, total, g)
  return jax.tree.map(lambda x: x / n, total)


def fingerprint(variables: Mapping[str, Any], split: data_lib.Split, config: SweepConfig,
                extra: Mapping[str, Any] | None = None) -> str:
  """A hash of what determines the table: weights, eval data, grids, seeds, options."""
  from safer_jax.zoo import checksum  # pylint: disable=import-outside-toplevel
  record = {"weights": checksum(variables),
            "data": hashlib.sha256(np.ascontiguousarray(split.images).tobytes()
                                   + split.labels.tobytes()).hexdigest(),
            "grids": config.grids(), "seeds": list(config.seeds),
            "options": {k: dict(v) for k, v in config.family_options.items()},
            "extra": dict(extra or {})}
  return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def _load_partial(results_path: str | None, fp: str) -> pd.DataFrame:
  if not results_path or not os.path.exists(results_path):
    return pd.DataFrame(columns=COLUMNS)
  meta_path = results_path + ".fingerprint"
  stored = open(meta_path, encoding="utf-8").read().strip() if os.path.exists(meta_path) else ""
  if stored != fp:
    raise errors.ConfigError(
        f"{results_path} holds results of a different sweep setup (weights, data, grids, seeds "
        f"or options differ). Delete it or use another workdir.")
  return io.read_csv(results_path)  # exact floats: a resumed table equals an uninterrupted one


def run_sweep(model: Any, variables: Mapping[str, Any] | None, split: data_lib.Split,
              config: SweepConfig = SweepConfig(), *, results_path: str | None = None,
              progress: bool = True, grads: Mapping[str, Any] | None = None) -> pd.DataFrame:
  """Runs the sensitivity sweep; returns (and optionally saves) the tidy table.

  Args:
    model: a staged zoo model (prefix reuse), a :func:`safer_jax.wrap`-ped
      model (linen, nnx or apply function), an ``nnx.Module`` (wrapped here),
      a linen module, or any ``apply_fn(variables, images (B, H, W, C)) ->
      logits (B, K)`` (full forwards). Always run in inference mode.
    variables: model variables (``params`` and, if any, ``batch_stats``);
      ``None`` for a wrapped or nnx model (its own variables).
    split: held-out data (:class:`~safer_jax.data.Split`).
    config: families, grids, seeds, layers and chunking.
    results_path: CSV path; enables resuming (see module docstring).
    progress: show cells done / total and an ETA.
    grads: loss gradient w.r.t. params for the ``'corrupt'`` family (computed
      on ``split`` with :func:`loss_gradients` if needed and not given).

  Returns:
    DataFrame with :data:`COLUMNS`, sorted by layer order, family, magnitude
    index and seed. ``accuracy`` is a fraction, ``loss`` in nats/example.

  Raises:
    ValueError: unknown family, magnitude out of range, layer pattern matching
      nothing, NaN/inf weights, an empty split, ``eval_batch_size`` < 1, or a
      results file of another setup (:class:`~safer_jax.errors.ConfigError`).
    safer_jax.errors.Interrupted: Ctrl-C (a ``KeyboardInterrupt``); every layer
      finished by then is saved to ``results_path`` first, for a rerun to resume.

  The table's ``attrs`` hold ``baseline_accuracy``, ``baseline_loss``, and
  ``reused_cells`` / ``computed_cells``: rows read back from ``results_path``
  vs evaluated in this call.
  """
  model, variables = wrapping.as_model(model, variables)
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
  check_variables(variables)
  layer_names = _ordered_layers(model, variables, split, config.layers)
  fp = fingerprint(variables, split, config)
  done = _load_partial(results_path, fp)
  finished = {(r.layer, r.family, int(r.magnitude_index), int(r.seed))
              for r in done.itertuples()}
  plan = _plan(layer_names, config, finished)
  if config.memory_budget_bytes is not None:  # pick max_parallel / eval_batch_size
    config = auto_chunking(model, variables, split, config, layer_names, finished, plan=plan)
  if "corrupt" in grids and grads is None:
    grads = loss_gradients(model, variables, split, config.eval_batch_size)

  engine = _Engine(model, variables, split, config, layer_names,
                   cells=sum(len(g[2]) for _, groups in plan for g in groups))

  per_layer = [sum(len(g[2]) for g in groups) for _, groups in plan]
  total = sum(per_layer)
  first = layer_names[0]
  # The unperturbed model: with the 'stage' strategy an extra copy in the first layer's
  # first chunk (when that layer is to do), else one evaluation of its own.
  fold = engine.strategy == "stage" and bool(plan) and plan[0][0] == first
  if fold:
    per_layer[0] += 1
  # One chunk size for every layer: each layer's suffix compiles once.
  chunk = min(config.max_parallel, max(per_layer, default=1))
  chunk = -(-chunk // engine.num_devices) * engine.num_devices  # whole copies per device
  if engine.step and chunk > engine.step and engine.strategy == "layer":
    # whole steps per chunk: one loop body, no remainder
    up = -(-chunk // engine.step) * engine.step
    chunk = up if up <= config.max_parallel else chunk // engine.step * engine.step
  engine.chunk = chunk
  stop = threading.Event()  # Ctrl-C: layers still running stop at their next chunk
  first_kernel = np.asarray(layers_lib.get_kernel(variables, first))
  layout = padded_layout(variables, layer_names)
  if layout[0] * layout[1] > _MAX_PADDED:  # e.g. one huge embedding: per-shape programs
    layout = None
  if engine.strategy == "stage":
    engine.precompile(list(dict.fromkeys(
        [engine.stage_of(first)] + [engine.stage_of(layer) for layer, _ in plan])), stop)
  base: list[float] = []
  if not fold:
    baseline = engine.evaluate_kernels(first, first_kernel[None])
    base += [float(baseline[0][0]), float(baseline[1][0])]
  bar = Progress(total, "sweep", enabled=progress and total > 0, unit="cell")
  rows = [done] if len(done) else []
  lock = threading.Lock()

  def run_layer(layer, groups) -> tuple[pd.DataFrame, tuple[float, float] | None] | None:
    """Perturbs ``layer`` for every cell of ``groups`` and evaluates the copies, chunk by chunk.

    Returns the layer's rows (drops not yet filled in) and, when the baseline is
    folded into this layer, its (accuracy, loss).
    """
    kernel = jnp.asarray(layers_lib.get_kernel(variables, layer))
    grad = None if grads is None else layers_lib.get_kernel(grads, layer)
    with_base = fold and layer == first
    stacks, meta = ([first_kernel[None]] if with_base else []), []
    for family, opts, todo in groups:
      mags = [c[0] for c in todo]
      keys = (cell_keys([c[2] for c in todo], layer, family, [c[1] for c in todo])
              if is_stochastic(family, opts) else [None] * len(todo))
      stacks.append(perturb_stack(family, opts, layout)(kernel, mags, keys, grad))
      meta += [(family, *c) for c in todo]
    kernels = np.concatenate(stacks)  # on the host: copies are gathered into chunks there
    count = len(kernels)
    accs, losses = [], []
    for lo in range(0, count, chunk):
      if stop.is_set():
        return None
      idx = np.arange(lo, lo + chunk).clip(max=count - 1)  # pad with the last copy
      a, l = engine.evaluate_kernels(layer, kernels[idx])
      valid = min(chunk, count - lo)
      accs.append(a[:valid])
      losses.append(l[:valid])
      with lock:
        bar.update(valid - (with_base and lo == 0), postfix=layer)
    acc, loss = np.concatenate(accs), np.concatenate(losses)
    own = (float(acc[0]), float(loss[0])) if with_base else None
    acc, loss = acc[int(with_base):], loss[int(with_base):]
    frame = pd.DataFrame({
        "layer": layer, "family": [m[0] for m in meta], "magnitude": [m[1] for m in meta],
        "magnitude_index": [m[2] for m in meta], "seed": [m[3] for m in meta],
        "accuracy": acc, "loss": loss, "accuracy_drop": np.nan, "loss_increase": np.nan,
        "num_params": int(kernel.size)})
    return frame, own

  def finish(result) -> pd.DataFrame:
    """The layer's rows with the drops filled in (the first result may bring the baseline)."""
    frame, own = result
    if own is not None:
      base[:] = own
    frame["accuracy_drop"] = base[0] - frame["accuracy"].to_numpy()
    frame["loss_increase"] = frame["loss"].to_numpy() - base[1]
    return frame

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
      _save(results_path, _sorted(saved, layer_names, list(grids)), fp)
    raise errors.Interrupted(len(saved) if results_path else 0, results_path) from None
  finally:
    stop.set()  # (also ends the precompiling thread)
    pool.shutdown(cancel_futures=True)
  bar.close()
  table = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=COLUMNS)
  table = _sorted(table, layer_names, list(grids))
  base_acc, base_loss = base
  table.attrs.update(baseline_accuracy=base_acc, baseline_loss=base_loss,
                     reused_cells=len(done), computed_cells=len(table) - len(done))
  if results_path:
    _save(results_path, table, fp)
  return table


def _plan(layer_names: Sequence[str], config: SweepConfig, finished: set = frozenset()) -> list:
  """The cells still to do: ``[(layer, [(family, options, [(magnitude, index, seed)]), ...])]``.

  Layers in network order (consecutive layers share a stage's prefix), only those with
  cells left; ``finished`` holds ``(layer, family, magnitude_index, seed)`` of done cells.
  """
  plan = []
  for layer in layer_names:
    groups = []
    for family, grid in config.grids().items():
      opts = config.family_options.get(family, {})
      todo = [c for c in cells(layer, family, grid, config.seeds, opts)
              if (layer, family, c[1], c[2]) not in finished]
      if todo:
        groups.append((family, opts, todo))
    if groups:
      plan.append((layer, groups))
  return plan


def auto_chunking(model: Any, variables: Mapping[str, Any], split: data_lib.Split,
                  config: SweepConfig, layer_names: Sequence[str],
                  finished: set = frozenset(), *, plan: list | None = None) -> SweepConfig:
  """``config`` with ``max_parallel`` / ``eval_batch_size`` fitting ``config.memory_budget_bytes``.

  See :func:`safer_jax.memory.plan_chunking`: the budget is per device; with
  ``shard`` over ``D`` devices each holds ``max_parallel / D`` copies.

  Args:
    layer_names: the swept layers, in network order.
    finished: ``(layer, family, magnitude_index, seed)`` cells already done.
    plan: :func:`_plan` of these (computed if not given).

  Raises:
    ValueError: the budget does not fit one copy of one example (sizes stated).
  """
  from safer_jax import memory  # pylint: disable=import-outside-toplevel
  if plan is None:
    plan = _plan(layer_names, config, finished)
  copies = dict.fromkeys(layer_names, 0)
  copies.update({layer: sum(len(g[2]) for g in groups) for layer, groups in plan})
  layer_names = [l for l in layer_names if copies[l]] or list(layer_names[:1])
  devices = max(len(copies_devices(config)), 1)
  sharded = devices > 1
  cap = min(config.max_parallel, max(max(copies.values(), default=1), 1))
  # The 'corrupt' family keeps the loss gradient (one parameter tree) on the device.
  extra = memory.tree_bytes(variables["params"]) if "corrupt" in config.families else 0
  plan = memory.plan_chunking(
      model, variables, split.images.shape[1:], layer_names, config.memory_budget_bytes,
      max_parallel=-(-cap // devices), eval_batch_size=config.eval_batch_size,
      num_examples=len(split), copies=copies, margin=config.memory_margin, extra_bytes=extra,
      use_prefix=config.use_prefix, copies_per_step=engine_step(config, sharded))
  return dataclasses.replace(config, max_parallel=plan.max_parallel * (devices if sharded else 1),
                             eval_batch_size=plan.eval_batch_size)


def _sorted(table: pd.DataFrame, layer_order: list[str], family_order: list[str]) -> pd.DataFrame:
  table = table.assign(_l=table["layer"].map({n: i for i, n in enumerate(layer_order)}),
                       _f=table["family"].map({n: i for i, n in enumerate(family_order)}))
  table = table.sort_values(["_l", "_f", "magnitude_index", "seed"], kind="stable")
  return table.drop(columns=["_l", "_f"]).reset_index(drop=True)[COLUMNS]


def _save(path: str, table: pd.DataFrame, fp: str) -> None:
  """Writes the table (exact floats, so reused rows are written as recomputed ones would be)."""
  io.write_text(path + ".fingerprint", fp)
  io.write_csv(path, table, exact=True)


def naive_sweep(model: Any, variables: Mapping[str, Any] | None, split: data_lib.Split,
                config: SweepConfig = SweepConfig(), *, progress: bool = True,
                grads: Mapping[str, Any] | None = None) -> pd.DataFrame:
  """The reference: a Python loop, one jitted full evaluation per perturbed model.

  Same cells, keys and table as :func:`run_sweep`, computed the plain way: the
  family function on one kernel, :func:`safer_jax.layers.replace_kernel`, and
  :func:`safer_jax.train.evaluate` on the full model.
  Used by tests and by the ``bench_sweep`` experiment.
  """
  from safer_jax.train import evaluate  # pylint: disable=import-outside-toplevel
  model, variables = wrapping.as_model(model, variables)
  grids = config.grids()
  check_variables(variables)
  apply = apply_fn(model)
  layer_names = _ordered_layers(model, variables, split, config.layers)
  if "corrupt" in grids and grads is None:
    grads = loss_gradients(model, variables, split, config.eval_batch_size)
  base = evaluate(apply, variables, split, config.eval_batch_size)
  todo = [(layer, family, c) for layer in layer_names for family, grid in grids.items()
          for c in cells(layer, family, grid, config.seeds, config.family_options.get(family, {}))]
  bar = Progress(len(todo), "naive", enabled=progress, unit="cell")
  rows = []
  for layer, family, (mag, mi, seed) in todo:
    opts = config.family_options.get(family, {})
    kernel = layers_lib.get_kernel(variables, layer)
    grad = None if grads is None else layers_lib.get_kernel(grads, layer)
    new = perturb.get_family(family).fn(kernel, mag, cell_key(seed, layer, family, mi),
                                        grad=grad, **opts)
    m = evaluate(apply, layers_lib.replace_kernel(variables, layer, new), split,
                 config.eval_batch_size, check_finite=False)  # e.g. float32 bit flips: inf
    rows.append({"layer": layer, "family": family, "magnitude": mag, "magnitude_index": mi,
                 "seed": seed, "accuracy": m["accuracy"], "loss": m["loss"],
                 "accuracy_drop": base["accuracy"] - m["accuracy"],
                 "loss_increase": m["loss"] - base["loss"],
                 "num_params": int(layers_lib.get_kernel(variables, layer).size)})
    bar.update(1)
  bar.close()
  return _sorted(pd.DataFrame(rows, columns=COLUMNS), layer_names, list(grids))


def importance(table: pd.DataFrame, metric: str = "accuracy_drop") -> pd.DataFrame:
  """Per-layer importance per family: area under the (seed-averaged) ``metric`` curve.

  Magnitudes are placed at equally spaced positions in [0, 1], mildest first,
  and the curve is integrated with the trapezoid rule (a single magnitude:
  its value). Returns a DataFrame ``layer x family`` (layers in table order).
  """
  mean = table.groupby(["layer", "family", "magnitude_index"], sort=False)[metric].mean()
  out = {}
  for (layer, family), curve in mean.groupby(level=[0, 1], sort=False):
    values = curve.sort_index(level=2).to_numpy()
    if values.size == 1:
      out[(layer, family)] = float(values[0])
    else:
      x = np.linspace(0.0, 1.0, values.size)
      out[(layer, family)] = float(np.sum((values[1:] + values[:-1]) * np.diff(x)) / 2)
  frame = pd.Series(out).unstack()
  order = list(dict.fromkeys(table["layer"]))
  return frame.reindex(order)


def summary_stats(table: pd.DataFrame) -> pd.DataFrame:
  """Mean and std over seeds of accuracy drop and loss increase per (layer, family, magnitude)."""
  g = table.groupby(["layer", "family", "magnitude_index", "magnitude"], sort=False)
  out = g.agg(accuracy_drop=("accuracy_drop", "mean"), accuracy_drop_std=("accuracy_drop", "std"),
              loss_increase=("loss_increase", "mean"),
              loss_increase_std=("loss_increase", "std"), seeds=("seed", "count"))
  return out.reset_index().fillna({"accuracy_drop_std": 0.0, "loss_increase_std": 0.0})

