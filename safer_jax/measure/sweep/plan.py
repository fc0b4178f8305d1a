"""What a sweep computes: its settings, its cells and their PRNG keys.

A *cell* is one (layer, family, magnitude, seed) of the sweep's table.
Deterministic families (quantize, magnitude/structured prune, corrupt) do not
depend on the seed: they have one cell per magnitude, with ``seed = 0``.
Stochastic families (bitflip, noise, random prune) have one cell per seed; the
PRNG key of a cell is :func:`cell_key` (seed, layer, family, magnitude index),
so the table is identical across runs, chunk sizes and the naive loop.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from safer_jax.core import perturb

DEFAULT_FAMILIES = ("quantize", "prune", "bitflip", "noise")


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
      the whole table (see :func:`safer_jax.measure.sweep.engine.copies_devices`).
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
      (:func:`safer_jax.measure.memory.plan_chunking`), which is the ``'layer'``
      strategy's (a budget implies it under ``strategy='auto'``). The table
      equals that of a fixed chunking with the chosen sizes. None: the sizes
      as given.
    memory_margin: safety factor (>= 1) on the compiled call's estimate when
      ``memory_budget_bytes`` is set (other compilers and allocators differ).
    strategy: how perturbed copies are evaluated (the table does not depend on
      it beyond float rounding of the loss). ``'stage'``: one compiled program
      per *stage* (a staged zoo model's block; the whole network otherwise) that
      takes any of the stage's layers as its perturbed one, copies one after
      another (``lax.map``): few compilations, the fast first run on CPU. The
      layers of a stage that costs at most 5% more multiply-adds to run from the
      stage before it (resnet8's first block, after a stem of 2% of a forward)
      are evaluated in that stage's program (:func:`safer_jax.core.staged.stage_groups`).
      ``'layer'``: one program per layer, ``copies_per_step`` copies side by
      side (``vmap``): the wide batched calls accelerators want. ``'auto'``:
      ``'stage'`` on one CPU device without ``memory_budget_bytes`` (and, for
      sweeps of fewer than :data:`safer_jax.measure.sweep.engine.CELLS_PER_STAGE_PROGRAM`
      cells per stage program, one program for the whole network, as
      ``use_prefix=False``),
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
    """``{family: magnitudes}`` with default grids filled in, each validated (ValueError)."""
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
  """Whether ``family`` with ``options`` draws random numbers (one cell per seed)."""
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


def cell_plan(layer_names: Sequence[str], config: SweepConfig,
              finished: set = frozenset()) -> list:
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
