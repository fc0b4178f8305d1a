"""The Colab notebook runs top to bottom on CPU in its tiny setting (nbclient), in an empty folder.

Its first cell really installs safer_jax with pip (``SAFER_JAX_SOURCE`` = a copy of this checkout),
into a throw-away virtualenv whose python runs the kernel (see test_install.py), so the
environment running the tests is left as it was.
"""

import json
import os

import nbformat
import pytest
from nbclient import NotebookClient
from test_install import copy_checkout, pip_env, throwaway_venv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL = "safer_jax_throwaway"


@pytest.mark.integration
def test_colab_notebook_executes(tmp_path, zoo_cache, monkeypatch):
  python, purelib = throwaway_venv(tmp_path / "venv")
  kernel_dir = tmp_path / "jupyter" / "kernels" / KERNEL   # a kernel running that virtualenv
  kernel_dir.mkdir(parents=True)
  (kernel_dir / "kernel.json").write_text(json.dumps({
      "argv": [python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": KERNEL, "language": "python"}))
  for key, value in pip_env().items():   # the kernel inherits this environment
    monkeypatch.setenv(key, value)
  monkeypatch.delenv("PYTHONPATH", raising=False)
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  monkeypatch.setenv("SAFER_JAX_SOURCE", copy_checkout(tmp_path / "source"))
  monkeypatch.setenv("SAFER_JAX_TINY", "1")
  monkeypatch.setenv("SAFER_JAX_CACHE", zoo_cache)
  monkeypatch.setenv("SAFER_JAX_NOTEBOOK_FIG", str(tmp_path / "rankings.png"))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  workdir = tmp_path / "empty"
  workdir.mkdir()
  nb = nbformat.read(os.path.join(ROOT, "experiments", "criteria_colab.ipynb"), as_version=4)
  NotebookClient(nb, timeout=600, kernel_name=KERNEL,
                 resources={"metadata": {"path": str(workdir)}}).execute()
  outputs = "".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", ""))
                    for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs)
  assert "tiny setting; model: mlp" in outputs
  assert "safer_jax from " + os.path.join(purelib, "safer_jax", "__init__.py") in outputs, outputs
  assert "hessian_trace" in outputs
  assert (tmp_path / "rankings.png").stat().st_size > 0
