"""Tests of safer_jax.budgeting.plan: one call from a model, data and a budget to a plan."""

import dataclasses
import re
import textwrap

import jax
import numpy as np
import pytest
from conftest import train_small
from flax import nnx

import safer_jax as sj
from safer_jax.budgeting import budget, deploy, mixed_precision, plan, pruning, search
from safer_jax.core import layers
from safer_jax.training import train

CALIB = 128


class NnxNet(nnx.Module):
  """A small nnx classifier of the 8x8 digits: conv, BatchNorm, two Linear layers."""

  def __init__(self, rngs):
    self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(4, rngs=rngs)
    self.fc = nnx.Linear(256, 16, rngs=rngs)
    self.out = nnx.Linear(16, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn(self.conv(x))).reshape(len(x), -1)
    return self.out(nnx.relu(self.fc(x)))


@pytest.fixture(scope="module")
def linen(digits):
  """``(model, variables)``: the zoo mlp, briefly trained."""
  return train_small(digits, "mlp", epochs=3)


@pytest.fixture(scope="module")
def nnx_model(digits):
  """``(wrapped nnx model, None)``: its variables are those of the wrapped model."""
  model = sj.wrap(NnxNet(nnx.Rngs(0)))
  small = dataclasses.replace(digits, train=digits.train.take(512))
  variables, _ = sj.fit(model, small, sj.TrainConfig(epochs=3), progress=False)
  return sj.wrap(model, variables), None


MODELS = ("linen", "nnx_model")


def _model(request, name):
  model, variables = request.getfixturevalue(name)
  return model, variables, (model.variables if variables is None else variables)


def _sizes(variables):
  return {n: int(layers.get_kernel(variables, n).size) for n in layers.find_layers(variables)}


@pytest.mark.parametrize("name", MODELS)
def test_bits_plan_is_the_lower_level_allocation(request, digits, name):
  model, given, variables = _model(request, name)
  p = sj.allocate(model, given, digits, sj.BitBudget(3.5), calib_examples=CALIB)
  # Reference: the cost table and knapsack called directly on the first CALIB training examples.
  sizes = _sizes(variables)
  cands = (2, 3, 4, 5, 6, 8)
  tables, _ = mixed_precision.cost_tables(model, given, digits.train.take(CALIB), cands,
                                          ("fisher",), max_batches=1)
  ref = budget.allocate_bits(tables["fisher"], sizes, cands,
                             budget.budget_from_avg_bits(sizes, 3.5))
  assert p.kind == "bits" and p.source == "fisher" and p.search is None
  assert p.values == ref.bits and list(p.values) == list(sizes)
  assert p.resource == ref.total_bits <= p.capacity == ref.budget_bits
  assert sum(sizes[n] * b for n, b in p.values.items()) / sum(sizes.values()) <= 3.5
  # apply + evaluate = evaluate of quantize_model's output
  expected = train.evaluate(model, mixed_precision.quantize_model(variables, ref.bits),
                            digits.eval)
  assert p.evaluate(model, digits, variables=given) == expected
  # qwix rules round-trip; the plan round-trips through JSON
  assert deploy.from_qwix_rules(p.to_qwix(variables), list(sizes)) == p.values
  assert sj.Plan.from_json(p.to_json()) == p


