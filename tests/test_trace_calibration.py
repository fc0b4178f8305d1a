"""experiments/trace_calibration.py: exact traces, scoring, the tiny run and its config checks."""

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import common
from experiments import trace_calibration as tc
from safer_jax import criteria
from safer_jax.core import errors, layers


class _Tiny(nn.Module):
  """A conv (3x3, 1 -> 2 channels: 18 weights) and a dense head (32 -> 3: 96 weights)."""

  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Conv(2, (3, 3), strides=(2, 2))(x))
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


def _xent(model, params, batch):
  logits = model.apply({"params": params}, batch["image"])
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), batch["label"][:, None], 1))


def test_exact_trace_equals_the_dense_hessians_diagonal():
  """The brute-force float64 trace against the trace of ``jax.hessian``, per layer."""
  model = _Tiny()
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    batches = [{"image": jnp.asarray(rng.normal(size=(5, 8, 8, 1))),
                "label": jnp.asarray(rng.integers(0, 3, 5))} for _ in range(2)]
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64),
                          model.init(jax.random.key(0), batches[0]["image"])["params"])
    loss_fn = lambda p, b: _xent(model, p, b)
    names = layers.find_layers(params)
    assert len(names) == 2
    for name in names:
      kernel = layers.get_kernel(params, name)
      assert kernel.dtype == jnp.float64

      def f(k, name=name):
        p = layers.replace_kernel(params, name, k)
        return sum(loss_fn(p, b) for b in batches) / len(batches)

      dense = jax.hessian(f)(kernel).reshape(kernel.size, kernel.size)
      want = float(jnp.trace(dense))
      for chunk in (7, 256):  # a padded last chunk; all in one chunk, fewer than chunk
        got = tc.exact_layer_trace(loss_fn, params, batches, name, chunk)
        assert got == pytest.approx(want, rel=1e-10, abs=1e-12), (name, chunk)


def _estimates(means: dict, groups: dict):
  return {n: criteria.TraceEstimate(m, 0.1, 16, 0.7, groups[n], True, None)
          for n, m in means.items()}


def test_score_run_checks_only_the_claimed_pairs():
  exact = {"a": 10.0, "b": 9.8, "c": 5.0, "d": 1.0}
  # a, b tied (truly within 5%), c, d below in order: right.
  r = tc.score_run(_estimates({"a": 9.0, "b": 9.3, "c": 5.5, "d": 0.9},
                              {"a": 0, "b": 0, "c": 1, "d": 2}), exact, 0.05, None)
  assert r["right"] and r["claimed"] == 5 and r["wrong"] == 0
  assert (r["tie_pairs"], r["true_ties"]) == (1, 1)
  assert r["groups"] == [["b", "a"], ["c"], ["d"]]
  # b claimed above a: one wrong pair; with top_k=2 the a/b pair is not across the boundary.
  wrong = _estimates({"a": 9.0, "b": 9.9, "c": 5.5, "d": 0.9}, {"a": 1, "b": 0, "c": 2, "d": 3})
  assert tc.score_run(wrong, exact, 0.05, None)["wrong"] == 1
  top = tc.score_run(wrong, exact, 0.05, 2)
  assert top["right"] and top["claimed"] == 4 and top["top_set_exact"]
  # c and d tied although 5x apart: a reported tie that is not a true one.
  r = tc.score_run(_estimates({"a": 9.0, "b": 7.0, "c": 3.0, "d": 3.1},
                              {"a": 0, "b": 1, "c": 2, "d": 2}), exact, 0.05, None)
  assert (r["tie_pairs"], r["true_ties"]) == (1, 0) and r["right"]


def test_wilson_interval():
  lo, hi = tc.wilson(9, 10)
  assert lo == pytest.approx(0.5958, abs=1e-3) and hi == pytest.approx(0.9821, abs=1e-3)
  assert tc.wilson(0, 5)[0] == 0.0 and tc.wilson(5, 5)[1] == 1.0
  assert all(math.isnan(x) for x in tc.wilson(0, 0))


def test_tiny_experiment_writes_its_tables(tmp_path, zoo_cache):
  config = tc.get_config(tiny=True)
  config.cache_dir = zoo_cache
  common.apply_overrides(config, ["progress=False"])
  common.validate_config(tc, config)
  out = tc.run(config, str(tmp_path))
  result = json.load(open(out["paths"]["json"]))
  text = open(out["paths"]["md"]).read()
  for column in ("reported confidence", "runs", "mean reported", "actual right", "Wilson 95%",
                 "mean probes", "converged", "tie pairs (truly tied)"):
    assert column in text, column
  assert set(result["exact"]) == {"mlp"}
  assert (tmp_path / "exact_traces_mlp.json").exists()
  assert len(result["runs"]) == config.num_keys * len(tc.settings(config))
  assert sum(r["runs"] for r in result["bins"]["mlp"]) == len(result["runs"])
  for r in result["runs"]:
    assert 0 <= r["confidence"] <= 1 and r["num_probes"] >= 1
    assert r["right"] == (r["wrong"] == 0)
    if r["stop"] is None:
      assert r["num_probes"] == r["probes"] and r["converged"] is None
    else:
      assert isinstance(r["converged"], bool)
  # The exact traces agree with the estimator (mean over keys) within a few stderrs.
  for layer, est in result["estimate_check"]["mlp"].items():
    assert abs(est["mean"] - result["exact"]["mlp"][layer]) < 5 * est["stderr"] + 1e-6, layer


@pytest.mark.parametrize("item", ["num_keys=0", "targets=(1.0,)", "targets=(0.0,)",
                                  "fixed_probes=(1,)", "top_ks=(3,)", "top_ks=(0,)",
                                  "estimators=(nope,)", "bins=(0.9,0.5)", "bins=(1.0,)",
                                  "tie_rtol=-0.1", "max_probes=1", "exact_chunk=0",
                                  "models=(vgg,)", "n_boot=0"])
def test_bad_config_value_is_refused(item):
  config = tc.get_config(tiny=True)
  key = item.split("=", 1)[0]
  with pytest.raises(errors.ConfigError) as info:
    common.apply_overrides(config, [item])
    common.validate_config(tc, config)
  message = str(info.value)
  assert f"--config.{key}=" in message and "allowed" in message, message


def test_default_and_tiny_configs_are_valid():
  for tiny in (False, True):
    common.validate_config(tc, tc.get_config(tiny=tiny))
