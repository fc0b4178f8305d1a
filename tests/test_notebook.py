"""The Colab notebook runs top to bottom on CPU in its tiny setting (nbclient)."""

import os

import nbformat
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_colab_notebook_executes(tmp_path, zoo_cache, monkeypatch):
  monkeypatch.setenv("SAFER_JAX_TINY", "1")
  monkeypatch.setenv("SAFER_JAX_CACHE", zoo_cache)
  monkeypatch.setenv("SAFER_JAX_NOTEBOOK_FIG", str(tmp_path / "rankings.png"))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  nb = nbformat.read(os.path.join(ROOT, "experiments", "criteria_colab.ipynb"), as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": ROOT}}).execute()
  outputs = "".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", ""))
                    for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs)
  assert "tiny setting; model: mlp" in outputs
  assert "hessian_trace" in outputs
  assert (tmp_path / "rankings.png").stat().st_size > 0
