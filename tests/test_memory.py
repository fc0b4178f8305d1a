"""Tests of the sweep memory estimate (XLA memory analysis) and automatic chunking."""

import jax
import pandas as pd
import pytest

from safer_jax.measure import memory, sweep
from safer_jax.zoo import models

SHAPE = (16, 16, 3)  # resnet8 input; its widest activation is the stem's 16 x 16 x 16


@pytest.fixture(scope="module")
def resnet8():
  model = models.get_model("resnet8", num_classes=10)
  variables = memory.abstract_variables(model, SHAPE)  # shapes only, nothing allocated
  return model, variables, memory.layer_order(model, variables, SHAPE)


@pytest.fixture(scope="module")
def lenet(digits):
  model = models.get_model("lenet")
  variables = model.init(jax.random.key(0), digits.eval.images[:1])
  return model, variables, digits.eval.take(64)


CONFIG = sweep.SweepConfig(families={"quantize": (8, 4, 2), "noise": (0.5,)}, seeds=(0, 1),
                           max_parallel=5, eval_batch_size=32,
                           copies_per_step=64)  # 5 copies per layer, all in one vmap


def test_estimate_grows_with_copies_and_batch(resnet8):
  model, variables, order = resnet8
  est = {(p, b): memory.estimate_sweep_memory(model, variables, SHAPE, order[0], p, b)
         for p, b in [(1, 8), (4, 8), (4, 32)]}
  assert est[(1, 8)] < est[(4, 8)] < est[(4, 32)]
  assert memory.abstract_variables(model, SHAPE)["params"]["stem"]["conv"]["kernel"].shape \
      == (3, 3, 3, 16)


def test_estimate_within_sane_factor_of_analytic_activation_bytes(resnet8):
  model, variables, order = resnet8
  p, b = 4, 32
  e = memory.memory_breakdown(model, variables, SHAPE, "stem/conv", p, b)
  # Under vmap the stem output (16 x 16 x 16 float32 per example) exists once per copy.
  largest = p * b * 16 * 16 * 16 * 4
  assert largest <= e.temps <= 20 * largest
  # Arguments hold at least the P kernels and one batch of images.
  assert e.arguments >= p * 3 * 3 * 3 * 16 * 4 + b * 16 * 16 * 3 * 4
  assert e.total == e.program == e.arguments + e.outputs + e.temps - e.aliases  # nothing resident
  # The first layer (longest vmapped suffix) needs the most: the planner's default probe.
  later = [memory.memory_breakdown(model, variables, SHAPE, l, p, b).program
           for l in ("stage2_block1/conv1", "head/fc")]
  assert e.program > max(later)
  assert memory.probe_layers(model, variables, SHAPE, order)[0] == "stem/conv"


def test_resident_prefix_and_kernels_are_counted(resnet8):
  model, variables, _ = resnet8
  prefix, kernels = memory.resident_bytes(model, variables, SHAPE, "stage2_block1/conv1", 32,
                                          num_examples=100, num_copies=7)
  assert prefix == 4 * 32 * (16 * 16 * 16 * 4)  # 4 padded batches of the 16x16x16 input
  assert kernels == 2 * 7 * (3 * 3 * 16 * 32 * 4)
  assert memory.resident_bytes(model, variables, SHAPE, "stem/conv", 32,
                               num_examples=100)[0] == 0  # stage 0 reads host images


def test_largest_fitting_search():
  calls = []

  def cost(x):
    calls.append(x)
    return 10 * x + 3

  assert memory.largest_fitting(1, 64, cost, 300) == 29
  assert len(calls) <= 6
  assert memory.largest_fitting(1, 64, cost, 5) is None
  assert memory.largest_fitting(1, 64, cost, 10**6) == 64


def _copies(layers):
  return {l: 5 for l in layers}


