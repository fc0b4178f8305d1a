"""Every Python snippet in the README, docs/*.md and experiments/*.md runs as written."""

import glob
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [os.path.join(ROOT, "README.md")] + sorted(
    glob.glob(os.path.join(ROOT, "docs", "*.md")) + glob.glob(os.path.join(ROOT, "experiments", "*.md")))
SNIPPETS = [(os.path.relpath(page, ROOT), i, code) for page in PAGES for i, code in enumerate(
    re.findall(r"```python\n(.*?)```", open(page, encoding="utf-8").read(), re.S))]


@pytest.mark.integration
@pytest.mark.parametrize("page,index,code", SNIPPETS, ids=[f"{p}:{i}" for p, i, _ in SNIPPETS])
def test_snippet_runs(page, index, code, tmp_path, zoo_cache):  # pylint: disable=unused-argument
  env = dict(os.environ, SAFER_JAX_CACHE=zoo_cache, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600, check=False)
  assert out.returncode == 0, out.stderr[-3000:]


def test_readme_has_snippets():
  assert sum(p == "README.md" for p, _, _ in SNIPPETS) >= 2
