"""Tests of the top-level surface (safer_jax/__init__.py): the curated names and the lazy modules."""

import inspect
import os
import subprocess
import sys
import types

import pytest

import safer_jax as sj

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBPACKAGES = ("core", "zoo", "measure", "training", "budgeting", "report")


def test_every_exported_name_resolves_and_the_one_call_api_is_a_function():
  for name in sj.__all__:
    assert getattr(sj, name) is not None, name
  assert inspect.isfunction(sj.allocate) and sj.allocate.__module__ == "safer_jax.budgeting.plan"
  assert inspect.isfunction(sj.fit) and sj.fit is sj.training.train.train
  assert sj.task_loss_fn is sj.training.train.task_loss_fn
  assert sj.clear_caches is sj.core.caches.clear_caches
  for name in ("criteria", "tasks", "models", "deploy", *SUBPACKAGES):
    assert isinstance(getattr(sj, name), types.ModuleType), name
  assert sj.tasks is sj.core.tasks and sj.models is sj.zoo.models
  assert sj.deploy is sj.budgeting.deploy


def test_each_subpackage_re_exports_its_modules():
  for sub in SUBPACKAGES:
    package = getattr(sj, sub)
    folder = os.path.dirname(package.__file__)
    modules = {f[:-3] for f in os.listdir(folder) if f.endswith(".py") and f != "__init__.py"}
    modules |= {d for d in os.listdir(folder)
                if os.path.isfile(os.path.join(folder, d, "__init__.py"))}
    assert modules == set(package.__all__) - {"ZooEntry", "from_checkpoint", "pretrained"}, sub
    for name in package.__all__:
      assert getattr(package, name) is not None, (sub, name)


def test_the_old_flat_modules_are_gone():
  for name in ("benchmark", "calibration", "train", "sweep", "plan", "layers", "data"):
    with pytest.raises(AttributeError):
      getattr(sj, name)


@pytest.mark.integration
def test_import_leaves_qwix_and_matplotlib_for_first_use():
  """``import safer_jax`` does not import qwix (~1 s) nor set matplotlib's backend."""
  code = ("import sys, safer_jax as sj\n"
          "assert 'qwix' not in sys.modules and 'matplotlib' not in sys.modules, sorted(\n"
          "    m for m in sys.modules if m.startswith(('qwix', 'matplotlib')))\n"
          "sj.deploy, sj.report.plots\n"
          "assert 'qwix' in sys.modules and 'matplotlib' in sys.modules\n")
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                        text=True, check=False)
  assert proc.returncode == 0, proc.stderr
