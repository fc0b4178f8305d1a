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
  with pytest.raises(ValueError, match=r"unit='bytes'; allowed: \['bits'\]"):
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
