"""Tests of the rank-agreement metrics and the criteria_benchmark experiment end to end."""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
import scipy.stats

from safer_jax import criteria
from safer_jax.measure import agreement


def _layers(values):
  return {f"layer{i}": float(v) for i, v in enumerate(values)}


def test_perfect_agreement():
  truth = _layers([0.1, 0.5, 0.3, 0.9, 0.2, 0.7, 0.4, 0.8])
  out = agreement.rank_agreement({k: 10 * v + 1 for k, v in truth.items()}, truth)
  assert out["spearman"] == pytest.approx(1.0) and out["kendall"] == pytest.approx(1.0)
  assert out["topk"] == 1.0 and out["k"] == 2 and out["num_layers"] == 8
  assert out["spearman_lo"] == pytest.approx(1.0) and out["spearman_hi"] == pytest.approx(1.0)


def test_reversed_agreement():
  truth = _layers(range(8))
  out = agreement.rank_agreement({k: -v for k, v in truth.items()}, truth)
  assert out["spearman"] == pytest.approx(-1.0) and out["kendall"] == pytest.approx(-1.0)
  assert out["topk"] == 0.0


def test_small_example_by_hand_and_scipy():
  # ranks of x: 1 2 3 4 5 ; ranks of y: 2 1 4 3 5 -> sum d^2 = 4, rho = 1 - 6*4/(5*24) = 0.8.
  # pairs: 10, 8 concordant, 2 discordant -> tau = 0.6.
  x, y = [1.0, 2.0, 3.0, 4.0, 5.0], [20.0, 10.0, 40.0, 30.0, 50.0]
  out = agreement.rank_agreement(_layers(x), _layers(y), k_frac=0.4)
  assert out["spearman"] == pytest.approx(0.8) and out["kendall"] == pytest.approx(0.6)
  # k = round(0.4 * 5) = 2: top-2 of x = {3, 4}, of y = {4, 2} -> overlap 1/2.
  assert out["k"] == 2 and out["topk"] == pytest.approx(0.5)
  assert out["spearman_p"] == pytest.approx(scipy.stats.spearmanr(x, y).pvalue)


def test_ties_match_scipy():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 3, 12).astype(float)
  y = x + rng.integers(0, 3, 12)
  out = agreement.rank_agreement(_layers(x), _layers(y))
  assert out["spearman"] == pytest.approx(scipy.stats.spearmanr(x, y).statistic)
  assert out["kendall"] == pytest.approx(scipy.stats.kendalltau(x, y).statistic)


def test_bootstrap_equals_scipy_per_resample():
  rng = np.random.default_rng(1)
  x = rng.integers(0, 4, 9).astype(float)
  y = x + rng.normal(size=9)
  rho, tau = agreement.bootstrap_correlations(x, y, n_boot=40, seed=3)
  idx = np.random.default_rng(3).integers(0, 9, size=(40, 9))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    ref_rho = [scipy.stats.spearmanr(x[i], y[i]).statistic for i in idx]
    ref_tau = [scipy.stats.kendalltau(x[i], y[i]).statistic for i in idx]
  np.testing.assert_allclose(rho, ref_rho, atol=1e-12)
  np.testing.assert_allclose(tau, ref_tau, atol=1e-12)


def test_constant_scores_give_nan_without_crash():
  truth = _layers([0.1, 0.5, 0.3, 0.9])
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no scipy ConstantInputWarning either
    out = agreement.rank_agreement({k: 1.0 for k in truth}, truth)
  for key in ("spearman", "kendall", "spearman_lo", "spearman_hi", "kendall_lo", "kendall_hi"):
    assert math.isnan(out[key]), key
  assert out["topk"] == pytest.approx(0.25)  # k = 1 of 4: chance level k / L.
  out = agreement.rank_agreement(truth, {k: 0.0 for k in truth})  # constant truth
  assert math.isnan(out["spearman"]) and math.isnan(out["kendall"])


def test_tied_topk_is_expected_overlap():
  # Top-2 of scores: layer0 for sure, one of the 2 tied layers (1, 2) -> 1/2 each.
  scores, truth = [3.0, 1.0, 1.0, 0.0], [3.0, 2.0, 0.0, 1.0]
  assert agreement.topk_overlap(np.array(scores), np.array(truth), 2) == pytest.approx(0.75)


