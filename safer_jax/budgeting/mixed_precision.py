"""Mixed-precision quantization: per-layer sensitivity tables s_l(b) and the models they give.

A *cost table* maps ``layer -> {bits: cost}``; lower cost = less damage expected
from quantizing that layer to that width. :func:`safer_jax.budgeting.budget.allocate_bits`
turns a table into the exact min-cost allocation under a size budget, and
:func:`quantize_model` builds that model (per-output-channel symmetric
round-to-nearest, :func:`safer_jax.core.perturb.quantize`).

Sources of cost tables (``COST_SOURCES``), each computed on calibration batches:

* ``oracle`` — measured: loss increase when that layer alone is quantized
  (the sensitivity sweep's quantize family). One forward per (layer, bits).
* ``hawq`` — HAWQ-V2: Tr(H_l)/n_l · ||Q_b(W_l) − W_l||², trace by Hutchinson.
* ``fisher`` — diagonal empirical Fisher: Σ_i E_x[g_i²] (Q_b(w)_i − w_i)²
  (per-example gradients by ``vmap``).
* ``corruption`` — Zhang et al.'s first-order bound ||g_l||₂ · ||Q_b(W_l) − W_l||₂
  (the worst loss increase of a corruption of that norm).
* ``integrated_gradients`` — Σ|IG| along the path from Q_b(W_l) to W_l (SInGE-style).
* ``quant_error`` — data-free ||Q_b(W_l) − W_l||².
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from safer_jax import criteria
from safer_jax.budgeting import budget
from safer_jax.core import data as data_lib
from safer_jax.core import layers as layers_lib
from safer_jax.core import perturb
from safer_jax.core import tasks as tasks_lib
from safer_jax.core import wrapping
from safer_jax.core.progress import Progress
from safer_jax.measure import sweep
from safer_jax.training import train as train_lib

CostTable = dict[str, dict[int, float]]
COST_SOURCES = ("oracle", "hawq", "fisher", "corruption", "integrated_gradients", "quant_error")


def quant_errors(params, names: Sequence[str], candidates: Sequence[int], *,
                 full_range: bool = True, group_size: int | None = None) -> dict:
  """``{layer: {bits: Q_b(W) - W}}`` (arrays, kernel shape); options of :func:`perturb.quantize`."""
  out = {}
  for name in names:
    w = jnp.asarray(layers_lib.get_kernel(params, name))
    out[name] = {int(b): perturb.quantize(w, int(b), full_range=full_range,
                                          group_size=group_size) - w for b in candidates}
  return out


def fisher_diagonal(loss_fn: Callable, params, batches: Sequence[Mapping[str, Any]],
                    names: Sequence[str], chunk_size: int = 16) -> dict[str, jax.Array]:
  """E_x[g_x²] per kernel entry (:func:`safer_jax.criteria.fisher_diagonal`), ``chunk_size`` at a time.

  Each batch is cut into consecutive pieces of ``chunk_size`` examples, each
  piece one ``vmap`` of per-example gradients (per-example gradients of a whole
  batch of a depthwise-conv model take tens of GB); cost: one backward per example.

  Raises:
    ValueError: no examples in ``batches`` (the mean would be NaN) or ``chunk_size`` < 1.
  """
  if chunk_size < 1:
    raise ValueError(f"chunk_size={chunk_size} must be >= 1.")
  pieces = [{k: v[lo:lo + chunk_size] for k, v in batch.items()} for batch in batches
            for lo in range(0, int(jax.tree.leaves(batch)[0].shape[0]), chunk_size)]
  return criteria.fisher_diagonal(loss_fn, params, pieces, names)


def cost_tables(model: Any, variables: Mapping[str, Any], calib: data_lib.Split,
                candidates: Sequence[int], sources: Sequence[str] = COST_SOURCES, *,
                batch_size: int = 128, max_batches: int = 2, seed: int = 0,
                hutchinson_probes: int = 32, ig_steps: int = 8, full_range: bool = True,
                group_size: int | None = None, progress: bool = False,
                task: Any = None,
                layers: Sequence[str] | None = None) -> tuple[dict[str, CostTable], dict[str, float]]:
  """Cost tables ``{source: {layer: {bits: cost}}}`` and each source's wall time (s).

  Args:
    model: zoo model, :func:`safer_jax.wrap`-ped model, ``nnx.Module`` or
      apply function.
    variables: its variables (``None`` for a wrapped or nnx model).
    calib: calibration data (not the eval split the final accuracy is measured on).
    candidates: bit widths, e.g. ``(2, 3, 4, 5, 6, 8)``.
    sources: names from :data:`COST_SOURCES`.
    batch_size: calibration batch size; ``max_batches`` batches are used.
    seed: PRNG seed of the Hutchinson probes.
    hutchinson_probes: Hutchinson probes of the ``hawq`` table (a fixed count,
      ``stop=None`` of :func:`safer_jax.criteria.hutchinson_trace`).
    ig_steps: Gauss-Legendre nodes of the integrated-gradients path.
    full_range: quantize on qwix's full signed grid (the default: what
      :mod:`safer_jax.budgeting.deploy` runs; see :func:`safer_jax.core.perturb.quantize_grid`),
      or (False) the restricted one, in every table (errors, oracle sweep, IG
      baseline).
    group_size: group-wise scales on 2-D (Dense) kernels (see
      :func:`safer_jax.core.perturb.quantize_grid`), in the errors and the oracle
      sweep (the integrated-gradients baseline stays per channel).
    progress: show tables done with an ETA, and the inner progress of the long
      ones (the oracle sweep's cells, Hutchinson probes, integrated-gradient
      bit widths) on stderr.
    task: the loss every table measures or differentiates
      (:mod:`safer_jax.core.tasks`; None: classification's cross-entropy). A task
      comparing with the float model (``kl_to_reference``) gets ``model``'s
      outputs added to ``calib``.
    layers: regex patterns of the layers to tabulate (``re.fullmatch``; None:
      every layer), e.g. leaving out embeddings that qwix does not deploy.

  Raises:
    ValueError: unknown source (lists the valid ones).
  """
  import time  # pylint: disable=import-outside-toplevel
  model, variables = wrapping.as_model(model, variables)
  unknown = [s for s in sources if s not in COST_SOURCES]
  if unknown:
    raise ValueError(f"Unknown cost source(s) {unknown}; valid: {list(COST_SOURCES)}")
  candidates = [int(b) for b in candidates]
  params = variables["params"]
  names = layers_lib.select_layers(params, layers)
  task = tasks_lib.get(task)
  calib = tasks_lib.prepare_split(task, model, variables, calib, "calibration split")
  loss_fn = train_lib.task_loss_fn(model, variables, task)
  batches = data_lib.batches_from_split(calib, batch_size, max_batches)
  tables, seconds = {}, {}
  errors = quant_errors(params, names, candidates, full_range=full_range, group_size=group_size)
  sq = {n: {b: float(jnp.sum(jnp.square(e))) for b, e in errs.items()} for n, errs in errors.items()}

  bar = Progress(len(sources), "cost tables", enabled=progress, unit="table")

  def timed(source, fn):
    t0 = time.perf_counter()
    tables[source] = fn()
    seconds[source] = time.perf_counter() - t0
    bar.update(1, postfix=f"{source} {seconds[source]:.1f}s")

  if "oracle" in sources:
    def oracle():
      calib_split = data_lib.Split(**{k: np.concatenate([b[k] for b in batches])
                                      for k in batches[0]})
      quantizer = {"full_range": bool(full_range)}  # explicit: the sweep's default may differ
      if group_size:
        quantizer["group_size"] = group_size
      options = {"quantize": quantizer}
      table = sweep.run_sweep(model, variables, calib_split, sweep.SweepConfig(
          families={"quantize": tuple(candidates)}, seeds=(0,), family_options=options,
          layers=tuple(re.escape(n) for n in names)), progress=progress, task=task)
      return {n: {int(r.magnitude): float(r.loss_increase)
                  for r in table[table.layer == n].itertuples()} for n in names}
    timed("oracle", oracle)
  if "hawq" in sources:
    def hawq():
      est = criteria.hutchinson_trace(loss_fn, params, batches, key=jax.random.key(seed),
                                      stop=None, max_probes=hutchinson_probes,
                                      progress=progress,
                                      layers=[re.escape(n) for n in names])
      return {n: {b: float(est[n].mean) / layers_lib.get_kernel(params, n).size * sq[n][b]
                  for b in candidates} for n in names}
    timed("hawq", hawq)
  if "fisher" in sources:
    def fisher():
      diag = fisher_diagonal(loss_fn, params, batches, names)
      return {n: {b: float(jnp.sum(diag[n] * jnp.square(errors[n][b]))) for b in candidates}
              for n in names}
    timed("fisher", fisher)
  if "corruption" in sources:
    def corruption():
      norms = criteria.grad_norm(loss_fn, params, batches, layers=[re.escape(n) for n in names])
      return {n: {b: norms[n] * float(np.sqrt(sq[n][b])) for b in candidates} for n in names}
    timed("corruption", corruption)
  if "integrated_gradients" in sources:
    def integrated():
      inner = Progress(len(candidates), "integrated gradients", enabled=progress,
                       unit="bit width")
      per_bits = {}
      for b in candidates:
        per_bits[b] = criteria.integrated_gradients(loss_fn, params, batches,
                                                    baseline="quantized", bits=b, steps=ig_steps,
                                                    full_range=full_range, setting="full",
                                                    layers=[re.escape(n) for n in names])
        inner.update(1, postfix=f"{b} bits")
      return {n: {b: float(per_bits[b][n]) for b in candidates} for n in names}
    timed("integrated_gradients", integrated)
  if "quant_error" in sources:
    timed("quant_error", lambda: {n: dict(sq[n]) for n in names})
  bar.close()
  return tables, seconds


def allocate(model: Any, variables: Mapping[str, Any] | None, calib: data_lib.Split,
             avg_bits: float, *, source: str = "fisher",
             candidates: Sequence[int] = (2, 3, 4, 5, 6, 8),
             tie_groups: Sequence[Sequence[str]] | None = None,
             **options) -> "budget.Allocation":
  """Per-layer bit widths for a model under an average-bits budget, in one call.

  The cost table of ``source`` (:func:`cost_tables` on ``calib``) solved exactly
  by :func:`safer_jax.budgeting.budget.allocate_bits`; sizes are kernel weight counts.

  Args:
    model: zoo, :func:`safer_jax.wrap`-ped or nnx model (see :func:`cost_tables`).
    variables: its variables (``None`` for a wrapped or nnx model).
    calib: calibration data (e.g. training images), not the data you report on.
    avg_bits: average bits per kernel weight, weighted by parameter count.
    source: one of :data:`COST_SOURCES`.
    candidates: allowed bit widths.
    tie_groups: groups of layers that must share one bit width (e.g. a
      transformer block's query/key/value, :func:`tie_groups`); each group is
      one knapsack item whose cost and size are its layers' sums.
    **options: more :func:`cost_tables` keywords (``batch_size``,
      ``max_batches``, ``task``, ``layers``, ...).

  Returns:
    A :class:`safer_jax.budgeting.budget.Allocation` (``.bits``: layer -> bits).
  """
  model, variables = wrapping.as_model(model, variables)
  tables, _ = cost_tables(model, variables, calib, candidates, (source,), **options)
  sizes = {n: int(np.size(layers_lib.get_kernel(variables, n))) for n in tables[source]}
  return budget.allocate_bits(tables[source], sizes, candidates,
                              budget.budget_from_avg_bits(sizes, avg_bits), tie_groups=tie_groups)


def tie_groups(layers: Sequence[str], patterns: Sequence[str] = (
    r"(.*/)(query|key|value)", r"(.*/)(gate|up)(_proj)?")) -> list[list[str]]:
  """Groups of layers that should share a bit width: a transformer's q/k/v (and gate/up).

  Each pattern is a regex with a first group naming the parent module; the
  layers it fully matches are grouped by that parent (``block1/attn/query``,
  ``.../key``, ``.../value`` -> one group). Groups of one layer are dropped.

  Args:
    layers: layer paths (e.g. :func:`safer_jax.core.layers.find_layers`).
    patterns: regexes (``re.fullmatch``) whose group 1 is the shared parent.

  Returns:
    ``[[layer, ...], ...]`` in ``layers`` order.
  """
  groups: dict[tuple[int, str], list[str]] = {}
  for name in layers:
    for i, pattern in enumerate(patterns):
      m = re.fullmatch(pattern, name)
      if m:
        groups.setdefault((i, m.group(1)), []).append(name)
        break
  return [g for g in groups.values() if len(g) > 1]


def quantize_model(variables: Mapping[str, Any], bits: Mapping[str, int], *,
                   full_range: bool = True, group_size: int | None = None,
                   axes: Mapping[str, int | Sequence[int]] | None = None) -> dict:
  """Variables with each listed layer's kernel fake-quantized to ``bits[layer]`` bits.

  Per-output-channel symmetric round-to-nearest; other leaves are unchanged.
  ``full_range``: qwix's full signed grid (the weights qwix deploys, bit for bit;
  see :mod:`safer_jax.budgeting.deploy`); ``group_size``: group-wise scales on 2-D kernels
  (groups of ``group_size`` entries along the contracted axis). ``variables``
  may be an ``nnx.State`` (the result is its pure dict).

  The output channel is the last kernel axis unless ``axes`` says otherwise:
  ``axes={layer: axis}`` puts one scale per entry of ``axis`` (an int) or per
  combination of entries of several axes (a tuple, e.g. ``(1, 2)`` for a
  DenseGeneral kernel ``(in, heads, head_dim)``: one scale per (head, head_dim),
  as qwix quantizes it; ``()``: one scale for the whole kernel), reducing over
  the other axes. A 2-D kernel stored ``(out, in)`` takes ``axis=0`` (its
  groups then run along ``in``). :func:`safer_jax.budgeting.deploy.channel_axes` finds
  each layer's axis from the model's forward; layers of ``axes`` that ``bits``
  does not list are ignored.

  Raises:
    ValueError: ``axes`` names a layer ``variables`` does not have, or an axis
      out of range for that layer's kernel, or repeats an axis (the message
      names the layer, its kernel shape and the allowed axes).
  """
  channels = {}
  known = layers_lib.find_layers(variables)
  for layer, axis in (axes or {}).items():
    if layer not in known:
      raise ValueError(f"axes names layer {layer!r}, which the variables do not have; their "
                       f"layers: {known}")
    shape = tuple(np.shape(layers_lib.get_kernel(variables, layer)))
    given = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    bad = [a for a in given if isinstance(a, bool) or not isinstance(a, (int, np.integer))
           or not -len(shape) <= a < len(shape)]
    norm = sorted(int(a) % len(shape) for a in given if a not in bad)
    if bad or len(set(norm)) != len(norm):
      raise ValueError(f"axes[{layer!r}]={axis!r} is not a channel axis of its kernel of shape "
                       f"{shape}; allowed: an int in {-len(shape)}..{len(shape) - 1} or a tuple "
                       f"of distinct ones")
    channels[layer] = tuple(norm)

  def quantize(layer, w, b):
    kw = {"full_range": full_range, "group_size": group_size}
    if layer not in channels or channels[layer] == (w.ndim - 1,):
      return perturb.quantize(w, int(b), **kw)
    # channel axes last, the others flattened in front: (reduced, channels), one scale a column.
    chan = channels[layer]
    rest = [a for a in range(w.ndim) if a not in chan]
    moved = jnp.transpose(w, rest + list(chan))
    flat = moved.reshape(int(np.prod([w.shape[a] for a in rest])), -1)
    if w.ndim != 2:  # group-wise scales are for 2-D (Dense) kernels only, as in qwix
      kw["group_size"] = None
    q = perturb.quantize(flat, int(b), **kw).reshape(moved.shape)
    return jnp.transpose(q, np.argsort(rest + list(chan)))

  return layers_lib.map_kernels(variables, quantize, bits)
