"""Figures of sensitivity tables (matplotlib, Agg backend: works headless)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import pandas as pd  # pylint: disable=wrong-import-position

from safer_jax import io  # pylint: disable=wrong-import-position


def _magnitude_name(family: str) -> str:
  from safer_jax import perturb  # pylint: disable=import-outside-toplevel
  return perturb.FAMILIES[family].magnitude_name if family in perturb.FAMILIES else "magnitude"


def _families(table: pd.DataFrame) -> list[str]:
  return list(dict.fromkeys(table["family"]))


def _layers(table: pd.DataFrame) -> list[str]:
  return list(dict.fromkeys(table["layer"]))


def layer_styles(n: int) -> list[dict]:
  """``n`` distinguishable line styles, in network order.

  Up to 10: the ``tab10`` colours; up to 20: ``tab20``; more: ``viridis`` sampled
  over ``n`` (first layer dark, last yellow), with the line style and marker
  cycling so that neighbouring layers (close colours) still differ.
  """
  if n <= 10:
    return [{"color": plt.get_cmap("tab10")(i)} for i in range(n)]
  if n <= 20:
    return [{"color": plt.get_cmap("tab20")(i)} for i in range(n)]
  cmap = plt.get_cmap("viridis")
  dashes, markers = ("-", "--", ":", "-."), ("o", "s", "^", "D", "v")
  return [{"color": cmap(i / (n - 1)), "ls": dashes[i % len(dashes)],
           "marker": markers[i % len(markers)], "ms": 3} for i in range(n)]


def sensitivity_heatmap(table: pd.DataFrame, path: str, metric: str = "accuracy_drop",
                        title: str = "") -> str:
  """Layers x magnitude heatmap of the seed-averaged ``metric``, one panel per family."""
  families, layer_order = _families(table), _layers(table)
  # constrained layout: the figure title, panel titles, tick labels and colour bar never overlap.
  fig, axes = plt.subplots(1, len(families), figsize=(3.2 * len(families) + 1.5,
                                                      0.32 * len(layer_order) + 2.2),
                           squeeze=False, sharey=True, layout="constrained")
  vmax = max(float(table[metric].max()), 1e-9)
  image = None
  for ax, family in zip(axes[0], families):
    sub = table[table.family == family]
    grid = sub.groupby(["layer", "magnitude_index"])[metric].mean().unstack()
    grid = grid.reindex(layer_order)
    mags = sub.drop_duplicates("magnitude_index").sort_values("magnitude_index")["magnitude"]
    image = ax.imshow(grid.to_numpy(), aspect="auto", cmap="magma_r", vmin=0.0, vmax=vmax)
    ax.set_xticks(range(len(mags)))
    ax.set_xticklabels([f"{m:g}" for m in mags], rotation=45)
    ax.set_xlabel(_magnitude_name(family))
    ax.set_title(family)
    ax.set_yticks(range(len(layer_order)))
    ax.set_yticklabels(layer_order, fontsize=8)
  fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label=metric.replace("_", " "))
  if title:
    fig.suptitle(title, fontsize=11)
  return io.save_figure(path, fig)


def sensitivity_lines(table: pd.DataFrame, path: str, metric: str = "accuracy",
                      title: str = "") -> str:
  """Seed-averaged ``metric`` vs magnitude, one line per layer, one panel per family."""
  families, layer_order = _families(table), _layers(table)
  styles = layer_styles(len(layer_order))
  fig, axes = plt.subplots(1, len(families), figsize=(4 * len(families) + 2.2, 3.9),
                           squeeze=False, layout="constrained")
  for ax, family in zip(axes[0], families):
    sub = table[table.family == family]
    for style, layer in zip(styles, layer_order):
      curve = sub[sub.layer == layer].groupby("magnitude_index").agg(
          m=("magnitude", "first"), y=(metric, "mean"), s=(metric, "std")).fillna(0.0)
      x = np.arange(len(curve))
      ax.errorbar(x, curve["y"], yerr=curve["s"], label=layer, lw=1.2, capsize=2, **style)
      ax.set_xticks(x)
      ax.set_xticklabels([f"{m:g}" for m in curve["m"]], rotation=45)
    ax.set_title(family)
    ax.set_xlabel(_magnitude_name(family))
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
  # One legend for the figure, outside the panels (one column per 20 layers).
  handles, labels = axes[0][-1].get_legend_handles_labels()
  fig.legend(handles, labels, loc="outside right center", fontsize=7,
             ncols=max(1, -(-len(layer_order) // 20)), title="layer (network order)",
             title_fontsize=7)
  if title:
    fig.suptitle(title, fontsize=11)
  return io.save_figure(path, fig)


def interaction_figure(table: pd.DataFrame, path: str, title: str = "") -> str:
  """How far additivity fails (:func:`safer_jax.search.interactions`), two panels.

  Left: joint loss increase of each layer pair vs the sum of the two
  single-layer increases (nats, log-log when all are positive; the diagonal is
  additivity). Right: pairs x pairs matrix of ``joint / additive``.
  """
  order = list(dict.fromkeys(list(table["layer_a"]) + list(table["layer_b"])))
  fig, (ax, bx) = plt.subplots(1, 2, figsize=(11.5, 4.8), layout="constrained")
  ax.scatter(table["additive"], table["joint"], s=22, color="tab:blue")
  lo = float(min(table["additive"].min(), table["joint"].min()))
  hi = float(max(table["additive"].max(), table["joint"].max()))
  if lo > 0:
    ax.set_xscale("log")
    ax.set_yscale("log")
  ax.plot([lo, hi], [lo, hi], color="black", lw=0.8, ls="--", label="additive (joint = sum)")
  worst = table.reindex(table["excess"].abs().sort_values(ascending=False).index)[:3]
  for row in worst.itertuples():
    ax.annotate(f"{row.layer_a} + {row.layer_b}", (row.additive, row.joint), fontsize=7,
                xytext=(4, 4), textcoords="offset points")
  ax.set_xlabel("sum of single-layer loss increases (nats)")
  ax.set_ylabel("joint loss increase, both layers perturbed (nats)")
  ax.set_title("pairs of the most sensitive layers")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  ratio = np.full((len(order), len(order)), np.nan)
  for row in table.itertuples():
    i, j = order.index(row.layer_a), order.index(row.layer_b)
    ratio[i, j] = ratio[j, i] = row.ratio
  finite = ratio[np.isfinite(ratio)]
  span = max(float(np.max(np.abs(np.log2(finite)))) if finite.size else 1.0, 0.1)
  image = bx.imshow(np.log2(ratio), cmap="RdBu_r", vmin=-span, vmax=span)
  for i in range(len(order)):
    for j in range(len(order)):
      if np.isfinite(ratio[i, j]):
        dark = abs(np.log2(ratio[i, j])) > 0.6 * span
        bx.text(j, i, f"{ratio[i, j]:.2f}", ha="center", va="center", fontsize=7,
                color="white" if dark else "black")
  bx.set_xticks(range(len(order)))
  bx.set_xticklabels(order, rotation=45, ha="right", fontsize=7)
  bx.set_yticks(range(len(order)))
  bx.set_yticklabels(order, fontsize=7)
  bx.set_title("joint / additive (red: worse than additive)")
  fig.colorbar(image, ax=bx, shrink=0.8, label="log2(joint / additive)")
  if title:
    fig.suptitle(title, fontsize=11)
  return io.save_figure(path, fig)


def grouped_bars(path: str, labels: list[str], series: list[tuple], *, ylabel: str, title: str,
                 width: float, log: bool = False, rotation: int = 35,
                 figsize: tuple[float, float] = (0.9, 4.2)) -> str:
  """One group of bars per label, one bar per series; saved to ``path`` (returned).

  Args:
    path: the PNG to write.
    labels: the groups' x tick labels (G).
    series: ``(name, color, values (G,), errors (G,) or None)`` per bar of a group.
    ylabel, title: axis label and title.
    width: one bar's width (groups are 1 apart).
    log: log-scaled y axis.
    rotation: of the tick labels (degrees).
    figsize: ``(inches per group, height)``; the width is at least 6 inches.
  """
  x = np.arange(len(labels))
  fig, ax = plt.subplots(figsize=(max(6, figsize[0] * len(labels) + 2), figsize[1]))
  for k, (name, color, values, errors) in enumerate(series):
    offset = (k - (len(series) - 1) / 2) * width
    if errors is None:
      ax.bar(x + offset, values, width, label=name, color=color)
    else:
      ax.bar(x + offset, values, width, yerr=errors, capsize=2, label=name, color=color)
  if log:
    ax.set_yscale("log")
  ax.set_xticks(x)
  ax.set_xticklabels(labels, rotation=rotation, ha="right", fontsize=8)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3, axis="y")
  fig.tight_layout()
  return io.save_figure(path, fig)
