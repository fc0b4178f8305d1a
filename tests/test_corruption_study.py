"""End-to-end tests of the corruption and acr_train experiments (launch.py --tiny)."""

import pandas as pd


def test_corruption_experiment_writes_files(tiny_experiment):
  work = tiny_experiment("corruption",
                         files=("results.csv", "summary.md", "meta.json", "delta_vs_eps.png",
                                "layer_vulnerability.png"))
  results = pd.read_csv(work / "results.csv")
  assert set(results.method) == {"first_order", "pga", "random"}
  assert set(results.target) == {"dense2/fc", "head/fc", "all"}
  wide = results.pivot_table(index=["target", "p", "n_sparse", "eps"], columns="method",
                             values="delta")
  assert (wide["pga"] >= wide["first_order"] - 1e-6).all()  # PGA keeps its best iterate.
  assert "The claim" in (work / "summary.md").read_text()


def test_acr_train_experiment_writes_files(tiny_experiment):
  work = tiny_experiment("acr_train",
                         files=("results.csv", "summary.md", "meta.json", "robustness.png"))
  results = pd.read_csv(work / "results.csv")
  assert set(results.method) == {"plain", "acr"}
  assert set(results.condition) == {"clean", "corrupt", "bitflip", "quantize"}
  assert (results.accuracy > 0.3).all() and (results.accuracy <= 1).all()
