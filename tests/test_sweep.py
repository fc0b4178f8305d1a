"""Tests of the sweep engine against a plain loop, resume, determinism and bad inputs."""

import dataclasses
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from compile_log import compile_log
from conftest import train_small

from safer_jax.core import layers, perturb, staged
from safer_jax.measure import sweep
from safer_jax.zoo import models


@pytest.fixture(scope="module")
def tiny(digits):
  """A briefly trained LeNet and 64 eval images."""
  model, variables = train_small(digits, "lenet", epochs=4)
  return model, variables, digits.eval.take(64)


CONFIG = sweep.SweepConfig(
    families={"quantize": (8, 3, 2), "prune": (0.5, 0.9), "bitflip": (1e-2, 5e-2),
              "noise": (0.5, 2.0), "corrupt": (0.1, 0.5)},
    seeds=(0, 1), max_parallel=5)


def _plain_loop(model, variables, split, config):
  """Independent reference: perturb one kernel, full forward, NumPy accuracy, per cell."""
  grads = sweep.loss_gradients(model, variables, split)
  forward = jax.jit(model.apply)  # full forward, no stages, no vmap
  logits0 = np.asarray(forward(variables, split.images))
  base_acc = np.mean(logits0.argmax(1) == split.labels)
  rows = []
  for layer in layers.find_layers(variables):
    for family, grid in config.grids().items():
      fam = perturb.get_family(family)
      for i, m in enumerate(grid):
        for s in (config.seeds if fam.stochastic else (0,)):
          if fam.stochastic:  # the sweep's documented per-cell key
            kernel = fam.fn(layers.get_kernel(variables, layer), m,
                            sweep.cell_key(s, layer, family, i))
            params = layers.replace_kernel(variables["params"], layer, kernel)
          else:  # the pytree-level API
            params = perturb.perturb_params(variables["params"], [layer], family, m, None,
                                            grads=grads if fam.needs_grad else None)
          logits = np.asarray(forward({**variables, "params": params}, split.images))
          rows.append((layer, family, i, s, np.mean(logits.argmax(1) == split.labels)))
  columns = ["layer", "family", "magnitude_index", "seed", "accuracy"]
  return pd.DataFrame(rows, columns=columns), base_acc


def test_engine_equals_plain_loop(tiny):
  model, variables, split = tiny
  table = sweep.run_sweep(model, variables, split, CONFIG, progress=False)
  ref, base_acc = _plain_loop(model, variables, split, CONFIG)
  assert len(table) == len(ref)
  merged = table.merge(ref, on=["layer", "family", "magnitude_index", "seed"],
                       suffixes=("", "_ref"))
  assert len(merged) == len(ref)
  np.testing.assert_allclose(merged["accuracy"], merged["accuracy_ref"], atol=1e-6)
  np.testing.assert_allclose(table.attrs["baseline_accuracy"], base_acc)
  np.testing.assert_allclose(table["accuracy_drop"], base_acc - table["accuracy"], atol=1e-6)
  # deterministic families have one row per magnitude, stochastic ones one per seed.
  assert set(table[table.family == "quantize"].seed) == {0}
  assert set(table[table.family == "noise"].seed) == {0, 1}
  # the damage grows with magnitude somewhere: 2-bit and 90% pruning hurt some layer.
  assert table[(table.family == "quantize") & (table.magnitude == 2)].loss_increase.max() > 0.02


