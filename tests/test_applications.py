"""Tests of the application experiments: prune_sweep and bitflip_protect."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from experiments import bitflip_protect, prune_sweep
from safer_jax import budget, data, layers

SHAPES = {"conv1": (3, 3, 1, 8), "conv2": (3, 3, 8, 16), "fc1": (64, 32), "head": (32, 10)}


def _variables(seed=0, shapes=None):
  rng = np.random.default_rng(seed)
  params = {name: {"kernel": jnp.asarray(rng.normal(size=shape), jnp.float32),
                   "bias": jnp.asarray(rng.normal(size=shape[-1]), jnp.float32)}
            for name, shape in (shapes or SHAPES).items()}
  return {"params": params}


def _bits(x):
  return np.asarray(x, np.float32).view(np.uint32)


# ---------------------------------------------------------------------------
# bitflip_protect
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("representation", ["int8", "float32"])
def test_protected_layers_are_bit_identical(representation):
  # one kernel shape: bitflip compiles once per shape (seconds each)
  variables = _variables(shapes={"a": (12, 16), "b": (12, 16), "c": (12, 16), "d": (12, 16)})
  names = layers.find_layers(variables)
  protect = jnp.asarray([n in ("b", "d") for n in names])
  refs = bitflip_protect.reference_kernels(variables, names, representation)
  inject = jax.jit(lambda v, p, rate, key: bitflip_protect.inject(
      v, names, p, rate, key, representation=representation, references=refs))
  out = inject(variables, protect, 0.05, jax.random.key(3))
  for i, name in enumerate(names):
    new = np.asarray(layers.get_kernel(out, name))
    if protect[i]:
      np.testing.assert_array_equal(_bits(new), _bits(refs[i]))
      if representation == "float32":  # the stored weights themselves
        np.testing.assert_array_equal(_bits(new), _bits(layers.get_kernel(variables, name)))
    else:
      changed = np.mean(_bits(new) != _bits(refs[i]))
      assert changed > 0.05, (name, changed)
    # biases are never touched
    np.testing.assert_array_equal(_bits(out["params"][name]["bias"]),
                                  _bits(variables["params"][name]["bias"]))
  # rate 0: everything equals the fault-free representation
  clean = inject(variables, jnp.zeros(len(names), bool), 0.0, jax.random.key(0))
  for i, name in enumerate(names):
    np.testing.assert_array_equal(_bits(layers.get_kernel(clean, name)), _bits(refs[i]))


def test_selection_respects_budget_and_is_greedy():
  rng = np.random.default_rng(0)
  for trial in range(200):
    n = int(rng.integers(1, 12))
    sizes = {f"l{i}": int(rng.integers(1, 1000)) for i in range(n)}
    scores = {k: float(rng.normal()) for k in sizes}
    frac = float(rng.choice([0.0, 0.1, 0.25, 0.5, 1.0]))
    chosen = bitflip_protect.select_protected(scores, sizes, frac)
    cap = frac * sum(sizes.values())
    used = sum(sizes[k] for k in chosen)
    assert used <= cap, trial
    # greedy: nothing left out would still fit, and the best-scoring layer that fits alone is in.
    assert all(used + sizes[k] > cap for k in sizes if k not in chosen), trial
    fits = [k for k in sizes if sizes[k] <= cap]
    if fits:
      assert max(fits, key=lambda k: scores[k]) in chosen, trial
  assert bitflip_protect.select_protected({"a": 1.0, "b": 2.0}, {"a": 10, "b": 10}, 1.0) == [
      "a", "b"]
  with pytest.raises(ValueError, match="budget fraction"):
    bitflip_protect.select_protected({"a": 1.0}, {"a": 1}, 1.5)


def test_vmapped_evaluator_matches_single_injection():
  variables = {"params": {"fc": {"kernel": jnp.asarray(
      np.random.default_rng(1).normal(size=(16, 4)), jnp.float32)}}}
  rng = np.random.default_rng(2)
  split = data.Split(rng.normal(size=(32, 4, 4, 1)).astype(np.float32),
                     rng.integers(0, 4, size=32).astype(np.int32))

  def apply(v, x):
    return x.reshape(x.shape[0], -1) @ v["params"]["fc"]["kernel"]

  evaluate = bitflip_protect.make_evaluator(apply, variables, ["fc"], split, "int8", chunk=2)
  keys = jax.random.split(jax.random.key(0), 3)
  acc, loss = evaluate(keys, 0.05, np.array([False]))
  assert acc.shape == loss.shape == (3,)
  for i in range(3):
    v = bitflip_protect.inject(variables, ["fc"], jnp.array([False]), 0.05, keys[i])
    logits = apply(v, jnp.asarray(split.images))
    np.testing.assert_allclose(acc[i], np.mean(np.argmax(logits, -1) == split.labels), atol=1e-6)


# ---------------------------------------------------------------------------
# prune_sweep
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("target", [0.3, 0.5, 0.77, 0.9])
def test_pruning_reaches_the_target_sparsity(target):
  variables = _variables()
  names = layers.find_layers(variables)
  kernels = {n: np.asarray(layers.get_kernel(variables, n)) for n in names}
  sizes = {n: w.size for n, w in kernels.items()}
  total = sum(sizes.values())
  want = budget.prune_count(target, total)
  candidates = prune_sweep.get_config().candidates
  tables = {"magnitude": prune_sweep.removed_cost_table(
      kernels, {n: w.astype(np.float64) ** 2 for n, w in kernels.items()}, candidates)}
  for source in ("uniform", "erk", "global_magnitude", "magnitude"):
    ratios = prune_sweep.ratios_for(source, target, kernels, tables, candidates)
    pruned = prune_sweep.prune_model(variables, ratios)
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
  table = prune_sweep.removed_cost_table({"a": w}, {"a": w.astype(np.float64) ** 2},
                                         (0.0, 0.25, 0.5, 1.0))
  assert table["a"] == {0.0: 0.0, 0.25: 0.25, 0.5: 1.25, 1.0: 14.25}


# ---------------------------------------------------------------------------
# End to end, through launch.py
# ---------------------------------------------------------------------------


def test_prune_sweep_tiny_writes_files(tmp_path, launch):
  out = launch(["--experiment=prune_sweep", "--tiny", f"--workdir={tmp_path}",
                 "--config.progress=False", "--config.finetune_steps=5"])
  assert out.returncode == 0, out.stderr[-3000:]
  work = tmp_path / "prune_sweep" / "mlp"
  for name in ("results.csv", "costs.json", "summary.md", "accuracy_vs_sparsity.png"):
    assert (work / name).stat().st_size > 0, name
  results = pd.read_csv(work / "results.csv")
  assert set(results.source) == {"uniform", "erk", "global_magnitude", "oracle", "magnitude",
                                 "fisher", "searched"}  # (no BatchNorm: no searched_bn)
  searched = results[results.source == "searched"]
  assert (searched.achieved_sparsity >= searched.target).all()
  assert json.load(open(work / "search.json"))["targets"][0]["evaluations"] <= 24
  assert set(results.target) == {0.5, 0.9}
  assert (results.achieved_sparsity >= results.target - 0.01).all()
  assert results.accuracy.between(0, 1).all()
  assert all(len(json.loads(r)) == 3 for r in results.ratios)
  assert "| oracle |" in (work / "summary.md").read_text()
  assert results.accuracy_ft.between(0, 1).all()  # the optional fine-tune with fixed masks
  assert "masks fixed" in (work / "summary.md").read_text()


def test_bitflip_protect_tiny_writes_files(tmp_path, launch):
  out = launch(["--experiment=bitflip_protect", "--tiny", f"--workdir={tmp_path}",
                 "--config.progress=False"])
  assert out.returncode == 0, out.stderr[-3000:]
  work = tmp_path / "bitflip_protect" / "mlp"
  for name in ("results.csv", "scores.json", "summary.md", "accuracy_vs_rate.png"):
    assert (work / name).stat().st_size > 0, name
  results = pd.read_csv(work / "results.csv")
  assert set(results.rule) == {"fisher_per_param", "grad_norm", "random", "none"}
  assert (results.protected_fraction <= results.budget_fraction).all()
  assert (results.num_seeds == 4).all()
  none = results[results.rule == "none"]
  assert (none.protected == "[]").all()
