"""A plain (non-editable) ``pip install`` of the checkout gives a working package.

The install goes into a throw-away virtualenv, never into the environment running the tests: the
virtualenv sees this interpreter's site-packages through a ``.pth`` line (so jax, flax, ... are
not installed again), and pip puts safer_jax into the virtualenv's own site-packages, which comes
first on its ``sys.path``. ``.pth`` files inside a directory added by a ``.pth`` line are not
executed, so an editable install of the checkout in this environment stays invisible there.
test_notebook.py uses the same helpers.
"""

import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _site_dirs():
  """This interpreter's site-packages directories (where the dependencies are installed)."""
  dirs = [sysconfig.get_path("purelib"), sysconfig.get_path("platlib")]
  dirs += [p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages")]
  return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def throwaway_venv(path):
  """Creates a virtualenv at ``path`` that sees this interpreter's packages.

  Returns:
    ``(python, purelib)``: its interpreter and its own site-packages directory.
  """
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
  python = os.path.join(str(path), "Scripts" if os.name == "nt" else "bin", "python")
  purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                           check=True, capture_output=True, text=True).stdout.strip()
  with open(os.path.join(purelib, "_outer_site_packages.pth"), "w", encoding="utf-8") as f:
    f.write("\n".join(_site_dirs()) + "\n")
  return python, purelib


def copy_checkout(dest):
  """Copies what a source distribution holds (top-level files, ``safer_jax/``) to ``dest``.

  pip builds a local directory in place (``build/``, ``*.egg-info``); the copy keeps the checkout
  clean.
  """
  os.makedirs(dest)
  for name in os.listdir(ROOT):
    if os.path.isfile(os.path.join(ROOT, name)):
      shutil.copy2(os.path.join(ROOT, name), dest)
  shutil.copytree(os.path.join(ROOT, "safer_jax"), os.path.join(str(dest), "safer_jax"),
                  ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
  return str(dest)


def pip_env():
  """The environment for pip in a throw-away virtualenv.

  When this environment can build the package itself (setuptools >= 70.1, or an older one with
  ``wheel``), build isolation is turned off so no package index is needed; otherwise pip fetches
  setuptools for an isolated build, as ``pip install`` does anywhere. (pip reads
  ``PIP_NO_BUILD_ISOLATION=0`` as ``--no-build-isolation``.)
  """
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
  env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
  try:
    version = tuple(int(v) for v in importlib.metadata.version("setuptools").split(".")[:2])
  except (importlib.metadata.PackageNotFoundError, ValueError):
    version = (0, 0)
  if version >= (70, 1) or (version >= (64, 0) and importlib.util.find_spec("wheel")):
    env["PIP_NO_BUILD_ISOLATION"] = "0"
  return env


@pytest.mark.integration
def test_pip_install_works_outside_checkout(tmp_path):
  python, purelib = throwaway_venv(tmp_path / "venv")
  source = copy_checkout(tmp_path / "source")
  env = pip_env()
  install = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", source], env=env,
                           capture_output=True, text=True, timeout=300, check=False)
  assert install.returncode == 0, install.stdout + install.stderr
  shutil.rmtree(source)   # the installed package needs nothing from its source tree
  script = textwrap.dedent("""
      import flax.linen as nn, jax, jax.numpy as jnp
      import safer_jax as sj

      class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
          return nn.Dense(3, name="head")(nn.relu(nn.Dense(8, name="hidden")(x)))

      params = Net().init(jax.random.key(0), jnp.ones((1, 4)))["params"]
      print(sj.__file__)
      print(sorted(sj.core.layers.find_layers(params)))
      """)
  cwd = tmp_path / "elsewhere"
  cwd.mkdir()
  env["JAX_PLATFORMS"] = "cpu"
  run = subprocess.run([python, "-c", script], cwd=str(cwd), env=env, capture_output=True,
                       text=True, timeout=300, check=False)
  assert run.returncode == 0, run.stdout + run.stderr
  where, layers = run.stdout.strip().splitlines()[-2:]
  assert where == os.path.join(purelib, "safer_jax", "__init__.py")
  assert layers == "['head', 'hidden']"


def _name(requirement):
  """The normalized project name of a requirement string (``'jax>=0.10'`` -> ``'jax'``)."""
  name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)[1]
  return re.sub(r"[-_.]+", "-", name).lower()


def test_pyproject_lists_the_packages_of_requirements_txt():
  """pyproject's dependencies (+ the test extra) name exactly requirements.txt's pinned packages."""
  tomllib = pytest.importorskip("tomllib")
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  with open(os.path.join(ROOT, "requirements.txt"), encoding="utf-8") as f:
    lines = [line.split("#")[0].strip() for line in f]
  pinned = {_name(line) for line in lines if line and not line.startswith("-")}
  assert "-e ." in lines   # the checkout itself, so `import safer_jax` works from anywhere
  runtime = [_name(r) for r in project["dependencies"]]
  test = [_name(r) for r in project["optional-dependencies"]["test"]]
  assert set(runtime) | set(test) == pinned
  assert not set(runtime) & set(test)
  assert not any("==" in r for r in project["dependencies"])   # lower bounds, never pins
