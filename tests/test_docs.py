"""The documents: README's bounds, the experiment pages' generated blocks and their commands."""

import glob
import os
import re
import shlex

import pytest

from experiments import common
from experiments import docs
import experiments

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
PAGES = sorted(glob.glob(os.path.join(ROOT, "experiments", "*.md"))
               + glob.glob(os.path.join(ROOT, "docs", "*.md")))


def _text(path):
  return open(path, encoding="utf-8").read()


def test_readme_is_short_and_stands_alone():
  text = _text(README)
  assert len(text.splitlines()) <= 200
  assert "../shared" not in text and "MISSION" not in text
  for link in re.findall(r"\]\(([^)#]+)\)", text):  # every relative link resolves
    if not link.startswith("http"):
      assert os.path.exists(os.path.join(ROOT, link)), link


def test_every_page_linked_from_the_readme_names_its_regenerate_command():
  readme = _text(README)
  for path in glob.glob(os.path.join(ROOT, "experiments", "*.md")):
    name = os.path.basename(path)[:-3]
    text = _text(path)
    if docs.sources(text):
      assert f"experiments/{name}.md" in readme, name
      assert f"python -m experiments.docs runs {name}" in text, name
      assert f"--experiment={name}" in text, name


def test_generated_blocks_come_from_their_experiments_folder():
  known = set(experiments.list_experiments())
  for path in PAGES:
    for source in docs.sources(_text(path)):
      assert source.split("/")[0] in known, (path, source)


def _launch_commands(text):
  text = text.replace("\\\n", " ")  # shell line continuations
  for line in re.findall(r"^(?:\S+=\S+ )*python launch\.py .*$", text, re.M):
    line = line[line.index("python launch.py"):]
    yield shlex.split(line.split("#")[0])[2:]


@pytest.mark.parametrize("path", [README] + PAGES, ids=os.path.basename)
def test_launch_commands_name_real_experiments_and_config_keys(path):
  """Every ``python launch.py`` line: a known experiment and model, existing --config keys."""
  from safer_jax import models  # pylint: disable=import-outside-toplevel
  for args in _launch_commands(_text(path)):
    opts = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
    name = opts.get("experiment", "quant_sweep")
    module = experiments.get_experiment(name)
    keys = {k.split("=", 1)[0] for k in common.config_keys(module.get_config(tiny=False))}
    for key in (k[len("config."):] for k in opts if k.startswith("config.")):
      assert key in keys, (path, name, key)
    if opts.get("model") not in (None, "all"):
      assert opts["model"] in models.list_models(), (path, opts["model"])


def _page(tmp_path, body):
  page = tmp_path / "page.md"
  page.write_text(body)
  return str(page)


def test_regenerate_replaces_blocks_demotes_headings_and_copies_figures(tmp_path):
  run = tmp_path / "runs" / "quant_sweep" / "resnet8"
  run.mkdir(parents=True)
  (run / "summary.md").write_text("# quant_sweep: resnet8\n\n| a |\n|---|\n| 1 |\n\n```\n# kept\n```\n\n")
  (run / "plot.png").write_bytes(b"png-bytes")
  page = _page(tmp_path, "# Page\n\nprose\n\n<!-- generated from quant_sweep/resnet8/summary.md -->\n"
                         "old table\n<!-- end generated -->\n\n"
                         "<!-- figure from quant_sweep/resnet8/plot.png -->\n![plot](figs/p.png)\n"
                         "\n<!-- generated from quant_sweep/lm_tiny/summary.md -->\nlm\n"
                         "<!-- end generated -->\ntail\n")
  update = docs.regenerate(page, str(tmp_path / "runs"))
  assert update.blocks == ["quant_sweep/resnet8/summary.md"]
  assert update.figures == ["quant_sweep/resnet8/plot.png"]
  assert update.missing == ["quant_sweep/lm_tiny/summary.md"]
  assert open(page).read() == (
      "# Page\n\nprose\n\n<!-- generated from quant_sweep/resnet8/summary.md -->\n"
      "## quant_sweep: resnet8\n\n| a |\n|---|\n| 1 |\n\n```\n# kept\n```\n<!-- end generated -->\n\n"
      "<!-- figure from quant_sweep/resnet8/plot.png -->\n![plot](figs/p.png)\n"
      "\n<!-- generated from quant_sweep/lm_tiny/summary.md -->\nlm\n<!-- end generated -->\ntail\n")
  assert (tmp_path / "figs" / "p.png").read_bytes() == b"png-bytes"
  before = open(page).read()  # a second run changes nothing
  docs.regenerate(page, str(tmp_path / "runs"))
  assert open(page).read() == before


def test_docs_command_refuses_an_unknown_page_and_a_missing_workdir(tmp_path, capsys):
  assert docs.main(["docs", str(tmp_path / "nowhere")]) == 2
  assert "nowhere" in capsys.readouterr().out
  assert docs.main(["docs", str(tmp_path), "no_such_page"]) == 2
  out = capsys.readouterr().out
  assert "no_such_page" in out and "quant_sweep" in out
