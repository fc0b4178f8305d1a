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
  :mod:`safer_jax.zoo.models.common`) the activations entering the stage that holds
  layer ``l`` are computed once and only the suffix is re-run per copy. For an
  arbitrary ``apply_fn`` the engine falls back to full forwards.
* **No branch over layers** — each layer gets its own compiled function (a
  ``lax.switch`` over layers under ``vmap`` would compute every branch).

Deterministic families (quantize, magnitude/structured prune, corrupt) do not
depend on the seed: they are evaluated once and reported with ``seed = 0``.
Stochastic families (bitflip, noise, random prune) get one row per seed; the
PRNG key of a cell is :func:`cell_key` (seed, layer, family, magnitude index),
so the table is identical across runs, chunk sizes and the naive loop.

Resumable: with ``results_path`` a restarted sweep skips finished cells, and
Ctrl-C saves the finished layers first (see :mod:`~safer_jax.measure.sweep.orchestrate`).

Modules: :mod:`~safer_jax.measure.sweep.plan` (settings, cells, keys),
:mod:`~safer_jax.measure.sweep.perturbed` (stacks of perturbed kernels),
:mod:`~safer_jax.measure.sweep.engine` (compiled programs, their evaluation, devices),
:mod:`~safer_jax.measure.sweep.orchestrate` (:func:`run_sweep`, resume, threads,
:func:`naive_sweep`), :mod:`~safer_jax.measure.sweep.tables` (the table and its
analysis). Running a model from a stage: :mod:`safer_jax.core.staged`.
"""


from safer_jax.core.staged import (apply_fn, eval_batches, eval_program, execution_trace,
                                   masked_scores, ordered_layers, stage_groups, stage_of,
                                   stage_program)
from safer_jax.measure.sweep.engine import (CELLS_PER_STAGE_PROGRAM, COPIES_AXIS, STRATEGIES,
                                            Engine, ProgramCache, copies_devices, engine_step,
                                            engine_strategy, engine_workers)
from safer_jax.measure.sweep.orchestrate import (auto_chunking, clear_compiled, fingerprint,
                                                 naive_sweep, programs_for, run_sweep)
from safer_jax.measure.sweep.perturbed import loss_gradients, padded_layout, perturb_stack
from safer_jax.measure.sweep.plan import (DEFAULT_FAMILIES, SweepConfig, cell_keys, cell_key,
                                          cell_plan, cells, is_stochastic)
from safer_jax.measure.sweep.tables import COLUMNS, importance, sorted_table, summary_stats

__all__ = [
    "COLUMNS", "CELLS_PER_STAGE_PROGRAM", "COPIES_AXIS", "DEFAULT_FAMILIES", "STRATEGIES",
    "Engine", "ProgramCache", "SweepConfig",
    "apply_fn", "auto_chunking", "cell_key", "cell_keys", "cell_plan", "cells",
    "clear_compiled", "copies_devices", "engine_step", "engine_strategy",
    "engine_workers", "eval_batches", "eval_program", "execution_trace", "fingerprint",
    "importance",
    "is_stochastic", "loss_gradients", "masked_scores", "naive_sweep", "ordered_layers",
    "padded_layout", "perturb_stack", "programs_for", "run_sweep", "sorted_table",
    "stage_groups", "stage_of", "stage_program", "summary_stats",
]
