"""Shared fixtures: a per-session zoo cache and the embedded dataset."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


@pytest.fixture(scope="session")
def digits():
  from safer_jax.core import data
  return data.load_dataset("digits")


def train_small(digits, name: str, epochs: int):
  """``(model, variables)``: zoo model ``name`` trained briefly on 512 training images."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  from safer_jax.zoo import models  # pylint: disable=import-outside-toplevel
  from safer_jax.training import train  # pylint: disable=import-outside-toplevel
  model = models.get_model(name)
  small = dataclasses.replace(digits, train=digits.train.take(512))
  variables, _ = train.train(model, small, train.TrainConfig(epochs=epochs), progress=False)
  return model, variables


@pytest.fixture(scope="session")
def zoo_cache(tmp_path_factory):
  """A zoo cache shared by the tests of one run (models train once).

  Under pytest-xdist (``-n 2``) the workers share one directory next to their
  own temp roots; the zoo's per-entry lock makes one worker train each model
  while the others wait and restore it.
  """
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent
  path = root / "zoo"
  path.mkdir(exist_ok=True)
  return str(path)


def pytest_configure(config):
  """One throw-away persistent XLA cache (never the user's) for the whole run.

  Subprocess launches use it through ``$SAFER_JAX_XLA_CACHE`` (as ``launch.py``
  does); the in-process tests too, so a program compiled by one test (or one
  pytest-xdist worker) is loaded, not recompiled, by the next -- every program,
  however quick to compile (on 2 cores the whole run went from 472 to 435 s).
  Results do not depend on it: a cache hit returns the same executable. The
  tests that count compilations switch it off while they count
  (tests/compile_log.py).

  The tests compile XLA:CPU code at LLVM optimization level 0
  (``--xla_backend_optimization_level=0``, appended to ``$XLA_FLAGS`` unless
  it names a level, and inherited by the subprocesses): the suite is
  compile-bound (1148 tests on 2 idle cores: 611 s at the default level, 464 s
  at 0, 1136 -> 847 CPU-seconds, every test passing both ways). It changes how
  XLA's generated loops are optimised, not what they compute. What users run
  keeps the default level: ``launch.py``, the experiments, the library outside
  pytest.
  """
  del config
  import tempfile
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_backend_optimization_level" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0".strip()
  run = os.environ.get("PYTEST_XDIST_TESTRUNUID")  # the same in every worker of one run
  if run:
    path = os.path.join(tempfile.gettempdir(), f"safer_jax_xla_{run}")
    os.makedirs(path, exist_ok=True)
  else:
    path = tempfile.mkdtemp(prefix="safer_jax_xla_")
  os.environ.setdefault("SAFER_JAX_XLA_CACHE", path)
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_compilation_cache_dir", os.environ["SAFER_JAX_XLA_CACHE"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


@pytest.fixture
def tiny_experiment(tmp_path, zoo_cache):
  """Runs an experiment's ``--tiny`` setting in this process, as ``launch.py`` would.

  ``tiny_experiment(name, *overrides, files=())``: ``overrides`` are ``key=value``
  items (``--config.key=value``), applied and validated as the launcher does;
  every name in ``files`` must be written and non-empty. Returns the results
  folder (``tmp_path/<experiment>/<model>``). The launcher itself (flags, error
  lines, exit codes, Ctrl-C) is tested through subprocesses in test_launch.py.
  """
  import experiments  # pylint: disable=import-outside-toplevel
  import launch as launcher  # pylint: disable=import-outside-toplevel
  from experiments import common  # pylint: disable=import-outside-toplevel

  def run(name, *overrides, files=()):
    module = experiments.get_experiment(name)
    config = module.get_config(tiny=True)
    config.cache_dir = zoo_cache
    common.apply_overrides(config, ["progress=False", *overrides])
    common.validate_config(module, config)
    workdir = launcher.results_dir(str(tmp_path), name, module, config)
    os.makedirs(workdir, exist_ok=True)
    module.run(config, workdir)
    for file in files:
      assert os.path.getsize(os.path.join(workdir, file)) > 0, file
    import pathlib  # pylint: disable=import-outside-toplevel
    return pathlib.Path(workdir)

  return run


def pytest_collection_modifyitems(items):
  """Every test that runs ``launch.py`` in a subprocess (the ``launch`` fixture) is ``integration``.

  Tiers: ``pytest -m "not integration"`` runs the in-process unit tests (minutes);
  ``pytest -m integration`` the subprocess / multi-process / notebook / install tests
  (marked here or with ``@pytest.mark.integration``). The README's command runs both.
  """
  for item in items:
    if "launch" in getattr(item, "fixturenames", ()):
      item.add_marker(pytest.mark.integration)


@pytest.fixture
def launch(zoo_cache):
  """Runs ``python launch.py ARGS`` in a subprocess: ``launch(args, cache=None, timeout=600)``.

  The zoo cache defaults to the session's :func:`zoo_cache`; returns the CompletedProcess.
  """
  def run(args, cache=None, timeout=600):
    env = dict(os.environ, SAFER_JAX_CACHE=cache or zoo_cache, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "launch.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)
  return run
