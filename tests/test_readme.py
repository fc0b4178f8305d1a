"""Every Python snippet in the README, docs/*.md and experiments/*.md runs as written.

The snippets of one page run in one subprocess, in order, each in fresh globals (and its own
working directory), so none can lean on a name another one defined; the interpreter, the
imports and the compiled programs are shared (a subprocess per snippet paid the jax / flax /
qwix import and recompiled the same programs nine times).
"""

import glob
import json
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
PAGES_WITH_SNIPPETS = sorted({page for page, _, _ in SNIPPETS}, key=lambda p: p != "README.md")

# Runs ``[[name, code], ...]`` from stdin: each snippet in fresh globals and its own empty
# folder; the first failure prints its name and traceback and exits with status 1.
RUNNER = """
import json, os, sys, traceback
for name, code in json.load(sys.stdin):
  folder = os.path.join(os.getcwd(), name.replace("/", "_").replace(":", "_"))
  os.makedirs(folder)
  here = os.getcwd()
  os.chdir(folder)
  try:
    exec(compile(code, name, "exec"), {"__name__": "__main__"})
  except BaseException:
    traceback.print_exc()
    sys.exit(f"snippet {name} failed (traceback above)")
  os.chdir(here)
  print(f"ran {name}", flush=True)
"""


@pytest.mark.integration
@pytest.mark.parametrize("page", PAGES_WITH_SNIPPETS)
def test_snippets_run(page, tmp_path, zoo_cache):
  snippets = [[f"{p}:{i}", code] for p, i, code in SNIPPETS if p == page]
  env = dict(os.environ, SAFER_JAX_CACHE=zoo_cache, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(snippets), cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=900, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"ran {snippets[-1][0]}" in out.stdout


def test_runner_names_the_failing_snippet_and_stops(tmp_path):
  """A failing snippet: its page:index and traceback, no later snippet run; fresh globals."""
  snippets = [["page.md:0", "x = 1"], ["page.md:1", "print(x)"], ["page.md:2", "print('later')"]]
  out = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(snippets), cwd=tmp_path,
                       capture_output=True, text=True, timeout=60, check=False)
  assert out.returncode == 1
  assert out.stderr.rstrip().endswith("snippet page.md:1 failed (traceback above)")
  assert "NameError: name 'x' is not defined" in out.stderr
  assert 'File "page.md:1", line 1' in out.stderr
  assert "ran page.md:0" in out.stdout and "later" not in out.stdout


def test_readme_has_snippets():
  assert sum(p == "README.md" for p, _, _ in SNIPPETS) >= 2