@pytest.mark.parametrize("name", MODELS)
def test_ratios_plan_is_the_lower_level_allocation(request, digits, name):
  model, given, variables = _model(request, name)
  target = sj.RatioBudget(0.7)
  p = sj.allocate(model, given, digits.train, target, calib_examples=CALIB)
  sizes = _sizes(variables)
  kernels = {n: np.asarray(layers.get_kernel(variables, n)) for n in sizes}
  calib = digits.train.take(CALIB)
  wrapped, _ = sj.core.wrapping.as_model(model, given)
  tables, _ = pruning.cost_tables(wrapped, variables, calib, target.candidates, ("fisher",),
                                  batch_size=CALIB)
  ref = pruning.ratios_for("fisher", 0.7, kernels, tables, target.candidates)
  assert p.kind == "ratios" and p.values == ref
  total = sum(sizes.values())
  assert budget.global_sparsity(p.values, sizes) >= budget.prune_count(0.7, total) / total
  assert p.resource == total - sum(budget.prune_count(r, sizes[n]) for n, r in ref.items())
  assert p.resource <= p.capacity
  expected = train.evaluate(model, pruning.prune_model(variables, ref), digits.eval)
  assert p.evaluate(model, digits, variables=given) == expected
  assert sj.Plan.from_json(p.to_json()) == p
  with pytest.raises(ValueError, match=r"to_qwix\(\) needs a bits plan.*kind='ratios'"):
    p.to_qwix()


def test_search_starts_from_the_knapsack_and_keeps_the_budget(linen, digits):
  model, variables = linen
  p = sj.allocate(model, variables, digits, sj.BitBudget(3.0), search=12, calib_examples=CALIB,
                  source="quant_error")
  knapsack = sj.allocate(model, variables, digits, sj.BitBudget(3.0), calib_examples=CALIB,
                         source="quant_error")
  sizes, cands = _sizes(variables), (2, 3, 4, 5, 6, 8)
  ev = search.AllocationEvaluator(model, variables, digits.train.take(CALIB),
                                  search.quantized_options(variables, list(sizes), cands))
  ref = search.search_allocation(ev, {n: {b: sizes[n] * b for b in cands} for n in sizes},
                                 knapsack.capacity, {"quant_error": knapsack.values},
                                 evaluations=12)
  assert p.values == ref.allocation and p.resource == ref.resource <= p.capacity
  assert p.search["evaluations"] == ref.result.evaluations <= 12
  assert p.search["start"] == "quant_error" and p.search["calib_examples"] == CALIB
  assert sj.Plan.from_json(p.to_json()) == p
  # pruning: the knapsack's ratios plus every start's are the options; the budget holds
  r = sj.allocate(model, variables, digits, sj.RatioBudget(0.8), source="global_magnitude",
                  search=8, calib_examples=CALIB)
  assert r.resource <= r.capacity and r.search["evaluations"] <= 8


def test_registry_names_map_to_cost_sources(linen, digits):
  model, variables = linen
  assert plan.resolve_source("bits", "hawq_v2") == "hawq"
  assert plan.resolve_source("bits", "fisher") == "fisher"
  p = sj.allocate(model, variables, digits, sj.BitBudget(4.0), source="corruption_first_order",
                  calib_examples=CALIB)
  q = sj.allocate(model, variables, digits, sj.BitBudget(4.0), source="corruption",
                  calib_examples=CALIB)
  assert p.source == "corruption" and p == q


def test_clear_errors(linen, digits):
  model, variables = linen
  with pytest.raises(ValueError, match=r"Unknown source 'fisher_v9'.*allowed: \['oracle', "
                                       r"'hawq', 'fisher'.*hawq_v2"):
    sj.allocate(model, variables, digits, sj.BitBudget(4.0), source="fisher_v9")
  with pytest.raises(ValueError, match=r"Unknown source 'hawq'.*pruning.*'magnitude'"):
    sj.allocate(model, variables, digits, sj.RatioBudget(0.5), source="hawq")
  with pytest.raises(ValueError, match=r"avg_bits=1\.5 is out of range; allowed: .*\[2, 8\]"):
    sj.BitBudget(1.5)
  with pytest.raises(ValueError, match=r"avg_bits=9 is out of range"):
    sj.BitBudget(9)
  with pytest.raises(ValueError, match=r"candidates=\(0, 4\).*1\.\.16.*bad: \[0\]"):
    sj.BitBudget(4.0, candidates=(0, 4))
  with pytest.raises(ValueError, match=r"unit='bytes'; allowed: \['bits', 'bops'\]"):
    sj.BitBudget(4.0, unit="bytes")
  with pytest.raises(ValueError, match=r"sparsity=1\.0 is out of range; allowed: .*\[0, 1\)"):
    sj.RatioBudget(1.0)
  with pytest.raises(ValueError, match=r"search=-1; allowed: an integer >= 0"):
    sj.allocate(model, variables, digits, sj.BitBudget(4.0), search=-1)
  with pytest.raises(ValueError, match=r"budget must be a BitBudget, a RatioBudget or a ProtectBudget"):
    sj.allocate(model, variables, digits, 4.0)
  with pytest.raises(ValueError, match=r"search=4 starts from source 'uniform'"):
    sj.allocate(model, variables, digits, sj.RatioBudget(0.77), source="uniform", search=4)
  with pytest.raises(ValueError, match=r"Not a plan: kind='nope'"):
    sj.Plan.from_json('{"kind": "nope"}')


