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


def sensitivity_heatmap(table: pd.DataFrame, path: str, metric: str = "accuracy_drop",
                        title: str = "") -> str:
  """Layers x magnitude heatmap of the seed-averaged ``metric``, one panel per family."""
  families, layer_order = _families(table), _layers(table)
  fig, axes = plt.subplots(1, len(families), figsize=(3.2 * len(families) + 1.5,
                                                      0.32 * len(layer_order) + 1.8),
                           squeeze=False, sharey=True)
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
    fig.suptitle(title)
  return io.save_figure(path, fig)


def sensitivity_lines(table: pd.DataFrame, path: str, metric: str = "accuracy",
                      title: str = "") -> str:
  """Seed-averaged ``metric`` vs magnitude, one line per layer, one panel per family."""
  families, layer_order = _families(table), _layers(table)
  fig, axes = plt.subplots(1, len(families), figsize=(4 * len(families), 3.6), squeeze=False)
  cmap = plt.get_cmap("viridis", max(len(layer_order), 2))
  for ax, family in zip(axes[0], families):
    sub = table[table.family == family]
    for i, layer in enumerate(layer_order):
      curve = sub[sub.layer == layer].groupby("magnitude_index").agg(
          m=("magnitude", "first"), y=(metric, "mean"), s=(metric, "std")).fillna(0.0)
      x = np.arange(len(curve))
      ax.errorbar(x, curve["y"], yerr=curve["s"], color=cmap(i), label=layer, lw=1.2,
                  capsize=2)
      ax.set_xticks(x)
      ax.set_xticklabels([f"{m:g}" for m in curve["m"]], rotation=45)
    ax.set_title(family)
    ax.set_xlabel(_magnitude_name(family))
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
  axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
  if title:
    fig.suptitle(title)
  return io.save_figure(path, fig)
