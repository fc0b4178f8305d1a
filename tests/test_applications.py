"""End-to-end tests of the application experiments prune_sweep and bitflip_protect (launch.py --tiny)."""

import json

import pandas as pd

# ---------------------------------------------------------------------------
# End to end, through launch.py
# ---------------------------------------------------------------------------


def test_prune_sweep_tiny_writes_files(tiny_experiment):
  work = tiny_experiment("prune_sweep", "finetune_steps=5",
                         files=("results.csv", "costs.json", "summary.md",
                                "accuracy_vs_sparsity.png"))
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


def test_bitflip_protect_tiny_writes_files(tiny_experiment):
  work = tiny_experiment("bitflip_protect",
                         files=("results.csv", "scores.json", "summary.md", "accuracy_vs_rate.png"))
  results = pd.read_csv(work / "results.csv")
  assert set(results.rule) == {"fisher_per_param", "grad_norm", "random", "none"}
  assert (results.protected_fraction <= results.budget_fraction).all()
  assert (results.num_seeds == 4).all()
  none = results[results.rule == "none"]
  assert (none.protected == "[]").all()
