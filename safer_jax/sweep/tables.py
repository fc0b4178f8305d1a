"""The sweep's table: its columns, its canonical order and what is read from it.

One row per cell::

    layer, family, magnitude, magnitude_index, seed, accuracy, loss,
    accuracy_drop, loss_increase, num_params
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

COLUMNS = ["layer", "family", "magnitude", "magnitude_index", "seed", "accuracy", "loss",
           "accuracy_drop", "loss_increase", "num_params"]


def sorted_table(table: pd.DataFrame, layer_order: Sequence[str],
                 family_order: Sequence[str]) -> pd.DataFrame:
  """``table`` by layer (``layer_order``), family (``family_order``), magnitude index and seed.

  Returns a new frame with a fresh index and exactly :data:`COLUMNS`.
  """
  table = table.assign(_l=table["layer"].map({n: i for i, n in enumerate(layer_order)}),
                       _f=table["family"].map({n: i for i, n in enumerate(family_order)}))
  table = table.sort_values(["_l", "_f", "magnitude_index", "seed"], kind="stable")
  return table.drop(columns=["_l", "_f"]).reset_index(drop=True)[COLUMNS]


def importance(table: pd.DataFrame, metric: str = "accuracy_drop") -> pd.DataFrame:
  """Per-layer importance per family: area under the (seed-averaged) ``metric`` curve.

  Magnitudes are placed at equally spaced positions in [0, 1], mildest first,
  and the curve is integrated with the trapezoid rule (a single magnitude:
  its value). Returns a DataFrame ``layer x family`` (layers in table order).
  """
  mean = table.groupby(["layer", "family", "magnitude_index"], sort=False)[metric].mean()
  out = {}
  for (layer, family), curve in mean.groupby(level=[0, 1], sort=False):
    values = curve.sort_index(level=2).to_numpy()
    if values.size == 1:
      out[(layer, family)] = float(values[0])
    else:
      x = np.linspace(0.0, 1.0, values.size)
      out[(layer, family)] = float(np.sum((values[1:] + values[:-1]) * np.diff(x)) / 2)
  frame = pd.Series(out).unstack()
  order = list(dict.fromkeys(table["layer"]))
  return frame.reindex(order)


def summary_stats(table: pd.DataFrame) -> pd.DataFrame:
  """Mean and std over seeds of accuracy drop and loss increase per (layer, family, magnitude)."""
  g = table.groupby(["layer", "family", "magnitude_index", "magnitude"], sort=False)
  out = g.agg(accuracy_drop=("accuracy_drop", "mean"), accuracy_drop_std=("accuracy_drop", "std"),
              loss_increase=("loss_increase", "mean"),
              loss_increase_std=("loss_increase", "std"), seeds=("seed", "count"))
  return out.reset_index().fillna({"accuracy_drop_std": 0.0, "loss_increase_std": 0.0})
