"""Tests of interaction-aware budgets: batched whole-model evaluation and the allocation search."""

import itertools

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest
from compile_log import compile_log
from conftest import train_small

from safer_jax.budgeting import mixed_precision, search
from safer_jax.core import layers, perturb
from safer_jax.measure import sweep
from safer_jax.training import train
from safer_jax.zoo import models


@pytest.fixture(scope="module")
def mlp(digits):
  model, variables = train_small(digits, "mlp", epochs=3)
  return model, variables, digits.eval.take(150)


def _one_by_one(apply, variables, split, allocations, make):
  out = [train.evaluate(apply, make(variables, a), split) for a in allocations]
  return np.array([m["accuracy"] for m in out]), np.array([m["loss"] for m in out])


def test_batched_evaluation_equals_one_by_one_quantized(mlp):
  """P whole mixed-precision models in chunks of 3 (padding included) = train.evaluate each."""
  model, variables, split = mlp
  names = layers.find_layers(variables)
  opts = search.quantized_options(variables, names, (2, 3, 4, 8), full_range=True)
  ev = search.AllocationEvaluator(model, variables, split, opts,
                                  sweep.SweepConfig(eval_batch_size=64), chunk=3)
  rng = np.random.default_rng(0)
  allocations = [{n: int(rng.choice([2, 3, 4, 8])) for n in names} for _ in range(7)]
  acc, loss = ev.evaluate(allocations)
  want_acc, want_loss = _one_by_one(model.apply, variables, split, allocations,
                                    lambda v, a: mixed_precision.quantize_model(
                                        v, a, full_range=True))
  np.testing.assert_array_equal(acc, want_acc)
  np.testing.assert_allclose(loss, want_loss, rtol=2e-5)
  assert ev.evaluations == 7 and ev.chunk == 3
  assert len(set(np.round(loss, 6))) > 1  # the candidates really differ
  # the options are quantize_model's kernels, bit for bit
  q = mixed_precision.quantize_model(variables, allocations[0], full_range=True)
  for n in names:
    np.testing.assert_array_equal(opts[n][allocations[0][n]], layers.get_kernel(q, n))


