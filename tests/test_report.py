"""Tests of the per-workdir report."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position

from safer_jax.core import io  # pylint: disable=wrong-import-position
from safer_jax.report import markdown  # pylint: disable=wrong-import-position


def test_report_gathers_tables_and_figures(tmp_path):
  io.write_text(str(tmp_path / "quant_sweep" / "summary.md"),
                "# quant_sweep\n\n| a | b |\n|---|---|\n| **1** | 2 |\n\n- note\n")
  fig, ax = plt.subplots()
  ax.plot([0, 1])
  io.save_figure(str(tmp_path / "quant_sweep" / "curve.png"), fig)
  (tmp_path / "empty").mkdir()
  paths = markdown.build_report(str(tmp_path))
  md = open(paths["md"]).read()
  assert "## quant_sweep" in md and "### quant_sweep" in md and "quant_sweep/curve.png" in md
  assert "empty" not in md
  page = open(paths["html"]).read()
  assert "<table>" in page and "<b>1</b>" in page and "data:image/png;base64," in page
