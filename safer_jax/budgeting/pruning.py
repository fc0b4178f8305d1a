"""Per-layer pruning ratios: cost tables s_l(r), allocations under a sparsity budget, pruned models.

The pruning counterpart of :mod:`safer_jax.budgeting.mixed_precision`. A *cost table* maps
``layer -> {ratio: cost}``; lower cost = less damage expected from pruning
that layer's kernel at that ratio (unstructured magnitude pruning,
:func:`safer_jax.core.perturb.prune`). :func:`safer_jax.budgeting.budget.allocate_ratios`
turns a table into the exact min-cost allocation under a global sparsity
target (:func:`ratios_for`), and :func:`prune_model` builds that model.

Sources of cost tables (``COST_SOURCES``), computed on calibration data:

* ``oracle`` — measured loss increase of pruning that layer alone at that
  ratio (the sensitivity sweep's ``prune`` family). One forward per (layer, ratio).
* ``magnitude`` — data-free Σ w² over the weights that ratio removes.
* ``fisher`` — Σ F_ii w_i² over the removed weights, F the diagonal empirical
  Fisher (:func:`safer_jax.budgeting.mixed_precision.fisher_diagonal`).

Fixed allocations (``FIXED_SOURCES``, no table): ``uniform``, ``erk``
(Erdős–Rényi-Kernel, RigL) and ``global_magnitude`` (one threshold for all layers).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from safer_jax.budgeting import budget
from safer_jax.budgeting import mixed_precision
from safer_jax.core import data as data_lib
from safer_jax.core import layers as layers_lib
from safer_jax.core import perturb
from safer_jax.core.progress import Progress
from safer_jax.measure import sweep
from safer_jax.training import train as train_lib

CostTable = dict[str, dict[float, float]]
FIXED_SOURCES = ("uniform", "erk", "global_magnitude")
COST_SOURCES = ("oracle", "magnitude", "fisher")


def magnitude_order(w: Any) -> np.ndarray:
  """Flat indices of ``w`` in pruning order (|w| ascending, ties: lower index first)."""
  return np.argsort(np.abs(np.asarray(w, np.float32)).reshape(-1), kind="stable")


def removed_cost_table(kernels: Mapping[str, Any], weights: Mapping[str, Any],
                       candidates: Sequence[float]) -> CostTable:
  """``{layer: {ratio: Σ weights_i over the entries magnitude pruning removes at ratio}}``.

  Args:
    kernels: ``{layer: kernel}`` (any shape); the pruning order is by ``|kernel|``.
    weights: ``{layer: per-entry cost}``, same shapes (e.g. ``w²``, or ``F w²``).
    candidates: pruning ratios in [0, 1]; the removed count is
      :func:`safer_jax.budgeting.budget.prune_count`.

  Returns:
    The cost table, summed in float64.
  """
  out = {}
  for name, w in kernels.items():
    order = magnitude_order(w)
    vals = np.asarray(weights[name], np.float64).reshape(-1)[order]
    csum = np.concatenate([[0.0], np.cumsum(vals)])
    out[name] = {float(r): float(csum[budget.prune_count(r, vals.size)]) for r in candidates}
  return out


def cost_tables(model: Any, variables: Mapping[str, Any], calib: data_lib.Split,
                candidates: Sequence[float], sources: Sequence[str] = COST_SOURCES, *,
                names: Sequence[str] | None = None, batch_size: int = 128,
                progress: bool = False) -> tuple[dict[str, CostTable], dict[str, float]]:
  """Cost tables ``{source: {layer: {ratio: cost}}}`` and each one's wall time (s).

  Args:
    model: a Flax module (``model.apply(variables, images) -> logits``).
    variables: its variables.
    calib: calibration data (not the eval split the accuracy is reported on);
      the ``fisher`` source uses all its full batches of ``batch_size``.
    candidates: pruning ratios, e.g. ``(0.0, 0.1, ..., 0.99)``.
    sources: names from :data:`COST_SOURCES` (others are ignored).
    names: the layers (``None``: every layer).
    batch_size: calibration batch size of the ``fisher`` source.
    progress: show tables done, and the oracle sweep's progress, on stderr.
  """
  if names is None:
    names = layers_lib.find_layers(variables)
  kernels = {n: np.asarray(layers_lib.get_kernel(variables, n)) for n in names}
  tables, seconds = {}, {}
  bar = Progress(len([s for s in sources if s in ("oracle", "magnitude", "fisher")]),
                 "cost tables", enabled=progress, unit="table")
  if "oracle" in sources:
    t0 = time.perf_counter()
    table = sweep.run_sweep(model, variables, calib, sweep.SweepConfig(
        families={"prune": tuple(candidates)}, seeds=(0,)), progress=progress)
    tables["oracle"] = {n: {float(r.magnitude): float(r.loss_increase)
                            for r in table[table.layer == n].itertuples()} for n in names}
    seconds["oracle"] = time.perf_counter() - t0
    bar.update(1, postfix=f"oracle {seconds['oracle']:.1f}s")
  if "magnitude" in sources:
    t0 = time.perf_counter()
    tables["magnitude"] = removed_cost_table(kernels, {n: w.astype(np.float64) ** 2
                                                       for n, w in kernels.items()}, candidates)
    seconds["magnitude"] = time.perf_counter() - t0
    bar.update(1, postfix=f"magnitude {seconds['magnitude']:.1f}s")
  if "fisher" in sources:
    t0 = time.perf_counter()
    batches = data_lib.batches_from_split(calib, batch_size, max(1, len(calib) // batch_size))
    diag = mixed_precision.fisher_diagonal(train_lib.classifier_loss_fn(model, variables),
                                           variables["params"], batches, names)
    tables["fisher"] = removed_cost_table(
        kernels, {n: np.asarray(diag[n], np.float64) * kernels[n].astype(np.float64) ** 2
                  for n in names}, candidates)
    seconds["fisher"] = time.perf_counter() - t0
    bar.update(1, postfix=f"fisher {seconds['fisher']:.1f}s")
  bar.close()
  return tables, seconds


def ratios_for(source: str, target: float, kernels: Mapping[str, Any],
               tables: Mapping[str, CostTable], candidates: Sequence[float]) -> dict[str, float]:
  """Per-layer pruning ratios of ``source`` at the global sparsity ``target``.

  Args:
    source: one of :data:`FIXED_SOURCES` (no table needed) or a key of ``tables``.
    target: global sparsity, the fraction of all kernel weights removed, in [0, 1].
    kernels: ``{layer: kernel}``.
    tables: cost tables (see :func:`cost_tables`); a cost-guided source is solved
      exactly over ``candidates`` by :func:`safer_jax.budgeting.budget.allocate_ratios`.
    candidates: the ratios a cost-guided allocation may pick.

  Returns:
    ``{layer: ratio}``.

  Raises:
    ValueError: e.g. a target unreachable with the candidate ratios.
  """
  sizes = {n: int(w.size) for n, w in kernels.items()}
  if source == "uniform":
    return budget.uniform_ratios(sizes, target)
  if source == "erk":
    return budget.erk_ratios({n: w.shape for n, w in kernels.items()}, target)
  if source == "global_magnitude":
    return budget.global_magnitude_ratios(kernels, target)
  return budget.allocate_ratios(tables[source], sizes, candidates, target)


def prune_model(variables: Mapping[str, Any], ratios: Mapping[str, float]) -> dict:
  """Variables with each listed layer's kernel magnitude-pruned at ``ratios[layer]``.

  Unstructured :func:`safer_jax.core.perturb.prune` (the smallest ``|w|`` of the
  kernel); other leaves are unchanged.
  """
  return layers_lib.map_kernels(
      variables, lambda _, w, r: perturb.prune(jnp.asarray(w), float(r)), ratios)
