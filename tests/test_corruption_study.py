"""End-to-end tests of the corruption and acr_train experiments (launch.py --tiny)."""


import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from experiments import corruption


@pytest.mark.parametrize("p,n", [("2", None), ("inf", None), ("2", 5), ("inf", 5)])
def test_random_corruptions_have_the_norm_and_sparsity(p, n):
  a = np.asarray(corruption.random_corruptions(jax.random.key(0), jnp.float32(0.3),
                                               shape=(4, 6), p=p, n=n, num=7))
  assert a.shape == (7, 4, 6)
  flat = np.abs(a.reshape(7, -1))
  norms = flat.max(1) if p == "inf" else np.sqrt((flat ** 2).sum(1))
  np.testing.assert_allclose(norms, 0.3, rtol=1e-5)
  if n is not None:
    assert ((flat > 0).sum(1) <= n).all()


def test_corruption_experiment_writes_files(tmp_path, launch):
  out = launch(["--experiment=corruption", "--tiny", f"--workdir={tmp_path}",
                 "--config.progress=False"])
  assert out.returncode == 0, out.stderr[-3000:]
  work = tmp_path / "corruption" / "mlp"
  for name in ("results.csv", "summary.md", "meta.json", "delta_vs_eps.png",
               "layer_vulnerability.png"):
    assert (work / name).stat().st_size > 0, name
  results = pd.read_csv(work / "results.csv")
  assert set(results.method) == {"first_order", "pga", "random"}
  assert set(results.target) == {"dense2/fc", "head/fc", "all"}
  wide = results.pivot_table(index=["target", "p", "n_sparse", "eps"], columns="method",
                             values="delta")
  assert (wide["pga"] >= wide["first_order"] - 1e-6).all()  # PGA keeps its best iterate.
  assert "The claim" in (work / "summary.md").read_text()


def test_acr_train_experiment_writes_files(tmp_path, launch):
  out = launch(["--experiment=acr_train", "--tiny", f"--workdir={tmp_path}",
                 "--config.progress=False"])
  assert out.returncode == 0, out.stderr[-3000:]
  work = tmp_path / "acr_train" / "mlp"
  for name in ("results.csv", "summary.md", "meta.json", "robustness.png"):
    assert (work / name).stat().st_size > 0, name
  results = pd.read_csv(work / "results.csv")
  assert set(results.method) == {"plain", "acr"}
  assert set(results.condition) == {"clean", "corrupt", "bitflip", "quantize"}
  assert (results.accuracy > 0.3).all() and (results.accuracy <= 1).all()