def test_engine_equals_naive_sweep_and_no_prefix(tiny):
  model, variables, split = tiny
  config = dataclasses.replace(CONFIG, families={"noise": (0.5, 2.0), "quantize": (2,)})
  a = sweep.run_sweep(model, variables, split, config, progress=False)
  b = sweep.naive_sweep(model, variables, split, config, progress=False)
  c = sweep.run_sweep(model, variables, split, dataclasses.replace(config, use_prefix=False,
                                                                   max_parallel=64),
                      progress=False)
  np.testing.assert_allclose(a["accuracy"], b["accuracy"], atol=1e-6)
  np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(a["loss"], c["loss"], rtol=1e-4, atol=1e-5)
  # a plain apply function (no stages) gives the same table by full forwards.
  d = sweep.run_sweep(lambda v, x: model.apply(v, x), variables, split, config, progress=False)
  np.testing.assert_allclose(a["loss"], d["loss"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("strategy,use_prefix", [("stage", True), ("stage", False),
                                                 ("layer", True)])
def test_strategies_equal_naive_sweep(tiny, strategy, use_prefix):
  """Each evaluation strategy gives the naive loop's table (accuracy exactly)."""
  model, variables, split = tiny
  config = dataclasses.replace(CONFIG, families={"quantize": (3,), "bitflip": (5e-2,),
                                                 "prune": (0.9,)}, seeds=(0,),
                               strategy=strategy, use_prefix=use_prefix)
  table = sweep.run_sweep(model, variables, split, config, progress=False)
  naive = sweep.naive_sweep(model, variables, split, config, progress=False)
  np.testing.assert_array_equal(table["accuracy"], naive["accuracy"])
  np.testing.assert_allclose(table["loss"], naive["loss"], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(table.attrs["baseline_accuracy"],
                             naive["accuracy"][0] + naive["accuracy_drop"][0], atol=1e-6)
  with pytest.raises(ValueError, match="strategy='fast'"):
    sweep.run_sweep(model, variables, split, dataclasses.replace(config, strategy="fast"))


def test_stage_program_with_switched_and_selected_kernels_equals_naive_sweep(tiny, monkeypatch):
  """Kernels up to SWITCHED_KERNEL_SIZE come from one switch, larger ones from a where each."""
  model, variables, split = tiny
  sizes = sorted(layers.get_kernel(variables, n).size for n in layers.find_layers(variables))
  monkeypatch.setattr(staged, "SWITCHED_KERNEL_SIZE", sizes[len(sizes) // 2])
  assert sizes[0] <= staged.SWITCHED_KERNEL_SIZE < sizes[-1]  # both kinds in the program
  config = dataclasses.replace(CONFIG, families={"quantize": (3,), "prune": (0.9,)}, seeds=(0,),
                               strategy="stage", use_prefix=False)
  table = sweep.run_sweep(model, variables, split, config, progress=False,
                          programs=sweep.ProgramCache(model))  # (compiled with the patch)
  naive = sweep.naive_sweep(model, variables, split, config, progress=False)
  np.testing.assert_array_equal(table["accuracy"], naive["accuracy"])
  np.testing.assert_allclose(table["loss"], naive["loss"], rtol=1e-4, atol=1e-5)


KERNEL_SHAPES = [(3, 3, 1, 6), (3, 3, 16, 16), (400, 120)]


@pytest.mark.parametrize("family,options,grid", [
    ("quantize", {}, (8, 4, 2, 1)),
    ("quantize", {"axis": None, "symmetric": False}, (5, 2)),
    ("prune", {}, (0.1, 0.5, 0.97)),
    ("prune", {"method": "structured"}, (0.5,)),
    ("bitflip", {}, (1e-2, 0.3)),
    ("bitflip", {"representation": "float32"}, (1e-2,)),
    ("noise", {}, (0.5,)),
])
def test_perturb_stack_equals_the_family_function_bit_for_bit(family, options, grid):
  """Padded layouts and batched draws change how programs compile, not one bit of a kernel."""
  rng = np.random.default_rng(0)
  kernels = [rng.normal(size=s).astype(np.float32) for s in KERNEL_SHAPES]
  named = {"params": {f"l{i}": {"kernel": k} for i, k in enumerate(kernels)}}
  assert sweep.perturbed.shared_draw_size(named, ["l0", "l1", "l2"]) == 49152
  kernels[1][0, 0, :4, :] = 0.0  # ties at zero (pruning ranks them by index)
  kernels[2][::3] = np.round(kernels[2][::3], 1)  # more ties
  layout = (512, 128)  # every kernel's rows x channels fits (the first two: with room to spare)
  fam = perturb.get_family(family)
  for li, kernel in enumerate(kernels):
    cells = [(m, i, li % 2) for i, m in enumerate(grid)]
    keys = sweep.cell_keys([c[2] for c in cells], f"l{li}", family, [c[1] for c in cells])
    # Shared draw size 4^9: the (400, 120) kernel's own bucket 4^8 is within 4x (it draws
    # 4^9 values), the others' 4^6 is not (their own draw). 49,152: what shared_draw_size
    # gives these kernels (48,000 weights rounded up to a multiple of 4096), not a bucket.
    for lay, draw in ((layout, None), (None, None), (layout, 1 << 18), (layout, 49152)):
      got = sweep.perturb_stack(family, options, lay, draw)(
          jnp.asarray(kernel), [float(c[0]) for c in cells], keys, None)
      for (m, i, s), row in zip(cells, got):
        want = np.asarray(fam.fn(jnp.asarray(kernel), float(m),
                                 sweep.cell_key(s, f"l{li}", family, i), **options))
        np.testing.assert_array_equal(row, want, err_msg=f"{family} {options} {m} "
                                                         f"{kernel.shape} layout={lay} {draw}")


def compiled(counts, name):
  """Compilations of jitted functions whose name contains ``name``."""
  return sum(n for fun, n in counts.items() if name in fun)


def test_perturbation_programs_compile_once_per_family_across_shapes():
  """Quantize and bit-flip stacks: one program for every kernel shape; draws: one per bucket."""
  rng = np.random.default_rng(1)
  # 4 kernel shapes; a padded layout (512, 32) no other test compiles, so the counts are ours.
  shapes = [(3, 3, 3, 10), (3, 3, 10, 14), (5, 5, 14, 30), (70, 30)]
  variables = {"params": {f"l{i}": {"kernel": rng.normal(size=s).astype(np.float32)}
                          for i, s in enumerate(shapes)}}
  names = [f"l{i}" for i in range(len(shapes))]
  layout = sweep.padded_layout(variables, names)
  assert layout == (512, 32)
  buckets = {perturb.flat_bucket(int(np.prod(s))) for s in shapes}
  # 7 cells of bit flips and of noise: draw programs of a shape (7, bucket) no other test
  # compiles, so these draws do compile here (an earlier test in this process cannot have).
  families = {"quantize": (8, 4, 2), "bitflip": tuple(np.geomspace(1e-3, 5e-2, 7)),
              "noise": tuple(np.linspace(0.1, 1.0, 7)), "prune": (0.5, 0.9)}
  with compile_log() as counts:
    for name in names:
      kernel = jnp.asarray(layers.get_kernel(variables, name))
      for family, grid in families.items():
        keys = sweep.cell_keys([0] * len(grid), name, family, range(len(grid)))
        sweep.perturb_stack(family, {}, layout)(kernel, list(grid), keys, None)
  assert compiled(counts, "quantize_many") == 1
  assert compiled(counts, "bitflip_many") == 1
  # Draws: a program per flat size bucket; magnitude pruning at most that (another test may
  # have compiled a bucket of its (2, bucket) shape already).
  assert compiled(counts, "bitflip_masks") == compiled(counts, "normal_draws") == len(buckets)
  for helper in ("bitflip_masks", "normal_draws", "prune_magnitude_padded"):
    assert compiled(counts, helper) <= len(buckets) < len(shapes), helper


def test_stage_program_traces_once_for_every_layer_of_its_stage(tiny):
  """One traced program serves every layer of a stage: the layer is an argument, not a constant."""
  model, variables, split = tiny
  names = layers.find_layers(variables)
  images, batch, mask = next(sweep.eval_batches(split, 32))
  size = max(layers.get_kernel(variables, n).size for n in names)
  program = jax.jit(chex.assert_max_traces(sweep.stage_program(model, 0, names), n=1))
  for which, name in enumerate(names):
    kernel = np.asarray(layers.get_kernel(variables, name)).reshape(-1)
    flats = np.zeros((2, size), np.float32)
    flats[:, :kernel.size] = kernel
    flats[1, :kernel.size] *= 0.5
    sums = program(variables, flats, np.int32(which), images, batch, mask)
    correct = sums[:, 2]  # (Σ weight, Σ loss, Σ right answers)
    assert correct[0] >= correct[1] - 2  # the unperturbed copy is (about) as good
  chex.clear_trace_counter()


def test_stage_strategy_compiles_one_program_per_stage(digits):
  """'stage': one evaluation program per stage, not per layer; warm: nothing compiles."""
  split = digits.eval.take(32)
  model = models.get_model("resnet8")  # random weights
  variables = model.init(jax.random.key(3), split.images[:1])
  # 4 layers in 2 stages (the last ones: short suffixes compile fast).
  config = sweep.SweepConfig(families={"quantize": (4,)}, max_parallel=4, strategy="stage",
                             layers=("stage3_block1/.*", "head/fc"))
  assert sweep.engine_strategy(sweep.SweepConfig(), sharded=False) == "stage"  # CPU default
  programs = sweep.ProgramCache(model)
  with compile_log() as cold:
    table = sweep.run_sweep(model, variables, split, config, progress=False,
                            programs=programs)
  stages = {sweep.stage_of(model, n) for n in table["layer"]}
  assert table["layer"].nunique() == 4 and len(stages) == 2
  assert compiled(cold, "stage_copies") == len(stages)
  assert compiled(cold, "layer_copies") == 0
  assert len([k for k in programs.keys() if k[0] == "stage"]) == len(stages)
  # One chunk of copies per stage program (key[3]): the unperturbed baseline rides as a second
  # copy with the first layer's one cell, padding only its own stage's layers; head/fc's takes 1.
  assert {k[1]: k[3] for k in programs.keys() if k[0] == "stage"} == {min(stages): 2,
                                                                      max(stages): 1}
  with compile_log() as warm:
    again = sweep.run_sweep(model, variables, split, config, progress=False,
                            programs=programs)
  assert not warm, warm
  pd.testing.assert_frame_equal(again, table)
  # 'auto' (the default): this small sweep (4 cells) runs every copy from the input, in one
  # program for the whole network.
  programs = sweep.ProgramCache(model)
  with compile_log() as small:
    sweep.run_sweep(model, variables, split, dataclasses.replace(config, strategy="auto"),
                    progress=False, programs=programs)
  assert compiled(small, "stage_copies") == 1
  (key,) = [k for k in programs.keys() if k[0] == "stage"]
  assert key[1] == 0 and set(key[2]) == set(table["layer"])


def test_stage_groups_share_a_program_when_the_earlier_stage_is_almost_free():
  class Staged:  # stage_of needs only the names of the top-level blocks
    stage_names = ("a", "b", "c", "d")

  # Suffix costs (multiply-adds per example from each stage on): a 153, b 151, c 51, d 1.
  macs = {"a/conv": 2, "b/conv": 60, "b/proj": 40, "c/conv": 50, "d/fc": 1}
  assert sweep.stage_groups(Staged(), macs, [0, 1, 2, 3]) == {0: 0, 1: 0, 2: 2, 3: 3}
  assert sweep.stage_groups(Staged(), macs, [1, 2, 3]) == {1: 1, 2: 2, 3: 3}
  assert sweep.stage_groups(Staged(), macs, [0, 1], slack=0.0) == {0: 0, 1: 1}
  # Suffixes a 53.5, b 51.5, c 51, d 1: b and c within 5% of a's (53.5 <= 1.05 x 51), d not.
  chain = {"a/conv": 2, "b/conv": 0.5, "c/conv": 50, "d/fc": 1}
  assert sweep.stage_groups(Staged(), chain, [0, 1, 2, 3]) == {0: 0, 1: 0, 2: 0, 3: 3}
  assert sweep.stage_groups(object(), macs, [0]) == {0: 0}  # no stages: its own
  assert sweep.stage_groups(Staged(), {}, [0, 1]) == {0: 0, 1: 1}  # no counts: its own


def test_first_block_of_resnet8_runs_in_its_stems_program(digits):
  """resnet8's stem is 2% of a forward: its layer and the first block's share one program."""
  split = digits.eval.take(32)
  model = models.get_model("resnet8")  # random weights
  variables = model.init(jax.random.key(3), split.images[:1])
  config = sweep.SweepConfig(families={"quantize": (4, 2)}, max_parallel=4, strategy="stage",
                             layers=("stem/conv", "stage1_block1/conv2"))
  _, macs = sweep.execution_trace(model, variables, split.images)
  assert macs["stem/conv"] == 8 * 8 * 16 * 9  # output pixels x channels x 3x3x1 inputs
  programs = sweep.ProgramCache(model)
  with compile_log() as cold:
    table = sweep.run_sweep(model, variables, split, config, progress=False,
                            programs=programs)
  assert compiled(cold, "stage_copies") == 1
  (key,) = [k for k in programs.keys() if k[0] == "stage"]
  assert key[1] == 0 and key[2] == ("stem/conv", "stage1_block1/conv2")
  naive = sweep.naive_sweep(model, variables, split, config, progress=False)
  np.testing.assert_array_equal(table["accuracy"], naive["accuracy"])
  np.testing.assert_allclose(table["loss"], naive["loss"], rtol=1e-5)


def test_programs_of_another_model_are_refused(tiny):
  model, variables, split = tiny
  with pytest.raises(ValueError, match="ProgramCache of another model"):
    sweep.run_sweep(model, variables, split, CONFIG, progress=False,
                    programs=sweep.ProgramCache(models.get_model("mlp")))


def test_cached_programs_follow_the_batch_shape(tiny):
  """A model's program cache reused with another eval batch size compiles for the new shapes."""
  model, variables, split = tiny
  programs = sweep.ProgramCache(model)
  config = dataclasses.replace(CONFIG, families={"quantize": (3,)}, seeds=(0,),
                               strategy="stage")
  for batch in (64, 24):  # 24: two full batches and a padded one
    config = dataclasses.replace(config, eval_batch_size=batch)
    table = sweep.run_sweep(model, variables, split, config, progress=False,
                            programs=programs)
    naive = sweep.naive_sweep(model, variables, split, config, progress=False)
    np.testing.assert_array_equal(table["accuracy"], naive["accuracy"])


def test_cell_keys_equal_cell_key_one_by_one():
  seeds, indices = [0, 1, 2, 12345], [0, 3, 4, 2]
  batch = jax.random.key_data(sweep.cell_keys(seeds, "stage1/conv", "noise", indices))
  for row, (seed, index) in zip(batch, zip(seeds, indices)):
    np.testing.assert_array_equal(
        row, jax.random.key_data(sweep.cell_key(seed, "stage1/conv", "noise", index)))
  other = jax.random.key_data(sweep.cell_keys(seeds, "stage1/conv", "bitflip", indices))
  assert not np.array_equal(batch, other)


def test_copies_per_step_does_not_change_the_table(tiny):
  """Sequential steps of 1 or 3 copies (odd chunks, padding) equal one wide vmap."""
  model, variables, split = tiny
  config = dataclasses.replace(CONFIG, families={"noise": (0.5, 2.0), "quantize": (3, 2)},
                               max_parallel=7)
  config = dataclasses.replace(config, strategy="layer")  # (the 'stage' strategy maps copies)
  wide = sweep.run_sweep(model, variables, split,
                         dataclasses.replace(config, copies_per_step=64), progress=False)
  for step in (1, 3):
    table = sweep.run_sweep(model, variables, split,
                            dataclasses.replace(config, copies_per_step=step), progress=False)
    np.testing.assert_allclose(table["accuracy"], wide["accuracy"], atol=1e-6)
    np.testing.assert_allclose(table["loss"], wide["loss"], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="copies_per_step=0"):
    sweep.run_sweep(model, variables, split, dataclasses.replace(config, copies_per_step=0))


def test_concurrent_layers_do_not_change_the_table(tiny, tmp_path):
  """Layers on 1, 2 or 4 threads: the same table, and the results file too."""
  model, variables, split = tiny
  config = dataclasses.replace(CONFIG, families={"noise": (0.5,), "prune": (0.9,)})
  one = sweep.run_sweep(model, variables, split, dataclasses.replace(config, workers=1),
                        progress=False)
  for workers in (2, 4):
    path = tmp_path / f"table{workers}.csv"
    table = sweep.run_sweep(model, variables, split,
                            dataclasses.replace(config, workers=workers),
                            results_path=str(path), progress=False)
    pd.testing.assert_frame_equal(table, one)
    pd.testing.assert_frame_equal(pd.read_csv(path), one.reset_index(drop=True),
                                  check_dtype=False)
  with pytest.raises(ValueError, match="workers=0"):
    sweep.run_sweep(model, variables, split, dataclasses.replace(config, workers=0))


def test_same_seeds_identical_table(tiny):
  model, variables, split = tiny
  config = dataclasses.replace(CONFIG, families={"bitflip": (1e-2,), "noise": (1.0,)})
  a = sweep.run_sweep(model, variables, split, config, progress=False)
  b = sweep.run_sweep(model, variables, split, config, progress=False)
  pd.testing.assert_frame_equal(a, b)
  c = sweep.run_sweep(model, variables, split, dataclasses.replace(config, seeds=(5, 6)),
                      progress=False)
  assert not np.array_equal(a["loss"].to_numpy(), c["loss"].to_numpy())


def test_resume_after_interruption(tiny, tmp_path, monkeypatch):
  model, variables, split = tiny
  config = dataclasses.replace(CONFIG, families={"quantize": (4, 2), "noise": (1.0,)})
  path = str(tmp_path / "table.csv")
  full = sweep.run_sweep(model, variables, split, config, progress=False)

  calls = {"n": 0}
  original = sweep.Engine.evaluate_kernels

  def flaky(self, layer, kernels):
    calls["n"] += 1
    if calls["n"] == 4:  # baseline + 2 layers done, then "killed"
      raise KeyboardInterrupt
    return original(self, layer, kernels)

  monkeypatch.setattr(sweep.Engine, "evaluate_kernels", flaky)
  with pytest.raises(KeyboardInterrupt):
    sweep.run_sweep(model, variables, split, config, progress=False, results_path=path)
  partial = pd.read_csv(path)  # a complete, readable file: whole layers only
  assert 0 < len(partial) < len(full)
  assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]
  monkeypatch.setattr(sweep.Engine, "evaluate_kernels", original)

  counted = {"n": 0}

  def counting(self, layer, kernels):
    counted["n"] += kernels.shape[0]
    return original(self, layer, kernels)

  monkeypatch.setattr(sweep.Engine, "evaluate_kernels", counting)
  resumed = sweep.run_sweep(model, variables, split, config, progress=False, results_path=path)
  assert counted["n"] < len(full) + 1  # finished cells were not redone
  pd.testing.assert_frame_equal(resumed, full, check_dtype=False)
  # a different setup refuses to resume into the same file.
  with pytest.raises(ValueError, match="different sweep setup"):
    sweep.run_sweep(model, variables, split, dataclasses.replace(config, seeds=(9,)),
                    progress=False, results_path=path)


def test_importance_is_area_under_drop_curve():
  table = pd.DataFrame({
      "layer": ["a"] * 3 + ["b"] * 3, "family": "quantize", "magnitude": [8, 4, 2] * 2,
      "magnitude_index": [0, 1, 2] * 2, "seed": 0,
      "accuracy_drop": [0.0, 0.2, 0.4, 0.0, 0.0, 0.1]})
  imp = sweep.importance(table)
  np.testing.assert_allclose(imp.loc["a", "quantize"], 0.2)  # trapezoid on [0, .5, 1]
  np.testing.assert_allclose(imp.loc["b", "quantize"], 0.025)


@pytest.mark.parametrize("families,match", [
    ({"quantize": (0,)}, "bits=0"), ({"prune": (1.5,)}, "ratio=1.5"),
    ({"bitflip": (-0.1,)}, "rate=-0.1"), ({"blur": (1,)}, "Unknown perturbation family 'blur'"),
])
def test_bad_grids(tiny, families, match):
  model, variables, split = tiny
  with pytest.raises(ValueError, match=match):
    sweep.run_sweep(model, variables, split, sweep.SweepConfig(families=families),
                    progress=False)


def test_bad_layers_and_nan_weights(tiny):
  model, variables, split = tiny
  with pytest.raises(ValueError, match="matches no layer"):
    sweep.run_sweep(model, variables, split, sweep.SweepConfig(layers=["nope/.*"]),
                    progress=False)
  kernel = layers.get_kernel(variables, "conv2/conv")
  bad = layers.replace_kernel(variables, "conv2/conv", kernel.at[0, 0, 0, 0].set(jnp.nan))
  with pytest.raises(ValueError, match=r"conv2.*NaN"):
    sweep.run_sweep(model, bad, split, progress=False)
