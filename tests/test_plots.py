"""Figures read at a glance: one palette, y axes that show differences, no overprinted text."""

import types

import matplotlib

matplotlib.use("Agg")
import matplotlib.text as mtext  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import pandas as pd  # pylint: disable=wrong-import-position
import pytest  # pylint: disable=wrong-import-position

from safer_jax.core import io  # pylint: disable=wrong-import-position
from safer_jax.report import plots  # pylint: disable=wrong-import-position

# Long layer names, as in a deep model's tree.
LONG = [f"encoder/stage{s}/block{b}/{k}_projection" for s in (1, 2) for b in (1, 2)
        for k in ("query", "value")]
CRITERIA = ["random", "param_count", "weight_norm", "quant_error", "spectral_norm", "grad_norm",
            "taylor", "taylor_abs", "fisher", "hessian_trace", "top_eigenvalue", "hawq_v2",
            "corruption_first_order", "corruption_pga", "integrated_gradients"]


def _capture(monkeypatch) -> list:
  figures = []
  monkeypatch.setattr(io, "save_figure", lambda path, fig: figures.append(fig) or path)
  return figures


def _corners(text, renderer) -> np.ndarray:
  """The 4 corners (pixels) of a drawn text's box, rotated with the text."""
  box = mtext.Text.get_window_extent(text, renderer)  # (an annotation's arrow left out)
  angle = text.get_rotation()
  if angle % 90 == 0:
    return np.array([[box.x0, box.y0], [box.x1, box.y0], [box.x1, box.y1], [box.x0, box.y1]])
  text.set_rotation(0)  # the unrotated size; the rotated box has the same centre
  flat = mtext.Text.get_window_extent(text, renderer)
  text.set_rotation(angle)
  w, h, t = flat.width / 2, flat.height / 2, np.deg2rad(angle)
  rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
  centre = np.array([(box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2])
  return centre + np.array([[-w, -h], [w, -h], [w, h], [-w, h]]) @ rot.T


def _overlap(a: np.ndarray, b: np.ndarray, depth: float = 1.0) -> bool:
  """Whether two convex quadrilaterals overlap by more than ``depth`` pixels (separating axes)."""
  for poly in (a, b):
    for k in range(4):
      edge = poly[(k + 1) % 4] - poly[k]
      axis = np.array([-edge[1], edge[0]]) / max(np.hypot(*edge), 1e-12)
      pa, pb = a @ axis, b @ axis
      if min(pa.max(), pb.max()) - max(pa.min(), pb.min()) <= depth:
        return False
  return True


def overprinted(fig, monkeypatch) -> list[tuple[str, str]]:
  """The pairs of texts a draw of ``fig`` puts on top of each other."""
  drawn = []
  draw = mtext.Text.draw

  def recording_draw(self, renderer):
    draw(self, renderer)
    if self.get_visible() and self.get_text().strip():
      drawn.append(self)

  with monkeypatch.context() as patch:
    patch.setattr(mtext.Text, "draw", recording_draw)
    fig.canvas.draw()
  renderer = fig.canvas.get_renderer()
  boxes = [(t.get_text(), _corners(t, renderer)) for t in dict.fromkeys(drawn)]
  return [(a, b) for i, (a, pa) in enumerate(boxes) for b, pb in boxes[i + 1:]
          if _overlap(pa, pb)]


def _interactions() -> pd.DataFrame:
  """28 pairs of 8 long-named layers; additive and joint close together (a cluster)."""
  rows = []
  pairs = [(a, b) for i, a in enumerate(LONG) for b in LONG[i + 1:]]
  for k, (a, b) in enumerate(pairs):
    additive = 1.0 + 0.01 * k
    joint = additive * (1.0 + 0.004 * k)
    rows.append({"layer_a": a, "layer_b": b, "additive": additive, "joint": joint,
                 "excess": joint - additive, "ratio": joint / additive})
  return pd.DataFrame(rows)


def _interactions_spread() -> pd.DataFrame:
  """15 pairs of 6 layers over a decade (log axes), the 3 furthest from additive close together."""
  rows = []
  layers = [f"stage{s}_block1/{k}" for s in (1, 2) for k in ("conv1", "conv2", "shortcut")]
  pairs = [(a, b) for i, a in enumerate(layers) for b in layers[i + 1:]]
  for k, (a, b) in enumerate(pairs):
    additive = 0.3 * 1.15 ** k if k < 12 else 2.0 + 0.05 * (k - 12)
    joint = additive * (1.1 + 0.02 * k) if k < 12 else 6.0 + 0.08 * (k - 12)
    rows.append({"layer_a": a, "layer_b": b, "additive": additive, "joint": joint,
                 "excess": joint - additive, "ratio": joint / additive})
  return pd.DataFrame(rows)


def _sensitivity() -> pd.DataFrame:
  """30 long-named layers, two families whose drops differ by two orders of magnitude."""
  rows = []
  names = [f"{n}_{r}" for r in range(4) for n in LONG][:30]
  for li, layer in enumerate(names):
    for family, grid, top in (("quantize", (8, 4, 2), 0.8), ("noise", (0.01, 0.1, 1.0), 0.008)):
      for mi, m in enumerate(grid):
        drop = top * (mi / 2) * (li + 1) / len(names)
        rows.append({"layer": layer, "family": family, "magnitude": m, "magnitude_index": mi,
                     "seed": 0, "accuracy": 0.9 - drop, "accuracy_drop": drop})
  return pd.DataFrame(rows)


# eval accuracy (%) of the README's resnet8 quant_sweep; float32 98.61
QUANT = {"oracle": [98.89, 98.89, 98.61, 99.16, 99.16, 99.16, 99.16],
         "hawq": [98.61, 98.33, 98.89, 98.89, 98.89, 98.89, 98.61],
         "fisher": [98.61, 98.33, 98.89, 98.89, 98.89, 98.89, 98.61],
         "corruption": [98.61, 98.33, 98.89, 98.89, 98.89, 98.61, 98.61],
         "integrated_gradients": [98.61, 98.33, 98.89, 98.89, 98.89, 98.89, 98.61],
         "quant_error": [92.48, 97.21, 98.61, 98.33, 98.89, 98.89, 98.61],
         "uniform": [72.98, 97.21, 97.21, 98.33, 98.89, 98.89, 98.61],
         "random": [95.36, 97.77, 98.05, 98.51, 98.98, 98.79, 98.61],
         "searched": [98.61, 98.89, 98.61, 99.16, 99.16, 99.16, 99.16]}
BUDGETS = [2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0]


def _quant_figure(monkeypatch):
  from experiments import quant_sweep  # pylint: disable=import-outside-toplevel
  figures = _capture(monkeypatch)
  rows = [{"source": s, "seed": -1, "budget_avg_bits": b, "avg_bits": b, "avg_bits_per_mac": b,
           "budget_unit": "bits", "accuracy": a / 100} for s, accs in QUANT.items()
          for b, a in zip(BUDGETS, accs)]
  entry = types.SimpleNamespace(name="resnet8", dataset=types.SimpleNamespace(name="digits"))
  quant_sweep.plot_accuracy(pd.DataFrame(rows), {"accuracy": 0.9861}, entry,
                    "accuracy_vs_bits.png")
  return figures[0]


def _frontier_figure(monkeypatch):
  from experiments import criteria_benchmark  # pylint: disable=import-outside-toplevel
  figures = _capture(monkeypatch)
  families = ("quantize", "prune", "bitflip", "noise")
  # costs and agreements bunched as in the README's run: many criteria at 1-5 s, rho close
  seconds = dict(zip(CRITERIA, (1.4, 0.006, 2.1, 4.9, 3.8, 10.2, 2.2, 3.9, 8.6, 38.0, 97.0, 21.6,
                                2.3, 95.0, 68.0)))
  rows = []
  for f, family in enumerate(families):
    for k, name in enumerate(CRITERIA):
      rho = 0.8 - 0.1 * k + 0.02 * f if k % 3 else 0.7 - 0.01 * k
      rows.append({"family": family, "criterion": name, "rho": rho, "lo": rho - 0.2,
                   "hi": rho + 0.15, "winner": k == 8})
  config = types.SimpleNamespace(families=families)
  criteria_benchmark.frontier_figure(pd.DataFrame(rows), seconds, config, 6,
                               "loss_increase", "frontier.png")
  return figures[0]


def _prune_figure(monkeypatch):
  from experiments import prune_sweep  # pylint: disable=import-outside-toplevel
  figures = _capture(monkeypatch)
  rows = [{"source": s, "target": t, "achieved_sparsity": t,
           "accuracy": 0.98 - (0.7 if t > 0.85 else 0.01 * k) * t, "accuracy_bn": 0.98 - 0.3 * t}
          for k, s in enumerate(("oracle", "magnitude", "fisher", "uniform", "erk",
                                 "global_magnitude", "searched", "searched_bn"))
          for t in (0.5, 0.6, 0.7, 0.8, 0.9)]
  entry = types.SimpleNamespace(name="resnet8", dataset=types.SimpleNamespace(name="digits"))
  prune_sweep.plot_accuracy(pd.DataFrame(rows), {"accuracy": 0.985}, entry,
                    "accuracy_vs_sparsity.png")
  return figures[0]


FIGURES = {
    "interactions": lambda mp: (_capture(mp), plots.interaction_figure(
        _interactions(), "interactions.png", "a long title of the interaction figure " * 2))[0][0],
    "interactions_spread": lambda mp: (_capture(mp), plots.interaction_figure(
        _interactions_spread(), "interactions.png", "resnet8: joint vs additive"))[0][0],
    "heatmap": lambda mp: (_capture(mp), plots.sensitivity_heatmap(
        _sensitivity(), "heatmap.png", title="sensitivity"))[0][0],
    "lines": lambda mp: (_capture(mp), plots.sensitivity_lines(
        _sensitivity(), "lines.png", title="sensitivity"))[0][0],
    "bars": lambda mp: (_capture(mp), plots.grouped_bars(
        "bars.png", LONG, [(s, c, np.linspace(1, 2, len(LONG)), None)
                           for s, c in (("first_order", "#d62728"), ("pga", "#9467bd"),
                                        ("random", "#7f7f7f"))],
        ylabel="loss increase", title="per-layer vulnerability", width=0.27, log=True,
        rotation=45))[0][0],
    "accuracy_vs_bits": _quant_figure,
    "frontier": _frontier_figure,
    "accuracy_vs_sparsity": _prune_figure,
}


@pytest.mark.parametrize("name", list(FIGURES))
def test_no_text_overprints_another(name, monkeypatch):
  fig = FIGURES[name](monkeypatch)
  assert not overprinted(fig, monkeypatch)


def test_overlap_check_sees_overprinted_and_rotated_text(monkeypatch):
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots()
  ax.text(0.5, 0.5, "one label")
  ax.text(0.52, 0.51, "another label")
  ax.text(0.1, 0.1, "rotated apart", rotation=45)
  ax.text(0.3, 0.1, "rotated apart too", rotation=45)
  assert overprinted(fig, monkeypatch) == [("one label", "another label")]
  plt.close(fig)


def test_palette_is_one_colour_per_name_everywhere():
  assert plots.source_color("fisher") == plots.PALETTE["fisher"]
  assert plots.source_color("float32") == plots.source_color("dense") == plots.PALETTE["reference"]
  assert plots.source_color("an_unknown_source") == plots.source_color("an_unknown_source")
  assert plots.source_color("fisher_per_param") not in (plots.PALETTE["fisher"], None)
  canonical = list(plots.PALETTE.values())
  assert len(set(canonical)) == len(canonical)


@pytest.mark.parametrize("names", [
    [*QUANT, "float32"],  # quant_sweep
    ["oracle", "magnitude", "fisher", "uniform", "erk", "global_magnitude", "searched",
     "searched_bn", "dense"],  # prune_sweep
    CRITERIA,  # criteria_benchmark's frontier
    ["oracle", "random", "none", *CRITERIA[1:], "oracle_per_param",  # every bitflip rule
     *[c + "_per_param" for c in CRITERIA[1:]], "fault-free"],
    ["first_order", "pga", "random"], ["plain", "acr"],
    ["compressed", "plain_ft", "wcam_ft", "original"],
    ["float32", "dense", "hawq", "hawq_v2", "new_a", "new_b", "new_c"],  # aliases, unknowns
])
def test_names_of_one_figure_never_share_a_colour(names):
  colors = plots.source_colors(names)
  assert list(colors) == list(dict.fromkeys(names))
  assert len(set(colors.values())) == len(colors)
  assert plots.source_colors(names) == colors  # deterministic
  known = [n for n in names if plots.ALIASES.get(n, n) in plots.PALETTE]
  assert colors[known[0]] == plots.source_color(known[0])


def test_accuracy_vs_bits_colours_each_source_and_shows_the_differences(monkeypatch):
  fig = _quant_figure(monkeypatch)
  ax = fig.axes[0]
  handles, labels = ax.get_legend_handles_labels()
  colors = [matplotlib.colors.to_hex(getattr(h, "lines", [h])[0].get_color()) for h in handles]
  assert [lab for lab in labels if lab in QUANT] == list(QUANT)
  assert any("float32" in lab for lab in labels)
  assert len(set(colors)) == len(colors), dict(zip(labels, colors))
  fig.canvas.draw()
  # At 3 bits the table separates oracle 98.89, fisher 98.33 and uniform 97.21: on the figure
  # those points stand apart by a readable share of the axes' height (the old 72-100 axis: 3%).
  ys = {}
  for name in ("oracle", "fisher", "uniform"):
    line = next(line for line in ax.get_lines() if line.get_gid() == name
                or (line.get_label() == name and len(line.get_xdata())))
    ys[name] = ax.transData.transform(
        np.column_stack(line.get_data()).astype(float))[1, 1]
  height = ax.get_window_extent().height
  assert abs(ys["oracle"] - ys["fisher"]) > 0.05 * height
  assert abs(ys["fisher"] - ys["uniform"]) > 0.05 * height


def test_heatmap_has_a_colour_scale_per_family(monkeypatch):
  fig = FIGURES["heatmap"](monkeypatch)
  table = _sensitivity()
  panels = [ax for ax in fig.axes if ax.get_title() in ("quantize", "noise")]
  assert len(panels) == 2
  for ax in panels:
    image = ax.get_images()[0]
    top = table[table.family == ax.get_title()]["accuracy_drop"].max()
    assert image.get_clim()[1] == pytest.approx(top)
    assert image.colorbar is not None
  assert panels[0].get_images()[0].colorbar is not panels[1].get_images()[0].colorbar


def test_labels_go_where_they_overprint_nothing(monkeypatch):
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(4, 3), layout="constrained")
  points = [(1.0 + 0.01 * k, 1.0 + 0.01 * (k % 3)) for k in range(12)]
  ax.scatter(*zip(*points))
  ax.set_xlim(0.5, 1.6)
  ax.set_ylim(0.5, 1.6)
  renderer = plots.freeze_layout(fig)
  unplaced = plots.place_labels(ax, points, [f"criterion_{k}" for k in range(12)], renderer)
  assert len(unplaced) < 12 and len(ax.texts) == 12 - len(unplaced)
  assert not overprinted(fig, monkeypatch)
  plt.close(fig)


def test_symlog_threshold_is_the_smallest_difference_shown():
  assert plots.symlog_threshold([0.0, 0.1, 25.63, -0.28, 1e-14]) == pytest.approx(0.1)
  assert plots.symlog_threshold([0.0, 0.0]) == 1.0
  assert plots.symlog_threshold([1.0, 1e5]) == pytest.approx(10.0)  # at most 4 decades
