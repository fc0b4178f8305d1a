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
  from safer_jax import data
  return data.load_dataset("digits")


@pytest.fixture(scope="session")
def zoo_cache(tmp_path_factory):
  """A zoo cache shared by the tests of one session (models train once)."""
  return str(tmp_path_factory.mktemp("zoo"))


def pytest_configure(config):
  """Subprocess launches share one throw-away persistent XLA cache (never the user's)."""
  del config
  import tempfile
  os.environ.setdefault("SAFER_JAX_XLA_CACHE", tempfile.mkdtemp(prefix="safer_jax_xla_"))


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