def test_auto_chunking_fits_and_equals_fixed_chunking(lenet):
  model, variables, split = lenet
  layers = sweep.ordered_layers(model, variables, split, None)
  shape = split.images.shape[1:]
  kw = dict(max_parallel=5, eval_batch_size=32, num_examples=len(split), copies=_copies(layers),
            copies_per_step=64)
  low = memory.plan_chunking(model, variables, shape, layers, 10**12, **{**kw, "max_parallel": 1})
  high = memory.plan_chunking(model, variables, shape, layers, 10**12, **kw)
  assert (low.max_parallel, high.max_parallel, high.eval_batch_size) == (1, 5, 32)
  budget = (low.needed_bytes + high.needed_bytes) // 2
  plan = memory.plan_chunking(model, variables, shape, layers, budget, **kw)
  assert 1 <= plan.max_parallel < 5 and plan.eval_batch_size == 32
  assert plan.needed_bytes <= budget
  assert plan.needed_bytes == plan.worst.needed(plan.margin)
  assert memory.plan_chunking(model, variables, shape, layers, budget,
                              **{**kw, "max_parallel": plan.max_parallel + 1}).max_parallel \
      == plan.max_parallel  # one more copy does not fit

  auto_cfg = sweep.SweepConfig(**{**CONFIG.__dict__, "memory_budget_bytes": budget})
  picked = sweep.auto_chunking(model, variables, split, auto_cfg, layers)
  assert (picked.max_parallel, picked.eval_batch_size) == (plan.max_parallel, 32)
  auto = sweep.run_sweep(model, variables, split, auto_cfg, progress=False)
  fixed = sweep.run_sweep(model, variables, split,
                          sweep.SweepConfig(**{**CONFIG.__dict__, "strategy": "layer",
                                               "max_parallel": plan.max_parallel}),
                          progress=False)
  pd.testing.assert_frame_equal(auto, fixed, check_exact=True)  # same sizes: same numbers
  # Another chunk size (5 copies per call): same accuracies; losses to float rounding, since
  # the vmap width changes how XLA groups the convolutions.
  default = sweep.run_sweep(model, variables, split, CONFIG, progress=False)
  pd.testing.assert_frame_equal(auto.drop(columns=["loss", "loss_increase"]),
                                default.drop(columns=["loss", "loss_increase"]), check_exact=True)
  assert abs(auto["loss"] - default["loss"]).max() < 1e-5


def test_auto_chunking_shrinks_the_batch_when_one_copy_does_not_fit(lenet):
  model, variables, split = lenet
  layers = sweep.ordered_layers(model, variables, split, None)
  shape = split.images.shape[1:]
  kw = dict(max_parallel=1, num_examples=len(split), copies=_copies(layers), copies_per_step=64)
  small = memory.plan_chunking(model, variables, shape, layers, 10**12, eval_batch_size=8, **kw)
  plan = memory.plan_chunking(model, variables, shape, layers, small.needed_bytes,
                              eval_batch_size=64, **kw)
  assert plan.max_parallel == 1 and 8 <= plan.eval_batch_size < 64


def test_too_small_budget_names_budget_and_minimum(lenet, resnet8):
  model, variables, split = lenet
  cfg = sweep.SweepConfig(**{**CONFIG.__dict__, "memory_budget_bytes": 1000})
  with pytest.raises(ValueError, match=r"memory budget 1000 bytes .* is too small: even "
                                       r"max_parallel=1 and eval_batch_size=1 need \d+ bytes"):
    sweep.run_sweep(model, variables, split, cfg, progress=False)
  model, variables, order = resnet8
  with pytest.raises(ValueError, match="margin=0.5 must be >= 1"):
    memory.plan_chunking(model, variables, SHAPE, order, 10**9, max_parallel=4,
                         eval_batch_size=8, margin=0.5)
  with pytest.raises(ValueError, match="memory budget -1 bytes must be a positive"):
    memory.plan_chunking(model, variables, SHAPE, order, -1, max_parallel=4, eval_batch_size=8)
  with pytest.raises(ValueError, match="max_parallel=0 must be >= 1"):
    memory.estimate_sweep_memory(model, variables, SHAPE, order[0], 0, 8)


def test_memory_check_experiment_tiny(tmp_path):
  from experiments import memory_check  # pylint: disable=import-outside-toplevel
  config = memory_check.get_config(tiny=True)
  config.check_layers = False
  result = memory_check.run(config, str(tmp_path))
  assert (tmp_path / "memory.json").exists()
  assert "max_parallel" in (tmp_path / "memory.md").read_text()
  fits = {(g["max_parallel"], g["eval_batch_size"]): g["fits"] for g in result["grid"]}
  assert fits[(1, 8)] and not fits[(4, 32)]
  assert result["auto"]["needed_gb"] <= config.budget_gb