def test_bootstrap_ci_contains_estimate():
  rng = np.random.default_rng(2)
  truth = np.arange(20.0)
  out = agreement.rank_agreement(_layers(truth + rng.normal(0, 3, 20)), _layers(truth))
  assert 0.7 < out["spearman"] < 1
  assert out["spearman_lo"] <= out["spearman"] <= out["spearman_hi"]
  assert out["kendall_lo"] <= out["kendall"] <= out["kendall_hi"]
  assert out["n_boot_valid"] == 1000


def test_too_few_layers_give_nan_ci():
  out = agreement.rank_agreement(_layers([1.0, 2.0]), _layers([1.0, 3.0]))
  assert out["spearman"] == pytest.approx(1.0) and math.isnan(out["spearman_lo"])


def test_nonfinite_layers_left_out_and_missing_layers_raise():
  truth = _layers([1.0, 2.0, 3.0, 4.0])
  scores = dict(truth, layer0=float("nan"))
  assert agreement.rank_agreement(scores, truth)["num_layers"] == 3
  with pytest.raises(ValueError, match="lack 1 layer"):
    agreement.rank_agreement({"layer0": 1.0, "layer1": 2.0, "layer2": 3.0}, truth)
  with pytest.raises(ValueError, match="k_frac"):
    agreement.rank_agreement(truth, truth, k_frac=0)


def test_compare_criteria_long_format():
  truth = pd.DataFrame({"quantize": [0.1, 0.2, 0.3], "noise": [0.3, 0.2, 0.1]},
                       index=["a", "b", "c"])
  table = agreement.compare_criteria({"up": {"a": 1, "b": 2, "c": 3},
                                      "flat": {"a": 1, "b": 1, "c": 1}}, truth, n_boot=50)
  assert list(table.columns) == agreement.AGREEMENT_COLUMNS
  assert list(zip(table.criterion, table.family)) == [
      ("up", "quantize"), ("up", "noise"), ("flat", "quantize"), ("flat", "noise")]
  assert table.spearman.tolist()[:2] == pytest.approx([1.0, -1.0])
  assert table.spearman.iloc[2:].isna().all()


def test_loss_fn_and_batches(digits):
  from safer_jax.zoo import models  # pylint: disable=import-outside-toplevel
  from safer_jax.core import data  # pylint: disable=import-outside-toplevel
  from safer_jax.training import train  # pylint: disable=import-outside-toplevel
  batches = data.batches_from_split(digits.train, 100, 3)
  assert len(batches) == 3 and batches[0]["image"].shape[0] == 100
  assert len(data.batches_from_split(digits.train.take(30), 100)) == 1
  model = models.get_model("mlp")
  variables = train.init_variables(model, digits.input_shape, 0)
  loss_fn = train.task_loss_fn(model, variables)
  logits = model.apply(variables, batches[0]["image"])
  ref = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits),
                                      jnp.asarray(batches[0]["label"])[:, None], axis=1))
  assert float(jax.jit(loss_fn)(variables["params"], batches[0])) == pytest.approx(
      float(ref), rel=1e-5)
  scores, _ = criteria.compute_all(["grad_norm"], loss_fn, variables["params"], batches)
  assert set(scores["grad_norm"]) == {"dense1/fc", "dense2/fc", "head/fc"}


def test_experiment_end_to_end(tiny_experiment, capsys):
  workdir = tiny_experiment("criteria_benchmark", files=(
      "agreement.csv", "agreement.md", "heatmap.png", "costs.csv", "costs.md", "scores.json",
      "mlp/sweep.csv", "mlp/truth.csv", "pooled.csv", "pooled.md", "frontier.png",
      "mlp/calibration.json"))
  printed = capsys.readouterr().out
  table = pd.read_csv(workdir / "agreement.csv")
  pairs = set(zip(table[table.metric == "accuracy_drop"].criterion,
                  table[table.metric == "accuracy_drop"].family))
  assert pairs == {(c, f) for c in criteria.CRITERIA
                   for f in ("quantize", "prune", "bitflip", "noise")}
  assert set(table.metric) == {"accuracy_drop", "loss_increase"}
  assert "pooled over 1 model(s)" in printed
  # calibrated grids: recorded per family, used by the sweep, mildest first
  import json  # pylint: disable=import-outside-toplevel
  calib = json.load(open(workdir / "mlp" / "calibration.json"))
  sweep_table = pd.read_csv(workdir / "mlp" / "sweep.csv")
  for family, g in calib.items():
    assert sorted(set(sweep_table[sweep_table.family == family].magnitude)) == sorted(g["grid"])
  scores = json.load(open(workdir / "scores.json"))
  assert scores["headline_metric"] in ("accuracy_drop", "loss_increase")
  pooled = pd.read_csv(workdir / "pooled.csv")
  assert set(pooled.family) == {"quantize", "prune", "bitflip", "noise"}
  assert (pooled.groupby(["metric", "family"]).winner.sum() <= 1).all()
  assert "| criterion | quantize | prune | bitflip | noise |" in (workdir / "agreement.md").read_text()
  costs = pd.read_csv(workdir / "costs.csv")
  assert set(costs.criterion) == set(criteria.CRITERIA) | {"sweep (ground truth)"}