def test_the_module_docstring_example_runs(zoo_cache, monkeypatch, capsys):
  """The six-call example: its plan deploys through qwix with the simulated accuracy."""
  monkeypatch.setenv("SAFER_JAX_CACHE", zoo_cache)
  code = textwrap.dedent(re.search(r"six calls::\n\n(.*?)\n\n", plan.__doc__, re.S).group(1))
  calls = re.findall(r"# (\d)", code)
  assert calls[-1] == "6"
  scope = {}
  exec(code, scope)  # pylint: disable=exec-used
  p, entry, ds = scope["plan"], scope["entry"], scope["ds"]
  assert p.search["evaluations"] <= 16 and p.resource <= p.capacity
  deployed = sj.evaluate(scope["deployed"], entry.variables, ds)
  simulated = p.evaluate(entry.model, ds, variables=entry.variables)
  assert deployed["accuracy"] == pytest.approx(simulated["accuracy"], abs=1 / 359)
  assert "accuracy" in capsys.readouterr().out


def test_protect_plan_takes_the_most_sensitive_weights_per_param_and_keeps_the_budget(linen,
                                                                                     digits):
  model, variables = linen
  calib = digits.train.take(CALIB)
  sizes = _sizes(variables)
  p = sj.allocate(model, variables, calib, sj.ProtectBudget(fraction=0.3), source="grad_norm")
  assert p.kind == "protect" and list(p.values) == list(sizes)
  assert p.resource == sum(sizes[n] for n in p.protected) <= p.capacity == int(0.3 * sum(sizes.values()))
  # Independently: grad norm per kernel weight from jax.grad, layers greedily by that score.
  loss_fn = train.task_loss_fn(model, variables)
  g = jax.grad(loss_fn)(variables["params"], calib.as_batch())
  score = {n: float(np.linalg.norm(np.asarray(layers.get_kernel({"params": g}, n)))) / sizes[n]
           for n in sizes}
  want, used = [], 0
  for n in sorted(sizes, key=lambda n: -score[n]):
    if used + sizes[n] <= 0.3 * sum(sizes.values()):
      want.append(n)
      used += sizes[n]
  assert set(p.protected) == set(want)
  everything = sj.allocate(model, variables, calib, sj.ProtectBudget(1.0), source="grad_norm")
  nothing = sj.allocate(model, variables, calib, sj.ProtectBudget(0.0), source="grad_norm")
  assert everything.protected == list(sizes) and nothing.protected == []
  # All protected: faults change nothing, the int8 model's accuracy at any rate, on every seed.
  clean = nothing.evaluate(model, digits, variables=variables, rate=0.0, seeds=2)  # int8, no faults
  hit = everything.evaluate(model, digits, variables=variables, rate=0.05, seeds=4)
  assert hit["accuracy"] == pytest.approx(clean["accuracy"]) and hit["accuracy_std"] == 0
  assert abs(clean["accuracy"] - train.evaluate(model, variables, digits.eval)["accuracy"]) < 0.02
  bare = nothing.evaluate(model, digits, variables=variables, rate=0.05, seeds=4)
  assert bare["accuracy"] < hit["accuracy"] - 0.2 and bare["accuracy_std"] > 0
  assert sj.Plan.from_json(p.to_json()) == p
  with pytest.raises(ValueError, match="protection changes no weight"):
    p.apply(variables)
  with pytest.raises(ValueError, match="fraction=1.5"):
    sj.ProtectBudget(1.5)
  with pytest.raises(ValueError, match="'nope'.*allowed: a criterion"):
    sj.allocate(model, variables, calib, sj.ProtectBudget(0.3), source="nope")
  with pytest.raises(ValueError, match="not searched"):
    sj.allocate(model, variables, calib, sj.ProtectBudget(0.3), source="fisher", search=4)



