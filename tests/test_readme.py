"""Every Python snippet in the README runs as written."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SNIPPETS = re.findall(r"```python\n(.*?)```", open(os.path.join(ROOT, "README.md")).read(), re.S)


@pytest.mark.integration
@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs(index, tmp_path, zoo_cache):
  env = dict(os.environ, SAFER_JAX_CACHE=zoo_cache, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", SNIPPETS[index]], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600, check=False)
  assert out.returncode == 0, out.stderr[-3000:]


def test_readme_has_snippets():
  assert len(SNIPPETS) >= 2