class _BNNet(nn.Module):
  """conv -> BatchNorm -> relu -> dense, with the zoo's ``train`` flag."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(6, (3, 3), name="conv")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=models.common.BN_MOMENTUM,
                     name="bn")(x)
    x = nn.relu(x).reshape(x.shape[0], -1)
    return nn.Dense(10, name="fc")(x)


def test_batched_evaluation_with_bn_recalibration_equals_one_by_one(digits):
  """A transform (BatchNorm re-estimated per pruned model) inside the batched call."""
  model = _BNNet()
  variables = train.init_variables(model, digits.eval.images.shape[1:], seed=0)
  calib = digits.train.images[:64]
  names = layers.find_layers(variables)
  ratios = (0.0, 0.5, 0.9)
  opts = search.pruned_options(variables, {n: ratios for n in names})
  ev = search.AllocationEvaluator(model, variables, digits.eval.take(100), opts,
                                  transform=lambda v: train.recalibrate_bn(model, v, calib))
  allocations = [{"conv": a, "fc": b} for a, b in itertools.product(ratios, ratios)]
  acc, loss = ev.evaluate(allocations)

  def make(v, a):
    out = v
    for n, r in a.items():
      out = layers.replace_kernel(out, n, perturb.prune(jnp.asarray(layers.get_kernel(v, n)), r))
    return train.recalibrate_bn(model, out, calib)

  want_acc, want_loss = _one_by_one(model.apply, variables, digits.eval.take(100), allocations,
                                    make)
  np.testing.assert_array_equal(acc, want_acc)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-4)


def test_evaluator_errors_name_the_bad_value(mlp):
  model, variables, split = mlp
  w = layers.get_kernel(variables, "head/fc")
  with pytest.raises(ValueError, match="'nope'.*layers"):
    search.AllocationEvaluator(model, variables, split, {"nope": {0: w}})
  with pytest.raises(ValueError, match="shape"):
    search.AllocationEvaluator(model, variables, split, {"head/fc": {0: w[:3]}})
  bad = np.array(w)
  bad[0, 0] = np.nan
  with pytest.raises(ValueError, match="NaN|inf|finite"):
    search.AllocationEvaluator(model, variables, split, {"head/fc": {0: bad}})
  ev = search.AllocationEvaluator(model, variables, split, {"head/fc": {4: w, 8: w}})
  with pytest.raises(ValueError, match="option index 2 for layer 'head/fc'.*0..1"):
    ev(np.array([[2]]))
  with pytest.raises(ValueError, match="3 for layer 'head/fc' is not one of its options"):
    ev.evaluate([{"head/fc": 3}])


# ---------------------------------------------------------------------------
# The search, on synthetic objectives with known answers.
# ---------------------------------------------------------------------------


def _problem(seed, groups=5, options=4):
  """Random resources and an objective with pairwise interactions (not additive)."""
  rng = np.random.default_rng(seed)
  res = [np.sort(rng.integers(1, 20, options)).astype(float) for _ in range(groups)]
  single = [np.sort(rng.random(options))[::-1] for _ in range(groups)]  # more resource, less loss
  pair = rng.normal(0, 0.3, (groups, groups, options, options))
  evaluated = []

  def loss_of(row):
    return sum(single[g][row[g]] for g in range(groups)) + sum(
        pair[a, b, row[a], row[b]] ** 2 for a in range(groups) for b in range(a + 1, groups))

  def evaluate(choices):
    evaluated.append(len(choices))
    loss = np.array([loss_of(r) for r in np.asarray(choices)])
    return np.zeros(len(loss)), loss

  return res, loss_of, evaluate, evaluated


def _cost(res, row):
  return sum(r[c] for r, c in zip(res, row))


@pytest.mark.parametrize("seed", range(6))
def test_search_stays_within_budget_and_never_loses_to_a_start(seed):
  res, loss_of, evaluate, evaluated = _problem(seed)
  capacity = 0.6 * sum(r.max() for r in res)
  feasible = [row for row in itertools.product(range(4), repeat=5) if _cost(res, row) <= capacity]
  rng = np.random.default_rng(100 + seed)
  starts = {f"s{i}": feasible[i] for i in rng.choice(len(feasible), 3, replace=False)}
  out = search.search(evaluate, res, capacity, starts, evaluations=60, batch=7, seed=seed)
  assert _cost(res, out.choice) <= capacity
  assert out.loss == pytest.approx(loss_of(out.choice))
  assert out.loss <= min(loss_of(s) for s in starts.values()) + 1e-12
  assert out.evaluations <= 60 and sum(evaluated) == out.evaluations
  assert max(evaluated) <= 7


def test_search_finds_the_brute_force_optimum_given_enough_evaluations():
  """Small enough to converge: the result is the best feasible candidate (brute force)."""
  res, loss_of, evaluate, _ = _problem(7, groups=4, options=3)
  capacity = 0.7 * sum(r.max() for r in res)
  feasible = [row for row in itertools.product(range(3), repeat=4) if _cost(res, row) <= capacity]
  best = min(loss_of(r) for r in feasible)
  start = min(feasible, key=lambda r: _cost(res, r))  # the cheapest: far from the optimum
  out = search.search(evaluate, res, capacity, {"cheap": start}, evaluations=10_000, batch=16,
                      seed=0, elites=len(feasible))
  assert out.loss == pytest.approx(best)
  assert out.converged and out.start == "cheap"


def test_search_same_seed_same_result():
  res, _, evaluate, _ = _problem(3)
  capacity = 0.5 * sum(r.max() for r in res)
  starts = {"low": (0, 0, 0, 0, 0)}
  a = search.search(evaluate, res, capacity, starts, evaluations=40, batch=5, seed=11)
  b = search.search(evaluate, res, capacity, starts, evaluations=40, batch=5, seed=11)
  np.testing.assert_array_equal(a.choice, b.choice)
  assert a.history == b.history and a.evaluations == b.evaluations


def test_search_rejects_bad_starts():
  res, _, evaluate, _ = _problem(0)
  with pytest.raises(ValueError, match="start 'big'.*over the budget 1"):
    search.search(evaluate, res, 1.0, {"big": (3, 3, 3, 3, 3)}, evaluations=4)
  with pytest.raises(ValueError, match="start 'short'"):
    search.search(evaluate, res, 1e9, {"short": (0, 0)}, evaluations=4)
  with pytest.raises(ValueError, match="objective='acc'"):
    search.search(evaluate, res, 1e9, {"a": (0,) * 5}, evaluations=4, objective="acc")


def test_search_allocation_on_a_real_model_respects_ties_and_budget(mlp):
  """Named layers and bit widths: within the bits budget, tied layers equal, never worse
  than its starts on the search split."""
  model, variables, split = mlp
  names = layers.find_layers(variables)
  sizes = {n: int(layers.get_kernel(variables, n).size) for n in names}
  cands = (2, 4, 8)
  ev = search.AllocationEvaluator(model, variables, split,
                                  search.quantized_options(variables, names, cands))
  resource = {n: {b: sizes[n] * b for b in cands} for n in names}
  capacity = 4 * sum(sizes.values())
  ties = [["dense2/fc", "head/fc"]]
  starts = {"low": {n: 2 for n in names}, "mixed": {"dense1/fc": 2, "dense2/fc": 4,
                                                   "head/fc": 4}}
  found = search.search_allocation(ev, resource, capacity, starts, tie_groups=ties,
                                   evaluations=12, batch=4, seed=0)
  assert found.resource <= capacity
  assert found.resource == sum(resource[n][b] for n, b in found.allocation.items())
  assert found.allocation["dense2/fc"] == found.allocation["head/fc"]
  assert found.result.loss <= min(l for _, l in found.result.starts.values())
  _, loss = ev.evaluate([found.allocation])
  assert loss[0] == pytest.approx(found.result.loss)
  with pytest.raises(ValueError, match="tied layers"):
    search.search_allocation(ev, resource, capacity, {"x": {"dense1/fc": 2, "dense2/fc": 2,
                                                            "head/fc": 4}},
                             tie_groups=ties, evaluations=4)


def test_interactions_against_direct_evaluation(mlp):
  """Joint and single loss increases equal train.evaluate of the models built by hand."""
  model, variables, split = mlp
  names = layers.find_layers(variables)
  perturbed = {n: perturb.quantize(layers.get_kernel(variables, n), 2) for n in names}
  table = search.interactions(model, variables, split, perturbed, top=3)
  base = train.evaluate(model.apply, variables, split)["loss"]

  def loss_with(ns):
    v = variables
    for n in ns:
      v = layers.replace_kernel(v, n, perturbed[n])
    return train.evaluate(model.apply, v, split)["loss"] - base

  assert len(table) == 3
  for row in table.itertuples():
    assert row.single_a == pytest.approx(loss_with([row.layer_a]), rel=1e-4, abs=1e-6)
    assert row.joint == pytest.approx(loss_with([row.layer_a, row.layer_b]), rel=1e-4, abs=1e-6)
    assert row.additive == pytest.approx(row.single_a + row.single_b)
    assert row.excess == pytest.approx(row.joint - row.additive)


def test_search_keeps_the_best_start_unless_the_improvement_is_significant():
  """Per-example losses: a lower mean within noise is not taken; a clear one is."""
  rng = np.random.default_rng(0)
  n = 400
  noise = rng.normal(0, 1.0, (3, n))
  base = 1.0 + 0.1 * rng.random(n)

  def make(shift):
    def evaluate(choices):
      rows = np.asarray(choices)[:, 0]
      per = np.stack([base + (0.0 if r == 0 else shift[r - 1]) + (noise[r] if r else 0.0)
                      for r in rows])
      return np.zeros(len(rows)), per.mean(axis=1), per
    return evaluate

  res = [np.array([0.0, 1.0, 2.0])]
  noisy = make([-0.02, -0.03])  # means a little lower, spread 1: z ~ 0.4-0.6
  out = search.search(noisy, res, 10.0, {"start": (0,)}, evaluations=3, seed=0)
  assert out.choice.tolist() == [0] and out.kept_start and np.isnan(out.z)
  plain = search.search(noisy, res, 10.0, {"start": (0,)}, evaluations=3, seed=0, min_z=0)
  assert plain.choice.tolist() != [0]  # the raw minimum would have taken the noise
  clear = make([-0.5, -0.02])  # option 1: 0.5 lower, z ~ 10
  out = search.search(clear, res, 10.0, {"start": (0,)}, evaluations=3, seed=0)
  assert out.choice.tolist() == [1] and out.z > 5 and not out.kept_start
  assert search.paired_z(np.ones(4), np.zeros(4)) == np.inf


def test_memory_budget_picks_a_fitting_chunk(mlp):
  """The chunk shrinks to fit memory_budget_bytes (XLA's analysis); too small is a ConfigError."""
  from safer_jax.core.errors import ConfigError  # pylint: disable=import-outside-toplevel
  model, variables, split = mlp
  names = layers.find_layers(variables)
  opts = search.quantized_options(variables, names, (2, 8))
  wide = sweep.SweepConfig(copies_per_step=8)  # copies side by side: memory grows with them
  big = search.AllocationEvaluator(model, variables, split, opts, wide, chunk=8)
  stats = big.lowered(8).compile().memory_analysis()
  need8 = (stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
           - stats.alias_size_in_bytes)
  fitted = search.AllocationEvaluator(
      model, variables, split, opts, sweep.SweepConfig(
          copies_per_step=8, memory_budget_bytes=need8, memory_margin=1.25), chunk=8)
  assert 1 <= fitted.chunk < 8
  choices = np.array([[0, 1, 0], [1, 1, 1], [1, 0, 0]])
  np.testing.assert_allclose(fitted(choices)[1], big(choices)[1], rtol=1e-6)
  with pytest.raises(ConfigError, match="memory budget 1000 bytes is too small"):
    search.AllocationEvaluator(model, variables, split, opts,
                               sweep.SweepConfig(memory_budget_bytes=1000))


def test_one_compilation_for_any_number_of_candidates(mlp):
  """Chunks are padded to one shape: after the first call, 1, 5 or 17 candidates compile
  nothing (JAX's compile events)."""
  model, variables, split = mlp
  names = layers.find_layers(variables)
  ev = search.AllocationEvaluator(model, variables, split.take(40),
                                  search.quantized_options(variables, names, (3, 5, 7)), chunk=4)
  rng = np.random.default_rng(1)
  ev(rng.integers(0, 3, (2, len(names))))  # compiles the program once
  with compile_log() as compiles:
    for count in (1, 5, 17):
      acc, loss = ev(rng.integers(0, 3, (count, len(names))))
      assert acc.shape == loss.shape == (count,)
  assert not compiles, compiles
