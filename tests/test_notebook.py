"""The Colab notebook runs top to bottom on CPU in its tiny setting (nbclient), in an empty folder.

Its first cell really installs safer_jax with pip (``SAFER_JAX_SOURCE`` = a copy of this checkout),
into a throw-away virtualenv whose python runs the kernel (see test_install.py), so the
environment running the tests is left as it was.
"""

import importlib.util
import json
import os
import subprocess
import sys

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


def test_install_cell_stops_on_a_failed_install_and_never_replaces_one(monkeypatch, capsys):
  """The first cell run as Python with pip faked: a failed install stops it naming
  SAFER_JAX_SOURCE (the next cell died on the import); an existing install is left alone."""
  nb = nbformat.read(os.path.join(ROOT, "experiments", "criteria_colab.ipynb"), as_version=4)
  cell = compile(next(c.source for c in nb.cells if c.cell_type == "code"), "cell 1", "exec")
  pip_calls = []

  def failing_pip(args, **kwargs):
    del kwargs
    pip_calls.append(args)
    return subprocess.CompletedProcess(args, 1, "", "ERROR: No matching distribution found")

  find_spec = importlib.util.find_spec
  monkeypatch.setattr(subprocess, "run", failing_pip)
  monkeypatch.setenv("SAFER_JAX_SOURCE", "/nowhere/safer_jax")
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *args: None if name == "safer_jax" else find_spec(name, *args))
  with pytest.raises(RuntimeError, match=r"SAFER_JAX_SOURCE='/nowhere/safer_jax' \(exit status "
                                         r"1\):\nERROR: No matching.*\nSet SAFER_JAX_SOURCE"):
    exec(cell, {})  # pylint: disable=exec-used
  assert pip_calls == [[sys.executable, "-m", "pip", "install", "-q", "/nowhere/safer_jax"]]
  # safer_jax importable (here: the tests' own install): no pip, with or without a source
  monkeypatch.setattr(importlib.util, "find_spec", find_spec)
  capsys.readouterr()
  exec(cell, {})  # pylint: disable=exec-used
  out = capsys.readouterr().out
  assert "safer_jax is already installed (" in out
  assert "not installing SAFER_JAX_SOURCE='/nowhere/safer_jax' over it" in out
  monkeypatch.delenv("SAFER_JAX_SOURCE")
  exec(cell, {})  # pylint: disable=exec-used
  assert "not installing it again" in capsys.readouterr().out
  assert len(pip_calls) == 1