def test_protect_plan_draws_its_criterion_with_the_allocate_seed(linen, digits, monkeypatch):
  """``Planner.allocate(seed=)`` reaches the criterion's key (it used the planner's seed)."""
  model, variables = linen
  keys, real = [], plan.criteria.compute_all

  def recorded(*args, **kwargs):
    keys.append(np.asarray(jax.random.key_data(kwargs["key"])).tolist())
    return real(*args, **kwargs)

  monkeypatch.setattr(plan.criteria, "compute_all", recorded)
  planner = sj.Planner(model, variables, digits.train.take(CALIB), seed=0)
  planner.allocate(sj.ProtectBudget(0.3), source="grad_norm")
  planner.allocate(sj.ProtectBudget(0.3), source="grad_norm", seed=7)
  assert keys == [np.asarray(jax.random.key_data(jax.random.key(s))).tolist() for s in (0, 7)]

# ---------------------------------------------------------------------------
# Planner: many budgets on one model, each cost table once.
# ---------------------------------------------------------------------------


def _counting(monkeypatch, module):
  """Patches ``module.cost_tables`` to record the sources of each call; returns the record."""
  calls, real = [], module.cost_tables

  def counted(*args, **kwargs):
    calls.append(tuple(args[4]))
    return real(*args, **kwargs)

  monkeypatch.setattr(module, "cost_tables", counted)
  return calls


def test_planner_computes_each_table_once_across_budgets(linen, digits, monkeypatch):
  model, variables = linen
  bit_calls = _counting(monkeypatch, mixed_precision)
  ratio_calls = _counting(monkeypatch, pruning)
  planner = sj.Planner(model, variables, digits, calib_examples=CALIB)
  tables = planner.cost_tables(sj.BitBudget(3.0), ("fisher", "quant_error", "uniform"))
  assert list(tables) == ["fisher", "quant_error"] and bit_calls == [("fisher", "quant_error")]
  plans = [planner.allocate(sj.BitBudget(b), source=s, search=n)
           for b in (3.0, 4.0, 6.0) for s, n in (("fisher", 0), ("quant_error", 4))]
  assert bit_calls == [("fisher", "quant_error")]  # every budget reused the two tables
  planner.allocate(sj.BitBudget(3.0, candidates=(2, 4, 8)))  # other candidates: a new table
  planner.allocate(sj.BitBudget(3.0, full_range=False))  # another grid: a new table
  assert bit_calls[1:] == [("fisher",), ("fisher",)]
  # ... and gave what sj.allocate (a planner of its own) gives
  assert plans[2] == sj.allocate(model, variables, digits, sj.BitBudget(4.0),
                                 calib_examples=CALIB)
  for sparsity in (0.5, 0.7, 0.9):
    planner.allocate(sj.RatioBudget(sparsity), source="fisher")
  assert ratio_calls == [("fisher",)]
  assert set(planner.seconds) == {"fisher", "quant_error"}