# ---------------------------------------------------------------------------
# Pooled, paired comparisons (the discriminating benchmark)
# ---------------------------------------------------------------------------


def _synthetic(noise: dict, models=3, layers=25, seed=0):
  """Truth per model and criteria = truth + Gaussian noise of the given scale."""
  rng = np.random.default_rng(seed)
  truth, scores = {}, {c: {} for c in noise}
  for m in range(models):
    t = rng.random(layers)
    truth[f"m{m}"] = {f"l{i}": float(v) for i, v in enumerate(t)}
    for c, scale in noise.items():
      x = t + scale * rng.normal(size=layers)
      scores[c][f"m{m}"] = {f"l{i}": float(v) for i, v in enumerate(x)}
  return scores, truth


def test_pooled_rho_is_the_layer_weighted_mean_of_scipy_spearman():
  scores, truth = _synthetic({"a": 0.2, "b": 0.5}, models=3, layers=12)
  truth["m1"] = dict(list(truth["m1"].items())[:7])  # models of different sizes
  point, samples = agreement.pooled_bootstrap(scores, truth, n_boot=50, seed=1)
  for c in ("a", "b"):
    rhos, ns = [], []
    for m, t in truth.items():
      ls = list(t)
      rhos.append(scipy.stats.spearmanr([scores[c][m][l] for l in ls],
                                        [t[l] for l in ls]).statistic)
      ns.append(len(ls))
    assert point[c] == pytest.approx(np.average(rhos, weights=ns))
    assert samples[c].shape == (50,)


def test_paired_bootstrap_finds_the_better_criterion():
  scores, truth = _synthetic({"good": 0.1, "bad": 0.6, "worse": 1.5})
  point, samples = agreement.pooled_bootstrap(scores, truth, n_boot=1000, seed=0)
  table = agreement.paired_comparison(point, samples)
  assert table.iloc[0]["criterion"] == "good" and bool(table.iloc[0]["winner"])
  assert not table[table.criterion != "good"]["tied"].any()
  assert (table[table.criterion != "good"]["diff_lo"] > 0).all()


def test_paired_bootstrap_finds_a_tie_when_there_is_none():
  """Two criteria of the same quality: a tie group of both, no winner (over several seeds)."""
  for seed in range(5):
    scores, truth = _synthetic({"a": 0.4, "b": 0.4}, seed=seed)
    table = agreement.paired_comparison(*agreement.pooled_bootstrap(scores, truth, n_boot=1000,
                                                                    seed=seed))
    assert table["tied"].all() and not table["winner"].any(), table


def test_pooled_interval_is_tighter_than_any_single_model():
  scores, truth = _synthetic({"a": 0.5}, models=4, layers=20)
  _, samples = agreement.pooled_bootstrap(scores, truth, n_boot=1000, seed=0)
  lo, hi = np.percentile(samples["a"], [2.5, 97.5])
  for m in truth:
    one = agreement.rank_agreement(scores["a"][m], truth[m], n_boot=1000, seed=0)
    assert hi - lo < one["spearman_hi"] - one["spearman_lo"]


def test_tie_fraction_against_brute_force():
  v = [0.0, 1 / 359, 1 / 359, 2 / 359, 0.0, 0.5]
  pairs = [(i, j) for i in range(6) for j in range(6) if i != j]
  assert agreement.tie_fraction(v) == pytest.approx(
      sum(v[i] == v[j] for i, j in pairs) / len(pairs))
  assert agreement.tie_fraction([1.0, 2.0, 3.0]) == 0.0
  assert math.isnan(agreement.tie_fraction([1.0]))
