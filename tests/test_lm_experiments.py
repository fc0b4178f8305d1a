"""The language model through the experiments: sensitivity and quant_sweep on lm_tiny, in process.

The zoo's recipe is cut to one epoch on 256 windows (seconds), so these check the plumbing
(task from the dataset, perplexity tables, tied q/k/v, embeddings kept in float, qwix equal to
the simulation), not the model's quality.
"""

import json

import numpy as np
import pandas as pd
import pytest

from safer_jax import zoo
from safer_jax.training import train


@pytest.fixture
def short_lm_recipe(monkeypatch):
  monkeypatch.setitem(zoo.cache.RECIPES, "lm_tiny", train.TrainConfig(epochs=1, batch_size=32))


def test_quant_sweep_on_the_language_model(tiny_experiment, short_lm_recipe):
  work = tiny_experiment("quant_sweep", "model=lm_tiny", "max_train=256", "max_eval=64",
                         "sources=('fisher',)", "budgets=(4.0,)", "search.evals=8",
                         "search.examples=32", "interaction.bits=None", "calib_examples=64",
                         "verify=False",  # (deploy.verify: tests/test_deploy.py; qwix below)
                         files=("summary.md", "results.csv", "qwix_rules.json", "costs.json"))
  results = pd.read_csv(work / "results.csv")
  assert "perplexity" in results and "accuracy" not in results
  # every allocation deployed through qwix scores as simulated
  np.testing.assert_allclose(results["qwix_perplexity"], results["perplexity"], rtol=1e-3)
  np.testing.assert_allclose(np.exp(results["loss"]), results["perplexity"], rtol=1e-6)
  for bits in map(json.loads, results["bits"]):
    assert not any(name.startswith("embed/") for name in bits)  # lookups stay in float
    for block in ("block1", "block2"):  # q/k/v tied by default for a language model
      assert len({bits[f"{block}/attn/{p}"] for p in ("query", "key", "value")}) == 1
  summary = (work / "summary.md").read_text()
  assert "Float perplexity" in summary and "largest gap to the simulated model" in summary
  assert "`embed/tokens`" in summary


def test_sensitivity_on_the_language_model(tiny_experiment, short_lm_recipe):
  work = tiny_experiment("sensitivity", "model=lm_tiny", "max_train=256", "max_eval=64",
                         files=("table.csv", "importance.csv", "summary.md", "heatmap.png"))
  table = pd.read_csv(work / "table.csv")
  assert {"token_accuracy", "token_accuracy_drop", "loss_increase"} <= set(table.columns)
  meta = json.loads((work / "meta.json").read_text())
  assert meta["task"] == "token_cross_entropy" and meta["ground_truth"] == "loss_increase"
  assert "perplexity" in (work / "summary.md").read_text()


def test_image_experiments_refuse_a_language_model(tiny_experiment):
  from safer_jax.core.errors import ConfigError  # pylint: disable=import-outside-toplevel
  with pytest.raises(ConfigError, match="lm_tiny"):
    tiny_experiment("prune_sweep", "model=lm_tiny")
