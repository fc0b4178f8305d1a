"""Per-layer budgets: bit widths under a size budget, pruning ratios under a sparsity budget.

Mixed precision is a *multiple-choice knapsack*: every layer ``l`` (``n_l``
kernel weights) gets one bit width ``b_l`` from a candidate set, at a cost
``s_l(b_l)`` (a sensitivity from :mod:`safer_jax.criteria` or a measured loss
increase; lower is better), and the model must fit a size budget::

  minimise  sum_l s_l(b_l)   subject to   sum_l n_l * b_l <= budget_bits.

:func:`allocate_bits` solves it *exactly* (no greedy ratio heuristic) by
dynamic programming over an integer capacity axis, or by integer linear
programming (``scipy.optimize.milp``) when the DP table would be too large.
Criterion-guided pruning (:func:`allocate_ratios`) is the same problem with the
number of *kept* weights as the knapsack weight. Sizes count kernel weights
only: scales, zero points, biases and sparse-index overhead are not part of the
budget.

Budgets are integers in bits; :func:`budget_from_avg_bits` and
:func:`budget_from_bytes` convert the usual ways of stating them.

Pruning counts follow :func:`safer_jax.core.perturb.prune`: a ratio ``r`` removes
exactly ``floor(float32(r) * float32(n))`` of a layer's ``n`` weights
(:func:`prune_count`), and :func:`global_sparsity` reports the fraction that
applying a dict of ratios really removes.

Layers are dict keys (the ``'/'``-joined parameter paths used across
``safer_jax``); results keep the key order of ``sizes`` (or ``shapes`` /
``kernels``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from safer_jax.core import layers as layers_lib

Layer = Hashable

METHODS = ("dp", "ilp")
# The DP keeps a float64 value row of `cells` entries and a uint8 back-pointer
# table of `items x cells`; above either limit method='dp' falls back to the ILP.
_DP_MAX_CELLS = 2_000_000
_DP_MAX_TABLE = 50_000_000


# ---------------------------------------------------------------------------
# Budgets and results.
# ---------------------------------------------------------------------------


def budget_from_avg_bits(sizes: Mapping[Layer, int], avg_bits: float) -> int:
  """The total budget in bits for an average of ``avg_bits`` bits per weight.

  Args:
    sizes: layer -> number of kernel weights (int >= 0).
    avg_bits: average bits per weight, weighted by parameter count (> 0).

  Returns:
    ``floor(avg_bits * sum(sizes))`` in bits (a 1e-9 relative slack absorbs
    float error, so ``4.2`` bits over 10 weights gives 42, not 41).
  """
  total = sum(_check_sizes(sizes).values())
  if not (math.isfinite(avg_bits) and avg_bits > 0):
    raise ValueError(f"avg_bits must be a positive number, got {avg_bits!r}.")
  return int(math.floor(avg_bits * total * (1 + 1e-9)))


def bops(bits: Mapping[Layer, int], macs: Mapping[Layer, int], act_bits: int) -> int:
  """Bit operations per example: ``sum_l macs[l] * bits[l] * act_bits`` (HAWQ-v3's BOPs).

  Args:
    bits: layer -> weight bit width.
    macs: layer -> multiply-accumulates per example
      (:func:`safer_jax.core.layers.macs_per_layer`).
    act_bits: activation bit width (the same for every layer).
  """
  return int(sum(int(macs[l]) * int(b) for l, b in bits.items()) * int(act_bits))


def budget_from_bytes(num_bytes: float) -> int:
  """The total budget in bits for a model of ``num_bytes`` bytes (``floor(8 * num_bytes)``)."""
  if not (math.isfinite(num_bytes) and num_bytes >= 0):
    raise ValueError(f"num_bytes must be a non-negative number, got {num_bytes!r}.")
  return int(math.floor(8 * num_bytes))


@dataclasses.dataclass(frozen=True)
class Allocation:
  """A bit width per layer.

  Attributes:
    bits: layer -> bit width (int), in the key order of ``sizes``.
    total_cost: ``sum_l costs[l][bits[l]]`` (NaN when no costs were given).
    total_bits: ``sum_l sizes[l] * bits[l]``, in bits.
    avg_bits: ``total_bits / sum(sizes)``, bits per weight (size-weighted).
    size_bytes: ``total_bits / 8``, in bytes (kernel weights only).
    budget_bits: the budget it was solved for, in bits.
    method: how it was obtained: ``'dp'`` or ``'ilp'`` (exact solvers),
      ``'uniform'`` or ``'random'``.
  """
  bits: dict[Layer, int]
  total_cost: float
  total_bits: int
  avg_bits: float
  size_bytes: float
  budget_bits: int
  method: str


def _make_allocation(bits, sizes, costs, budget, method) -> Allocation:
  total_bits = sum(int(sizes[l]) * int(b) for l, b in bits.items())
  n = sum(int(s) for s in sizes.values())
  cost = float("nan") if costs is None else float(sum(costs[l][b] for l, b in bits.items()))
  return Allocation(bits=dict(bits), total_cost=cost, total_bits=total_bits,
                    avg_bits=total_bits / n if n else 0.0, size_bytes=total_bits / 8,
                    budget_bits=int(budget), method=method)


# ---------------------------------------------------------------------------
# Validation.
# ---------------------------------------------------------------------------


def _check_sizes(sizes: Mapping[Layer, Any]) -> dict[Layer, int]:
  if not sizes:
    raise ValueError("sizes is empty.")
  out = {}
  for l, s in sizes.items():
    if isinstance(s, (bool, np.bool_)) or not isinstance(s, (int, np.integer)):
      raise ValueError(f"sizes[{l!r}] must be an int, got {s!r}.")
    if s < 0:
      raise ValueError(f"sizes[{l!r}] must be >= 0, got {s}.")
    out[l] = int(s)
  return out


def _check_bits(candidates: Sequence[int]) -> tuple[int, ...]:
  cands = tuple(candidates)
  if not cands:
    raise ValueError("candidates is empty.")
  for b in cands:
    if isinstance(b, (bool, np.bool_)) or not isinstance(b, (int, np.integer)) or b < 1:
      raise ValueError(f"Bit widths must be positive ints, got {b!r} in {cands}.")
  if len(set(cands)) != len(cands):
    raise ValueError(f"Duplicate bit widths in candidates {cands}.")
  return tuple(sorted(int(b) for b in cands))


def _check_ratios(candidates: Sequence[float]) -> tuple[float, ...]:
  cands = tuple(candidates)
  if not cands:
    raise ValueError("candidates_ratios is empty.")
  for r in cands:
    if not (isinstance(r, (int, float, np.integer, np.floating)) and 0 <= r <= 1):
      raise ValueError(f"Pruning ratios must be numbers in [0, 1], got {r!r} in {cands}.")
  if len(set(cands)) != len(cands):
    raise ValueError(f"Duplicate ratios in candidates_ratios {cands}.")
  return tuple(sorted(cands))


def _check_sparsity(s: float) -> float:
  if not (isinstance(s, (int, float, np.integer, np.floating)) and 0 <= s <= 1):
    raise ValueError(f"Target sparsity must be a number in [0, 1], got {s!r}.")
  return float(s)


def _cost_table(costs: Mapping[Layer, Mapping[Any, float]], layers: Sequence[Layer],
                candidates: tuple, what: str) -> np.ndarray:
  """``(layers, candidates)`` float64 costs; +inf marks a forbidden choice."""
  if set(costs) != set(layers):
    missing = [l for l in layers if l not in costs]
    extra = [l for l in costs if l not in set(layers)]
    raise ValueError(f"costs and sizes must have the same layers; missing from costs: {missing}, "
                     f"unknown in costs: {extra}.")
  table = np.empty((len(layers), len(candidates)))
  for i, l in enumerate(layers):
    row = costs[l]
    unknown = [k for k in row if k not in candidates]
    if unknown:
      raise ValueError(f"costs[{l!r}] has {what} {unknown} that are not candidates "
                       f"{list(candidates)}.")
    absent = [c for c in candidates if c not in row]
    if absent:
      raise ValueError(f"costs[{l!r}] lacks the candidate {what} {absent}; "
                       "give +inf to forbid one.")
    for j, c in enumerate(candidates):
      v = float(row[c])
      if math.isnan(v) or v == -math.inf:
        raise ValueError(f"costs[{l!r}][{c!r}] = {v}; costs must be finite or +inf (forbidden).")
      table[i, j] = v
  return table


def _groups(layers: Sequence[Layer],
            tie_groups: Sequence[Sequence[Layer]] | None) -> list[list[int]]:
  """Items of the knapsack: lists of layer indices that share one choice, in layer order."""
  index = {l: i for i, l in enumerate(layers)}
  owner = {}
  for g, group in enumerate(tie_groups or ()):
    group = list(group)
    if not group:
      raise ValueError(f"tie_groups[{g}] is empty.")
    for l in group:
      if l not in index:
        raise ValueError(f"tie_groups[{g}] names the unknown layer {l!r}.")
      if index[l] in owner:
        raise ValueError(f"Layer {l!r} is in more than one tie group.")
      owner[index[l]] = g
  items, seen = [], {}
  for i in range(len(layers)):
    g = owner.get(i)
    if g is None:
      items.append([i])
    elif g in seen:
      items[seen[g]].append(i)
    else:
      seen[g] = len(items)
      items.append([i])
  return items


# ---------------------------------------------------------------------------
# The exact multiple-choice knapsack solver.
# ---------------------------------------------------------------------------


def _solve_mckp(costs: list[np.ndarray], weights: list[np.ndarray], capacity: int,
                method: str) -> tuple[list[int], str]:
  """Exact ``min sum_i costs[i][j_i]  s.t.  sum_i weights[i][j_i] <= capacity``.

  Args:
    costs: per item, a float64 ``(choices_i,)`` array of finite costs.
    weights: per item, an int ``(choices_i,)`` array of weights >= 0 (Python
      ints inside an object array are fine; arithmetic is exact).
    capacity: int; the caller has checked ``sum_i min(weights[i]) <= capacity``.
    method: ``'dp'`` (falls back to ``'ilp'`` when the table is too big) or ``'ilp'``.

  Returns:
    ``(choice index per item, method used)``. Ties between equal-cost
    solutions go to the lower choice index (DP; the ILP may pick any).
  """
  # Shift each item's weights by its minimum: the capacity shrinks to the slack.
  base = [int(min(int(x) for x in w)) for w in weights]
  shifted = [[int(x) - b for x in w] for w, b in zip(weights, base)]
  slack = capacity - sum(base)
  assert slack >= 0
  g = 0
  for w in shifted:
    for x in w:
      g = math.gcd(g, x)
  g = g or 1
  cap = min(slack // g, sum(max(w) for w in shifted) // g)
  cells = cap + 1
  if method == "dp" and (cells > _DP_MAX_CELLS or cells * len(costs) > _DP_MAX_TABLE):
    method = "ilp"
  if method == "dp":
    return _dp([np.asarray(c, np.float64) for c in costs],
               [np.asarray([x // g for x in w], np.int64) for w in shifted], cap), "dp"
  return _ilp(costs, [[x // g for x in w] for w in shifted], slack // g), "ilp"


def _dp(costs: list[np.ndarray], weights: list[np.ndarray], cap: int) -> list[int]:
  """``best[c]`` = min cost of the items so far with total weight <= c."""
  best = np.zeros(cap + 1)
  back = np.zeros((len(costs), cap + 1), np.uint8)
  for i, (c, w) in enumerate(zip(costs, weights)):
    new = np.full(cap + 1, np.inf)
    for j in range(len(c)):
      if w[j] > cap:
        continue
      cand = best[:cap + 1 - w[j]] + c[j]
      view_new, view_back = new[w[j]:], back[i, w[j]:]
      better = cand < view_new  # strict: the lower index wins ties
      view_new[better] = cand[better]
      view_back[better] = j
    best = new
  choice, rest = [0] * len(costs), cap
  for i in range(len(costs) - 1, -1, -1):
    choice[i] = int(back[i, rest])
    rest -= int(weights[i][choice[i]])
  assert rest >= 0
  return choice


def _ilp(costs: list[np.ndarray], weights: list[list[int]], capacity: int) -> list[int]:
  """One binary per (item, choice); one-hot rows; one capacity row (scaled to O(1))."""
  # Imported here, the one place it is used: at the top scipy.optimize was ~0.3 s of
  # `import safer_jax` (every notebook, every launch).
  import scipy.optimize  # pylint: disable=import-outside-toplevel
  import scipy.sparse  # pylint: disable=import-outside-toplevel
  sizes = [len(c) for c in costs]
  offsets = np.concatenate([[0], np.cumsum(sizes)])
  nvar = int(offsets[-1])
  # Costs shifted to >= 0 per item (the argmin is unchanged) so that the
  # relative MIP gap of 0 is meaningful.
  c = np.concatenate([np.asarray(ci, np.float64) - np.min(ci) for ci in costs])
  rows = np.repeat(np.arange(len(costs)), sizes)
  onehot = scipy.sparse.csr_array((np.ones(nvar), (rows, np.arange(nvar))),
                                  shape=(len(costs), nvar))
  w = np.concatenate([np.asarray(wi, np.float64) for wi in weights])
  scale = max(capacity, 1)
  constraints = [scipy.optimize.LinearConstraint(onehot, 1, 1)]
  if w.any():
    # Integer weights: "<= capacity + 0.5" admits the same integer solutions and
    # leaves room for the solver's feasibility tolerance.
    constraints.append(scipy.optimize.LinearConstraint(w[None] / scale, -np.inf,
                                                       (capacity + 0.5) / scale))
  res = scipy.optimize.milp(c, constraints=constraints, integrality=np.ones(nvar),
                            bounds=scipy.optimize.Bounds(0, 1), options={"mip_rel_gap": 0.0})
  if res.status != 0 or res.x is None:
    raise RuntimeError(f"scipy.optimize.milp failed: {res.message}")
  choice = [int(np.argmax(res.x[offsets[i]:offsets[i + 1]])) for i in range(len(costs))]
  used = sum(int(weights[i][j]) for i, j in enumerate(choice))
  if used > capacity:
    raise RuntimeError(f"milp returned a solution over capacity ({used} > {capacity}); "
                       "the weights are too large for its tolerances.")
  return choice


class _Infeasible(ValueError):
  """Nothing fits; ``minimum`` is the smallest total weight any choice reaches."""

  def __init__(self, message: str, minimum: int):
    super().__init__(message)
    self.minimum = minimum


def _solve_layers(table: np.ndarray, layer_weights: list[list[int]], items: list[list[int]],
                  capacity: int, method: str, unit: str) -> tuple[list[int], str]:
  """Solves per layer: merges tie groups into items, drops forbidden (inf) choices.

  Args:
    table: ``(layers, candidates)`` costs, +inf = forbidden.
    layer_weights: per layer, per candidate, the int knapsack weight.
    items: tie groups of layer indices (see :func:`_groups`).
    capacity: int knapsack capacity.
    method: ``'dp'`` or ``'ilp'``.
    unit: describes the capacity in the infeasibility error.

  Returns:
    ``(candidate index per layer, method used)``.

  Raises:
    ValueError: if a group has no allowed candidate or nothing fits.
  """
  if method not in METHODS:
    raise ValueError(f"Unknown method {method!r}; valid methods: {list(METHODS)}.")
  ncand = table.shape[1]
  item_costs, item_weights, allowed = [], [], []
  for members in items:
    cost = table[members].sum(axis=0)
    ok = [j for j in range(ncand) if np.isfinite(cost[j])]
    if not ok:
      raise ValueError(f"No candidate is allowed for every layer of the tie group {members} "
                       "(each has an +inf cost for some layer).")
    allowed.append(ok)
    item_costs.append(cost[ok])
    item_weights.append([sum(layer_weights[m][j] for m in members) for j in ok])
  minimum = sum(min(w) for w in item_weights)
  if minimum > capacity:
    raise _Infeasible(f"Infeasible budget: {unit} {capacity}, but the minimum feasible one is "
                      f"{minimum}.", minimum)
  choice, used = _solve_mckp(item_costs, item_weights, capacity, method)
  per_layer = [0] * table.shape[0]
  for members, ok, j in zip(items, allowed, choice):
    for m in members:
      per_layer[m] = ok[j]
  return per_layer, used


# ---------------------------------------------------------------------------
# Bit widths.
# ---------------------------------------------------------------------------


def allocate_bits(costs: Mapping[Layer, Mapping[int, float]], sizes: Mapping[Layer, int],
                  candidates: Sequence[int], budget: int, *,
                  tie_groups: Sequence[Sequence[Layer]] | None = None,
                  method: str = "dp") -> Allocation:
  """The exact min-cost bit width per layer under a total size budget.

  Solves ``min sum_l costs[l][b_l]  s.t.  sum_l sizes[l] * b_l <= budget``,
  ``b_l`` in ``candidates``, exactly:

  * ``method='dp'``: dynamic programming over the integer capacity. Each
    layer's weights ``sizes[l] * b`` are shifted by their minimum (so the axis
    is the budget *above* all-minimum-bits), divided by the gcd of all shifted
    weights and capped at the largest useful total. When that leaves more than
    ``2e6`` cells (or ``5e7`` back-pointers, items x cells), it falls back to
    the ILP; the result's ``method`` says which ran. Equal-cost ties go to the
    narrower width of the layer that comes first in the order of ``sizes``.
  * ``method='ilp'``: ``scipy.optimize.milp`` (HiGHS, relative gap 0) on one
    binary per (layer, width). Exact up to the solver's tolerances (~1e-9).

  Args:
    costs: layer -> {bit width -> cost}; any real numbers (lower is better,
      need not be monotone), ``+inf`` forbids a width for that layer. Every
      candidate must appear; no other key may.
    sizes: layer -> number of kernel weights (int >= 0); same layers as ``costs``.
    candidates: allowed bit widths, positive ints, e.g. ``(2, 3, 4, 5, 6, 8)``.
    budget: total budget in bits (see :func:`budget_from_avg_bits`,
      :func:`budget_from_bytes`).
    tie_groups: lists of layers that must share one bit width (e.g. layers
      reading the same input); each group is one knapsack item whose cost and
      size are the sums over its layers.
    method: ``'dp'`` (default, with ILP fallback) or ``'ilp'``.

  Returns:
    The optimal :class:`Allocation`.

  Raises:
    ValueError: for a budget below the all-minimum-bits size (the message gives
      the minimum feasible budget), bit widths in ``costs`` that are not
      candidates (or missing ones), negative or non-int sizes, mismatched layers,
      bad tie groups or an unknown method.
  """
  sizes = _check_sizes(sizes)
  cands = _check_bits(candidates)
  layers = list(sizes)
  table = _cost_table(costs, layers, cands, "bit widths")
  weights = [[sizes[l] * b for b in cands] for l in layers]
  choice, used = _solve_layers(table, weights, _groups(layers, tie_groups), int(budget), method,
                               "budget_bits")
  bits = {l: cands[j] for l, j in zip(layers, choice)}
  return _make_allocation(bits, sizes, costs, budget, used)


def uniform_allocation(sizes: Mapping[Layer, int], candidates: Sequence[int], budget: int, *,
                       costs: Mapping[Layer, Mapping[int, float]] | None = None) -> Allocation:
  """The largest single bit width (from ``candidates``) that fits the budget for every layer.

  Args:
    sizes: layer -> number of kernel weights (int >= 0).
    candidates: allowed bit widths (positive ints).
    budget: total budget in bits.
    costs: optional layer -> {bits -> cost}, only to report ``total_cost``.

  Returns:
    An :class:`Allocation` with ``method='uniform'``.

  Raises:
    ValueError: if even the narrowest candidate does not fit.
  """
  sizes = _check_sizes(sizes)
  cands = _check_bits(candidates)
  n = sum(sizes.values())
  fits = [b for b in cands if n * b <= budget]
  if not fits:
    raise ValueError(f"Infeasible budget: budget_bits {budget}, but the minimum feasible one is "
                     f"{n * cands[0]}.")
  return _make_allocation({l: fits[-1] for l in sizes}, sizes, costs, budget, "uniform")


def random_allocation(sizes: Mapping[Layer, int], candidates: Sequence[int], budget: int,
                      seed: int, *, tie_groups: Sequence[Sequence[Layer]] | None = None,
                      costs: Mapping[Layer, Mapping[int, float]] | None = None) -> Allocation:
  """A random feasible allocation that uses the budget greedily (a baseline).

  Every layer (tie group) starts at the narrowest candidate; then, while some
  layer can move up to its next wider candidate within the budget, one such
  layer, drawn uniformly at random, is moved up one step. The result is
  maximal: no single-step upgrade of any layer fits the remaining budget.

  Args:
    sizes: layer -> number of kernel weights (int >= 0).
    candidates: allowed bit widths (positive ints).
    budget: total budget in bits.
    seed: seed of the NumPy generator that draws the upgrades.
    tie_groups: lists of layers that must share one bit width.
    costs: optional layer -> {bits -> cost}, only to report ``total_cost``.

  Returns:
    An :class:`Allocation` with ``method='random'``.

  Raises:
    ValueError: if the all-narrowest allocation does not fit.
  """
  sizes = _check_sizes(sizes)
  cands = _check_bits(candidates)
  layers = list(sizes)
  items = _groups(layers, tie_groups)
  item_size = [sum(sizes[layers[m]] for m in members) for members in items]
  level = [0] * len(items)
  used = sum(item_size) * cands[0]
  if used > budget:
    raise ValueError(f"Infeasible budget: budget_bits {budget}, but the minimum feasible one is "
                     f"{used}.")
  rng = np.random.default_rng(seed)
  while True:
    up = [i for i in range(len(items)) if level[i] + 1 < len(cands)
          and used + item_size[i] * (cands[level[i] + 1] - cands[level[i]]) <= budget]
    if not up:
      break
    i = up[int(rng.integers(len(up)))]
    used += item_size[i] * (cands[level[i] + 1] - cands[level[i]])
    level[i] += 1
  bits = {}
  for members, lev in zip(items, level):
    for m in members:
      bits[layers[m]] = cands[lev]
  return _make_allocation({l: bits[l] for l in layers}, sizes, costs, budget, "random")


# ---------------------------------------------------------------------------
# Pruning ratios.
# ---------------------------------------------------------------------------


def prune_count(ratio: float, n: int) -> int:
  """Weights removed from an ``n``-weight layer at ``ratio``.

  ``floor(float32(ratio) * float32(n))``: the same count as
  :func:`safer_jax.core.perturb.prune` (float32 product).
  """
  return int(np.floor(np.float32(ratio) * np.float32(n)))


def global_sparsity(ratios: Mapping[Layer, float], sizes: Mapping[Layer, int]) -> float:
  """The fraction of all kernel weights that applying ``ratios`` per layer removes.

  Args:
    ratios: layer -> pruning ratio in [0, 1].
    sizes: layer -> number of kernel weights; must cover the layers of ``ratios``.

  Returns:
    ``sum_l prune_count(ratios[l], sizes[l]) / sum_l sizes[l]`` (0 if no weights).
  """
  sizes = _check_sizes(sizes)
  if set(ratios) != set(sizes):
    raise ValueError(f"ratios and sizes must have the same layers: {list(ratios)} vs "
                     f"{list(sizes)}.")
  n = sum(sizes.values())
  return sum(prune_count(_check_sparsity(ratios[l]), sizes[l]) for l in sizes) / n if n else 0.0


def uniform_ratios(sizes: Mapping[Layer, int], s: float) -> dict[Layer, float]:
  """The same pruning ratio ``s`` (fraction of weights removed) for every layer."""
  s = _check_sparsity(s)
  return {l: s for l in _check_sizes(sizes)}


def erk_ratios(shapes: Mapping[Layer, Sequence[int]], s: float, *,
               power_scale: float = 1.0) -> dict[Layer, float]:
  """Erdős–Rényi-Kernel pruning ratios for a global sparsity ``s`` (RigL, Evci et al. 2020).

  Layer ``l``'s density (kept fraction) is ``eps * (sum(shape_l) / prod(shape_l)) ** power_scale``
  with one ``eps`` chosen so that the kept weights total ``(1 - s) * N``. A
  layer whose density would exceed 1 is made dense and ``eps`` is solved again
  for the others, repeatedly (as in RigL's ``get_sparsities_erdos_renyi``).
  Conv kernels ``(kh, kw, in, out)`` include the kernel dims (ERK, not ER).

  Args:
    shapes: layer -> kernel shape, e.g. ``(3, 3, 16, 32)`` or ``(64, 10)``;
      positive dims.
    s: target global sparsity in [0, 1] (fraction of all weights removed).
    power_scale: exponent of the raw ERK score (1: RigL's default; 0: uniform).

  Returns:
    layer -> pruning ratio in [0, 1] (``1 - density``). The real-valued kept
    total is ``(1 - s) * N``; :func:`global_sparsity` gives the achieved value
    after per-layer flooring (at most ``len(shapes)`` weights fewer removed).
  """
  s = _check_sparsity(s)
  if not shapes:
    raise ValueError("shapes is empty.")
  size, raw = {}, {}
  for l, shape in shapes.items():
    shape = tuple(int(d) for d in shape)
    if not shape or min(shape) < 1:
      raise ValueError(f"shapes[{l!r}] = {shape} must have positive dims.")
    size[l] = math.prod(shape)
    raw[l] = (sum(shape) / size[l]) ** power_scale
  if s == 0:
    return {l: 0.0 for l in shapes}
  dense: set = set()
  while True:
    sparse = [l for l in shapes if l not in dense]
    if not sparse:
      break
    kept_rest = (1 - s) * sum(size.values()) - sum(size[l] for l in dense)
    eps = kept_rest / sum(raw[l] * size[l] for l in sparse)
    top = max(raw[l] for l in sparse)
    if top * eps <= 1:
      break
    dense.update(l for l in sparse if raw[l] == top)
  return {l: 0.0 if l in dense else float(min(1.0, max(0.0, 1 - eps * raw[l]))) for l in shapes}


def _ratio_for_count(k: int, n: int) -> float:
  """The smallest float32 ratio ``r`` with ``prune_count(r, n) == k`` (as a Python float)."""
  if n == 0 or k == 0:
    return 0.0
  r = np.float32(k / n)
  while prune_count(r, n) > k:
    r = np.nextafter(r, np.float32(0))
  while prune_count(r, n) < k:
    r = np.nextafter(r, np.float32(2))
  r = min(r, np.float32(1))
  assert prune_count(r, n) == k
  return float(r)


def global_magnitude_ratios(kernels: Mapping[Layer, Any], s: float) -> dict[Layer, float]:
  """Per-layer ratios equivalent to one global magnitude threshold.

  The ``K = prune_count(s, N)`` weights of smallest ``|w|`` over all layers
  (``N`` weights in total) are pruned; ties are broken by layer order (the key
  order of ``kernels``) and then by flat row-major index, lower first. Each
  layer's ratio is a float32-exact value giving exactly its count under
  :func:`prune_count`, so ``perturb.prune(w, ratio)`` (magnitude, same in-layer
  tie rule) removes exactly the globally chosen weights: ``K`` zeros overall.

  Args:
    kernels: layer -> weight array (any shape; compared as float32 ``|w|``).
    s: global sparsity in [0, 1].

  Returns:
    layer -> pruning ratio in [0, 1].
  """
  s = _check_sparsity(s)
  if not kernels:
    raise ValueError("kernels is empty.")
  arrays = {layer: np.asarray(w, np.float32) for layer, w in kernels.items()}
  layers_lib.check_finite(arrays, "Kernel of layer")
  flats = [np.abs(w).reshape(-1) for w in arrays.values()]
  sizes = [f.size for f in flats]
  allw = np.concatenate(flats) if flats else np.zeros(0, np.float32)
  k = prune_count(s, allw.size)
  # Stable sort of the concatenation = (|w|, layer order, flat index).
  pruned = np.zeros(allw.size, bool)
  pruned[np.argsort(allw, kind="stable")[:k]] = True
  counts = [int(p.sum()) for p in np.split(pruned, np.cumsum(sizes)[:-1])]
  return {l: _ratio_for_count(c, n) for l, c, n in zip(kernels, counts, sizes)}


def allocate_ratios(costs: Mapping[Layer, Mapping[float, float]], sizes: Mapping[Layer, int],
                    candidates_ratios: Sequence[float], s: float, *,
                    tie_groups: Sequence[Sequence[Layer]] | None = None,
                    method: str = "dp") -> dict[Layer, float]:
  """The exact min-cost pruning ratio per layer reaching a global sparsity ``s``.

  Solves ``min sum_l costs[l][r_l]  s.t.  sum_l prune_count(r_l, n_l) >=
  prune_count(s, N)``, ``r_l`` in ``candidates_ratios``, with the solver of
  :func:`allocate_bits`: the knapsack weight is the number of *kept* weights
  ``n_l - prune_count(r_l, n_l)`` and the capacity ``N - prune_count(s, N)``.
  Counts are the integers really removed, so the target holds exactly when the
  ratios are applied (see :func:`global_sparsity`).

  Args:
    costs: layer -> {ratio -> cost}; any real numbers (lower is better), ``+inf``
      forbids a ratio for that layer. Keys must equal the candidates exactly.
    sizes: layer -> number of kernel weights (int >= 0).
    candidates_ratios: allowed ratios in [0, 1], e.g. ``(0, .1, ..., .9, .95)``.
    s: target global sparsity in [0, 1].
    tie_groups: lists of layers that must share one ratio.
    method: ``'dp'`` (default, with ILP fallback) or ``'ilp'``.

  Returns:
    layer -> ratio, in the key order of ``sizes``.

  Raises:
    ValueError: if the target is out of reach even with the largest allowed
      ratios (the message gives the maximum reachable sparsity), or for the
      input errors of :func:`allocate_bits`.
  """
  sizes = _check_sizes(sizes)
  cands = _check_ratios(candidates_ratios)
  s = _check_sparsity(s)
  layers = list(sizes)
  table = _cost_table(costs, layers, cands, "ratios")
  n = sum(sizes.values())
  kept = [[sizes[l] - prune_count(r, sizes[l]) for r in cands] for l in layers]
  capacity = n - prune_count(s, n)
  try:
    choice, _ = _solve_layers(table, kept, _groups(layers, tie_groups), capacity, method,
                              "kept weights")
  except _Infeasible as e:
    most = n - e.minimum
    frac = most / n if n else 0.0
    raise ValueError(f"Infeasible sparsity target {s} ({n - capacity} of {n} weights); the "
                     f"allowed ratios remove at most {most} ({frac:.6g}).") from None
  return {l: cands[j] for l, j in zip(layers, choice)}
