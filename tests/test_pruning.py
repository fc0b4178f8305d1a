"""Tests of safer_jax.budgeting.pruning: cost tables, allocations under a sparsity budget,
pruned models."""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import train_small

from safer_jax.budgeting import budget, pruning
from safer_jax.core import layers

SHAPES = {"conv1": (3, 3, 1, 8), "conv2": (3, 3, 8, 16), "fc1": (64, 32), "head": (32, 10)}
CANDIDATES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)


def _variables(seed=0):
  rng = np.random.default_rng(seed)
  params = {name: {"kernel": jnp.asarray(rng.normal(size=shape), jnp.float32),
                   "bias": jnp.asarray(rng.normal(size=shape[-1]), jnp.float32)}
            for name, shape in SHAPES.items()}
  return {"params": params}



@pytest.mark.parametrize("target", [0.3, 0.5, 0.77, 0.9])
def test_pruning_reaches_the_target_sparsity(target):
  variables = _variables()
  names = layers.find_layers(variables)
  kernels = {n: np.asarray(layers.get_kernel(variables, n)) for n in names}
  sizes = {n: w.size for n, w in kernels.items()}
  total = sum(sizes.values())
  want = budget.prune_count(target, total)
  candidates = CANDIDATES
  tables = {"magnitude": pruning.removed_cost_table(
      kernels, {n: w.astype(np.float64) ** 2 for n, w in kernels.items()}, candidates)}
  for source in ("uniform", "erk", "global_magnitude", "magnitude"):
    ratios = pruning.ratios_for(source, target, kernels, tables, candidates)
    pruned = pruning.prune_model(variables, ratios)
    zeros = sum(int(np.sum(np.asarray(layers.get_kernel(pruned, n)) == 0)) for n in names)
    assert zeros == round(budget.global_sparsity(ratios, sizes) * total), source
    if source == "global_magnitude":
      assert zeros == want
      # one global threshold: every kept |w| >= every pruned |w|
      allw = np.concatenate([np.abs(w).ravel() for w in kernels.values()])
      kept = np.concatenate([np.asarray(layers.get_kernel(pruned, n)).ravel() != 0
                             for n in names])
      assert allw[kept].min() >= allw[~kept].max()
    elif source in ("uniform", "erk"):
      assert abs(zeros - target * total) <= len(names), (source, zeros, target * total)
    else:  # cost-guided over discrete candidates: at least the target
      assert zeros >= want


def test_removed_cost_table_counts_the_pruned_weights():
  w = np.array([[3.0, -1.0], [0.5, 2.0]], np.float32)
  table = pruning.removed_cost_table({"a": w}, {"a": w.astype(np.float64) ** 2},
                                     (0.0, 0.25, 0.5, 1.0))
  assert table["a"] == {0.0: 0.0, 0.25: 0.25, 0.5: 1.25, 1.0: 14.25}


def test_removed_cost_table_matches_brute_force():
  rng = np.random.default_rng(3)
  w = rng.normal(size=(6, 5)).astype(np.float32)
  w[0, :2] = w[1, :2]  # ties: the lower flat index is pruned first
  cost = rng.uniform(size=w.shape)
  table = pruning.removed_cost_table({"a": w}, {"a": cost}, CANDIDATES)["a"]
  for r in CANDIDATES:  # the pruned model's zeros are exactly the entries the table sums over
    pruned = np.asarray(layers.get_kernel(pruning.prune_model({"params": {"a": {"kernel": w}}},
                                                              {"a": r}), "a"))
    np.testing.assert_allclose(table[r], cost[pruned == 0].sum(), rtol=1e-12)


def test_cost_tables_of_a_trained_model(digits):
  net, variables = train_small(digits, "mlp", 1)
  tables, seconds = pruning.cost_tables(net, variables, digits.train.take(64), (0.0, 0.5, 0.9),
                                        ("magnitude", "fisher"), batch_size=32)
  names = layers.find_layers(variables)
  assert set(tables) == set(seconds) == {"magnitude", "fisher"}
  for source, table in tables.items():
    assert list(table) == names
    for n in names:  # no cost at ratio 0, non-decreasing in the ratio
      assert table[n][0.0] == 0.0 and 0 <= table[n][0.5] <= table[n][0.9], (source, n)