def test_planner_search_from_several_sources_is_search_allocation_from_their_solutions(
    linen, digits):
  model, variables = linen
  planner = sj.Planner(model, variables, digits, calib_examples=CALIB, search_examples=256,
                       search_batch=4, seed=3)
  b = sj.BitBudget(3.5)
  starts = {s: planner.allocate(b, source=s).values for s in ("fisher", "quant_error", "uniform")}
  p = planner.allocate(b, source=("fisher", "quant_error", "uniform"), search=10)
  sizes, cands = _sizes(variables), b.candidates
  ev = search.AllocationEvaluator(model, variables, digits.train.take(256),
                                  search.quantized_options(variables, list(sizes), cands))
  ref = search.search_allocation(ev, {n: {w: sizes[n] * w for w in cands} for n in sizes},
                                 p.capacity, starts, evaluations=10, batch=4, seed=3)
  assert p.values == ref.allocation and p.resource == ref.resource <= p.capacity
  assert p.method == "search" and p.source == ("fisher", "quant_error", "uniform")
  assert set(p.search["starts"]) == set(starts) and p.search["start"] == ref.result.start
  assert p.search["calib_examples"] == 256 and p.search["skipped_starts"] == []
  assert sj.Plan.from_json(p.to_json()) == p
  # pruning: a start over the budget (uniform's per-layer flooring) is skipped, not fatal
  r = planner.allocate(sj.RatioBudget(0.77), source=("uniform", "fisher"), search=6)
  assert r.search["skipped_starts"] == ["uniform"] and list(r.search["starts"]) == ["fisher"]
  assert r.resource <= r.capacity


def test_planner_baselines_are_the_lower_level_ones(linen, digits):
  model, variables = linen
  planner = sj.Planner(model, variables, digits, calib_examples=CALIB, seed=5)
  sizes, b = _sizes(variables), sj.BitBudget(3.7)
  cap = budget.budget_from_avg_bits(sizes, 3.7)
  uniform = planner.allocate(b, source="uniform")
  assert uniform.values == budget.uniform_allocation(sizes, b.candidates, cap).bits
  assert uniform.method == "uniform"
  for seed in (None, 1):
    drawn = planner.allocate(b, source="random", seed=seed)
    ref = budget.random_allocation(sizes, b.candidates, cap, 5 if seed is None else seed)
    assert drawn.values == ref.bits and drawn.method == "random" and drawn.resource <= cap


def test_planner_bops_budget_weighs_layers_by_their_macs(digits):
  model, variables = train_small(digits, "lenet", epochs=1)
  planner = sj.Planner(model, variables, digits, calib_examples=CALIB)
  macs = layers.macs_per_layer(model.apply, variables, digits.eval.images[:1])
  names = list(planner.macs)
  assert planner.macs == macs and len(set(macs[n] / _sizes(variables)[n] for n in names)) > 1
  p = planner.allocate(sj.BitBudget(3.0, unit="bops"), source="quant_error")
  table = planner.cost_tables(p.budget, ("quant_error",))["quant_error"]
  ref = budget.allocate_bits(table, macs, p.budget.candidates,
                             budget.budget_from_avg_bits(macs, 3.0))
  assert p.values == ref.bits and p.resource == sum(macs[n] * b for n, b in p.values.items())
  assert p.capacity == ref.budget_bits and p.resource <= p.capacity
  assert p.resource == budget.bops(p.values, macs, 8) // 8
  size = planner.allocate(sj.BitBudget(3.0), source="quant_error")
  assert size.values != p.values  # the units weigh layers differently here
  assert sj.Plan.from_json(p.to_json()) == p


