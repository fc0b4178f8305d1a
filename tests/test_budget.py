"""Tests of safer_jax.budgeting.budget against brute force (itertools.product) and NumPy."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from safer_jax.budgeting import budget as B

BITS = (2, 3, 4, 5, 6, 8)


def _instance(seed, nlayers=None, ncands=None, tie=False):
  """A small random problem: non-monotone costs (some negative), random sizes and budget."""
  rng = np.random.default_rng(seed)
  nl = nlayers or int(rng.integers(3, 7))
  nc = ncands or int(rng.integers(3, 5))
  cands = tuple(sorted(rng.choice(BITS, nc, replace=False).tolist()))
  layers = [f"block{i}/conv" for i in range(nl)]
  sizes = {l: int(rng.integers(1, 200)) for l in layers}
  costs = {l: {b: float(rng.normal()) for b in cands} for l in layers}
  n = sum(sizes.values())
  budget = int(rng.integers(n * cands[0], n * cands[-1] + 1))
  groups = None
  if tie:
    perm = rng.permutation(layers).tolist()
    groups = [perm[:2], perm[2:3 + int(rng.integers(0, 2))]]
  return costs, sizes, cands, budget, groups


def _brute_bits(costs, sizes, cands, budget, groups=None):
  layers = list(sizes)
  best = math.inf
  for combo in itertools.product(cands, repeat=len(layers)):
    bits = dict(zip(layers, combo))
    if groups and any(len({bits[l] for l in g}) > 1 for g in groups):
      continue
    if sum(sizes[l] * bits[l] for l in layers) <= budget:
      best = min(best, sum(costs[l][bits[l]] for l in layers))
  return best


def _check_alloc(a, costs, sizes, budget):
  assert set(a.bits) == set(sizes)
  total = sum(sizes[l] * a.bits[l] for l in sizes)
  assert a.total_bits == total <= budget
  assert a.avg_bits == pytest.approx(total / sum(sizes.values()))
  assert a.size_bytes == total / 8
  if costs is not None:
    assert a.total_cost == pytest.approx(sum(costs[l][a.bits[l]] for l in sizes))


@pytest.mark.parametrize("seed", range(40))
def test_allocate_bits_matches_brute_force(seed):
  costs, sizes, cands, budget, _ = _instance(seed)
  want = _brute_bits(costs, sizes, cands, budget)
  dp = B.allocate_bits(costs, sizes, cands, budget)
  ilp = B.allocate_bits(costs, sizes, cands, budget, method="ilp")
  assert (dp.method, ilp.method) == ("dp", "ilp")
  for a in (dp, ilp):
    _check_alloc(a, costs, sizes, budget)
    assert a.total_cost == pytest.approx(want, abs=1e-9)


@pytest.mark.parametrize("seed", range(20))
def test_tie_groups_match_restricted_brute_force(seed):
  costs, sizes, cands, budget, groups = _instance(seed + 100, tie=True)
  # The budget must admit the all-minimum allocation (always true here).
  want = _brute_bits(costs, sizes, cands, budget, groups)
  for method in B.METHODS:
    a = B.allocate_bits(costs, sizes, cands, budget, tie_groups=groups, method=method)
    _check_alloc(a, costs, sizes, budget)
    for g in groups:
      assert len({a.bits[l] for l in g}) == 1
    assert a.total_cost == pytest.approx(want, abs=1e-9)


def test_dp_equals_ilp_on_a_larger_problem():
  rng = np.random.default_rng(7)
  # ResNet-like kernel sizes, ~300k weights, 6 widths: DP runs on the gcd grid.
  shapes = [(3, 3, 3, 16)] + [(3, 3, 16, 16)] * 4 + [(3, 3, 16, 32), (3, 3, 32, 32)] * 3 + \
      [(3, 3, 32, 64), (3, 3, 64, 64)] * 3 + [(64, 10)]
  sizes = {f"l{i}": math.prod(s) for i, s in enumerate(shapes)}
  # Costs roughly decreasing in bits with noise (non-monotone in places).
  costs = {l: {b: float(rng.uniform(0.5, 2) * 4.0 ** -b + rng.normal(0, 1e-3)) for b in BITS}
           for l in sizes}
  for avg in (2.5, 3.7, 4.0, 5.3):
    budget = B.budget_from_avg_bits(sizes, avg)
    dp = B.allocate_bits(costs, sizes, BITS, budget)
    ilp = B.allocate_bits(costs, sizes, BITS, budget, method="ilp")
    assert dp.method == "dp"
    _check_alloc(dp, costs, sizes, budget)
    _check_alloc(ilp, costs, sizes, budget)
    assert dp.avg_bits <= avg
    assert dp.total_cost == pytest.approx(ilp.total_cost, rel=1e-9, abs=1e-12)


def test_dp_falls_back_to_ilp_when_the_grid_is_large(monkeypatch):
  costs, sizes, cands, budget, _ = _instance(3)
  want = _brute_bits(costs, sizes, cands, budget)
  monkeypatch.setattr(B, "_DP_MAX_CELLS", 2)
  a = B.allocate_bits(costs, sizes, cands, budget)
  assert a.method == "ilp"
  assert a.total_cost == pytest.approx(want, abs=1e-9)


def test_large_coprime_sizes_use_ilp():
  sizes = {"a": 1_000_003, "b": 999_983, "c": 1_000_033}  # primes: gcd grid is 1 weight
  costs = {"a": {2: 3.0, 4: 1.0, 8: 0.0}, "b": {2: 2.0, 4: 1.5, 8: 0.0},
           "c": {2: 5.0, 4: 0.5, 8: 0.4}}
  budget = B.budget_from_avg_bits(sizes, 4.0)
  a = B.allocate_bits(costs, sizes, (2, 4, 8), budget)
  assert a.method == "ilp"
  _check_alloc(a, costs, sizes, budget)
  assert a.total_cost == pytest.approx(_brute_bits(costs, sizes, (2, 4, 8), budget))


def test_forbidden_widths_and_ties_prefer_narrow():
  sizes = {"first": 10, "mid": 10, "last": 10}
  costs = {"first": {2: math.inf, 4: math.inf, 8: 0.0}, "mid": {2: 1.0, 4: 1.0, 8: 1.0},
           "last": {2: 0.0, 4: 0.0, 8: 0.0}}
  a = B.allocate_bits(costs, sizes, (2, 4, 8), 10 * 8 + 10 * 8 + 10 * 8)
  assert a.bits == {"first": 8, "mid": 2, "last": 2}
  with pytest.raises(ValueError, match="minimum feasible one is 120"):
    B.allocate_bits(costs, sizes, (2, 4, 8), 119)


def test_budget_helpers():
  sizes = {"a": 6, "b": 4}
  assert B.budget_from_avg_bits(sizes, 4.2) == 42
  assert B.budget_from_avg_bits(sizes, 4.25) == 42
  assert B.budget_from_bytes(5) == 40
  with pytest.raises(ValueError):
    B.budget_from_avg_bits(sizes, 0)


def test_infeasible_budget_names_the_minimum():
  costs, sizes, cands, _, _ = _instance(5)
  minimum = sum(sizes.values()) * cands[0]
  B.allocate_bits(costs, sizes, cands, minimum)  # exactly the minimum is feasible
  for fn in (lambda: B.allocate_bits(costs, sizes, cands, minimum - 1),
             lambda: B.uniform_allocation(sizes, cands, minimum - 1),
             lambda: B.random_allocation(sizes, cands, minimum - 1, seed=0)):
    with pytest.raises(ValueError, match=f"{minimum - 1}.*minimum feasible one is {minimum}"):
      fn()


def test_input_errors():
  sizes = {"a": 3, "b": 5}
  costs = {"a": {2: 0.0, 4: 1.0}, "b": {2: 0.0, 4: 1.0}}
  with pytest.raises(ValueError, match="not candidates"):
    B.allocate_bits({**costs, "a": {2: 0.0, 4: 1.0, 3: 2.0}}, sizes, (2, 4), 100)
  with pytest.raises(ValueError, match="lacks"):
    B.allocate_bits({**costs, "a": {2: 0.0}}, sizes, (2, 4), 100)
  with pytest.raises(ValueError, match=">= 0"):
    B.allocate_bits(costs, {"a": -3, "b": 5}, (2, 4), 100)
  with pytest.raises(ValueError, match="same layers"):
    B.allocate_bits(costs, {"a": 3}, (2, 4), 100)
  with pytest.raises(ValueError, match="valid methods"):
    B.allocate_bits(costs, sizes, (2, 4), 100, method="greedy")
  with pytest.raises(ValueError, match="unknown layer"):
    B.allocate_bits(costs, sizes, (2, 4), 100, tie_groups=[["a", "z"]])
  with pytest.raises(ValueError, match="more than one"):
    B.allocate_bits(costs, sizes, (2, 4), 100, tie_groups=[["a", "b"], ["a"]])
  with pytest.raises(ValueError, match="finite or"):
    B.allocate_bits({**costs, "a": {2: math.nan, 4: 1.0}}, sizes, (2, 4), 100)


@pytest.mark.parametrize("seed", range(10))
def test_uniform_and_random_allocations_are_feasible(seed):
  costs, sizes, cands, budget, groups = _instance(seed + 200, tie=True)
  n = sum(sizes.values())
  u = B.uniform_allocation(sizes, cands, budget, costs=costs)
  _check_alloc(u, costs, sizes, budget)
  assert len(set(u.bits.values())) == 1
  b = u.bits[next(iter(sizes))]
  assert b == max(c for c in cands if n * c <= budget)
  r = B.random_allocation(sizes, cands, budget, seed=seed, tie_groups=groups)
  _check_alloc(r, None, sizes, budget)
  assert math.isnan(r.total_cost)
  for g in groups:
    assert len({r.bits[l] for l in g}) == 1
  # Maximal: no group or free layer can move one step up within the budget.
  slack = budget - r.total_bits
  items = groups + [[l] for l in sizes if not any(l in g for g in groups)]
  for item in items:
    b = r.bits[item[0]]
    if b != cands[-1]:
      nxt = cands[cands.index(b) + 1]
      assert sum(sizes[l] for l in item) * (nxt - b) > slack
  assert r.bits == B.random_allocation(sizes, cands, budget, seed=seed, tie_groups=groups).bits


# ---------------------------------------------------------------------------
# Pruning ratios.
# ---------------------------------------------------------------------------

SHAPES = {"conv1": (3, 3, 3, 16), "conv2": (3, 3, 16, 32), "conv3": (3, 3, 32, 64),
          "fc": (64, 10)}


def _count(r, n):
  return int(np.floor(np.float32(r) * np.float32(n)))


def test_uniform_ratios_and_global_sparsity():
  sizes = {l: math.prod(s) for l, s in SHAPES.items()}
  r = B.uniform_ratios(sizes, 0.5)
  assert r == {l: 0.5 for l in sizes}
  n = sum(sizes.values())
  assert B.global_sparsity(r, sizes) == sum(_count(0.5, m) for m in sizes.values()) / n


@pytest.mark.parametrize("s", [0.0, 0.3, 0.5, 0.8, 0.9, 0.95, 0.99, 1.0])
def test_erk_ratios(s):
  sizes = {l: math.prod(sh) for l, sh in SHAPES.items()}
  r = B.erk_ratios(SHAPES, s)
  assert list(r) == list(SHAPES)
  assert all(0 <= v <= 1 for v in r.values())  # density in [0, 1]
  n = sum(sizes.values())
  assert sum(r[l] * sizes[l] for l in sizes) == pytest.approx(s * n, abs=1e-6 * n)
  assert s - len(sizes) / n <= B.global_sparsity(r, sizes) <= s + 1e-12
  # ERK ordering: denser where (sum dims)/(prod dims) is larger, among non-dense layers.
  score = {l: sum(sh) / math.prod(sh) for l, sh in SHAPES.items()}
  sparse = sorted((l for l in r if r[l] > 0), key=score.get)
  assert [r[l] for l in sparse] == sorted((r[l] for l in sparse), reverse=True)


def test_erk_makes_small_layers_dense():
  shapes = {"tiny": (2, 2), "big": (256, 256)}
  r = B.erk_ratios(shapes, 0.5)
  assert r["tiny"] == 0.0  # raw density would exceed 1
  assert 4 * 0 + 65536 * r["big"] == pytest.approx(0.5 * (4 + 65536))
  assert B.erk_ratios(shapes, 0.5, power_scale=0.0) == pytest.approx({"tiny": .5, "big": .5})


@pytest.mark.parametrize("s", [0.0, 0.1, 0.37, 0.5, 0.57, 0.9, 1.0])
def test_global_magnitude_ratios_exact_count(s):
  rng = np.random.default_rng(0)
  kernels = {l: rng.standard_normal(sh).astype(np.float32) * (i + 1)
             for i, (l, sh) in enumerate(SHAPES.items())}
  kernels["fc"][:4] = 0.25  # ties across rows; broken by flat index
  n = sum(w.size for w in kernels.values())
  ratios = B.global_magnitude_ratios(kernels, s)
  k = _count(s, n)
  zeros = 0
  thresh = np.sort(np.concatenate([np.abs(w).ravel() for w in kernels.values()]))
  for l, w in kernels.items():
    c = _count(ratios[l], w.size)
    # NumPy reference of perturb.prune(method='magnitude'): c smallest |w|, ties by flat index.
    flat = w.ravel().copy()
    flat[np.argsort(np.abs(flat), kind="stable")[:c]] = 0
    zeros += int((flat == 0).sum())
    if 0 < k < n and c < w.size:  # the kept weights are all >= the global threshold
      assert np.abs(np.delete(w.ravel(), np.argsort(np.abs(w.ravel()), kind="stable")[:c])).min() \
          >= thresh[k - 1]
  assert zeros == k
  assert B.global_sparsity(ratios, {l: w.size for l, w in kernels.items()}) == k / n


def test_global_magnitude_ratios_with_perturb_prune():
  from safer_jax.core import perturb
  rng = np.random.default_rng(1)
  kernels = {"a": rng.standard_normal((3, 3, 4, 8)).astype(np.float32),
             "b": 3 * rng.standard_normal((32, 10)).astype(np.float32)}
  ratios = B.global_magnitude_ratios(kernels, 0.6)
  zeros = sum(int((np.asarray(perturb.prune(w, ratios[l])) == 0).sum()) for l, w in kernels.items())
  assert zeros == _count(0.6, 288 + 320)


def _brute_ratios(costs, sizes, cands, s, groups=None):
  layers = list(sizes)
  n = sum(sizes.values())
  best = math.inf
  for combo in itertools.product(cands, repeat=len(layers)):
    r = dict(zip(layers, combo))
    if groups and any(len({r[l] for l in g}) > 1 for g in groups):
      continue
    if sum(_count(r[l], sizes[l]) for l in layers) >= _count(s, n):
      best = min(best, sum(costs[l][r[l]] for l in layers))
  return best


@pytest.mark.parametrize("seed", range(25))
def test_allocate_ratios_matches_brute_force(seed):
  rng = np.random.default_rng(seed + 300)
  nl = int(rng.integers(3, 6))
  cands = tuple(sorted(rng.choice([0.0, 0.1, 0.25, 0.5, 0.7, 0.9, 0.95], int(rng.integers(3, 5)),
                                  replace=False).tolist()))
  sizes = {f"l{i}": int(rng.integers(1, 300)) for i in range(nl)}
  costs = {l: {r: float(rng.normal()) for r in cands} for l in sizes}
  n = sum(sizes.values())
  most = sum(_count(cands[-1], m) for m in sizes.values()) / n
  s = float(rng.uniform(0, most))
  groups = [list(sizes)[:2]] if seed % 2 else None
  want = _brute_ratios(costs, sizes, cands, s, groups)
  for method in B.METHODS:
    r = B.allocate_ratios(costs, sizes, cands, s, tie_groups=groups, method=method)
    assert list(r) == list(sizes) and all(v in cands for v in r.values())
    assert B.global_sparsity(r, sizes) >= _count(s, n) / n
    assert sum(costs[l][r[l]] for l in sizes) == pytest.approx(want, abs=1e-9)


def test_allocate_ratios_infeasible():
  sizes = {"a": 100, "b": 100}
  costs = {l: {0.0: 0.0, 0.5: 1.0} for l in sizes}
  assert B.allocate_ratios(costs, sizes, (0.0, 0.5), 0.25) in ({"a": 0.5, "b": 0.0},
                                                                {"a": 0.0, "b": 0.5})
  with pytest.raises(ValueError, match=r"at most 100 \(0.5\)"):
    B.allocate_ratios(costs, sizes, (0.0, 0.5), 0.6)
  with pytest.raises(ValueError, match="in \\[0, 1\\]"):
    B.allocate_ratios(costs, sizes, (0.0, 0.5), 1.5)


def test_bops_by_hand():
  macs = {"a": 9216, "b": 73728, "c": 640}
  assert B.bops({"a": 8, "b": 4, "c": 2}, macs, 8) == (9216 * 8 + 73728 * 4 + 640 * 2) * 8