def test_planner_honours_tie_groups_and_the_grid(linen, digits):
  model, variables = linen
  planner = sj.Planner(model, variables, digits, calib_examples=CALIB)
  ties = [["dense1/fc", "head/fc"]]
  b = sj.BitBudget(3.3, tie_groups=ties, full_range=False, group_size=16)
  assert b.tie_groups == (("dense1/fc", "head/fc"),)
  sizes = _sizes(variables)
  cap = budget.budget_from_avg_bits(sizes, 3.3)
  table = planner.cost_tables(b, ("fisher",))["fisher"]
  for source, seed in (("fisher", None), ("random", 0), ("random", 1)):
    p = planner.allocate(b, source=source, seed=seed)
    assert p.values["dense1/fc"] == p.values["head/fc"]
    ref = (budget.allocate_bits(table, sizes, b.candidates, cap, tie_groups=ties)
           if source == "fisher" else
           budget.random_allocation(sizes, b.candidates, cap, seed, tie_groups=ties))
    assert p.values == ref.bits
  searched = planner.allocate(b, source=("fisher", "uniform"), search=8)
  assert searched.values["dense1/fc"] == searched.values["head/fc"]
  # the grid: the table, the applied weights and the qwix rules follow the budget's
  ref_tables, _ = mixed_precision.cost_tables(model, variables, digits.train.take(CALIB),
                                              b.candidates, ("fisher",), max_batches=None,
                                              full_range=False, group_size=16)
  assert table == ref_tables["fisher"]
  applied = p.apply(variables)
  want = mixed_precision.quantize_model(variables, p.values, full_range=False, group_size=16)
  assert all(np.array_equal(layers.get_kernel(applied, n), layers.get_kernel(want, n))
             for n in sizes)
  assert p.to_qwix(variables) == deploy.to_qwix_rules(p.values, variables=variables,
                                                      group_size=16)
  assert sj.Plan.from_json(searched.to_json()) == searched


def test_planner_clear_errors(linen, digits):
  model, variables = linen
  planner = sj.Planner(model, variables, digits, calib_examples=CALIB)
  with pytest.raises(ValueError, match=r"tie_groups name \['nope'\].*allowed: \['dense1/fc'"):
    planner.allocate(sj.BitBudget(4.0, tie_groups=(("nope", "head/fc"),)))
  with pytest.raises(ValueError, match=r"tie_groups=.*each layer in one group"):
    sj.BitBudget(4.0, tie_groups=(("a", "b"), ("b", "c")))
  with pytest.raises(ValueError, match=r"tie_groups='ab'; allowed: groups of layer paths"):
    sj.BitBudget(4.0, tie_groups="ab")
  with pytest.raises(ValueError, match=r"group_size=0; allowed: None .* integer >= 1"):
    sj.BitBudget(4.0, group_size=0)
  with pytest.raises(ValueError, match=r"full_range='yes'; allowed: True or False"):
    sj.BitBudget(4.0, full_range="yes")
  with pytest.raises(ValueError, match=r"source=\('fisher', 'uniform'\) names several sources"
                                       r".*search > 0"):
    planner.allocate(sj.BitBudget(4.0), source=("fisher", "uniform"))
  with pytest.raises(ValueError, match=r"source=\(\); allowed: a source name"):
    planner.allocate(sj.BitBudget(4.0), source=(), search=4)
  with pytest.raises(ValueError, match=r"Unknown source 'nope' for bit widths"):
    planner.allocate(sj.BitBudget(4.0), source=("fisher", "nope"), search=4)
  with pytest.raises(ValueError, match=r"seed=-1; allowed: an integer >= 0"):
    planner.allocate(sj.BitBudget(4.0), source="random", seed=-1)
  with pytest.raises(ValueError, match=r"recalibrate_bn=True: the model has no BatchNorm"):
    planner.allocate(sj.BitBudget(4.0), search=4, recalibrate_bn=True)
  with pytest.raises(ValueError, match=r"cost_tables\(\) of a ProtectBudget"):
    planner.cost_tables(sj.ProtectBudget(0.3), ("fisher",))
  with pytest.raises(ValueError, match=r"search=4 starts from sources \['uniform', 'erk'\]"):
    planner.allocate(sj.RatioBudget(0.77), source=("uniform", "erk"), search=4)
  with pytest.raises(ValueError, match=r"search_batch=0; allowed: an integer >= 1"):
    sj.Planner(model, variables, digits, search_batch=0)
  with pytest.raises(ValueError, match=r"calib_examples=0; allowed: an integer >= 1"):
    sj.Planner(model, variables, digits, calib_examples=0)
