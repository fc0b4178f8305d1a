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
"""The columns of a classification sweep (the default task)."""
CELL = ["layer", "family", "magnitude", "magnitude_index", "seed"]


def columns(metrics: Sequence[str] = ("accuracy",)) -> list[str]:
  """A sweep table's columns for a task with ``metrics`` (higher is better).

  ``[layer, family, magnitude, magnitude_index, seed, *metrics, loss,
  *{metric}_drop, loss_increase, num_params]``: for classification
  (``metrics=('accuracy',)``) exactly :data:`COLUMNS`.
  """
  return [*CELL, *metrics, "loss", *[f"{m}_drop" for m in metrics], "loss_increase",
          "num_params"]


def metric_names(table: pd.DataFrame) -> list[str]:
  """The task metrics a sweep table holds (columns ``m`` with an ``m_drop`` beside them)."""
  return [c[:-len("_drop")] for c in table.columns
          if c.endswith("_drop") and c[:-len("_drop")] in table.columns]


def default_metric(table: pd.DataFrame) -> str:
  """The ground truth a table ranks layers by: ``accuracy_drop`` if it has one, else ``loss_increase``."""
  return "accuracy_drop" if "accuracy_drop" in table.columns else "loss_increase"


def sorted_table(table: pd.DataFrame, layer_order: Sequence[str],
                 family_order: Sequence[str]) -> pd.DataFrame:
  """``table`` by layer (``layer_order``), family (``family_order``), magnitude index and seed.

  Returns a new frame with a fresh index and exactly the columns of
  :func:`columns` for the metrics it holds (:data:`COLUMNS` for classification).
  """
  table = table.assign(_l=table["layer"].map({n: i for i, n in enumerate(layer_order)}),
                       _f=table["family"].map({n: i for i, n in enumerate(family_order)}))
  table = table.sort_values(["_l", "_f", "magnitude_index", "seed"], kind="stable")
  return table.drop(columns=["_l", "_f"]).reset_index(drop=True)[columns(metric_names(table))]


def importance(table: pd.DataFrame, metric: str | None = None) -> pd.DataFrame:
  """Per-layer importance per family: area under the (seed-averaged) ``metric`` curve.

  ``metric``: a column of the table; None: :func:`default_metric`
  (``accuracy_drop`` for classification, else ``loss_increase``).

  Magnitudes are placed at equally spaced positions in [0, 1], mildest first,
  and the curve is integrated with the trapezoid rule (a single magnitude:
  its value). Returns a DataFrame ``layer x family`` (layers in table order).
  """
  metric = default_metric(table) if metric is None else metric
  if metric not in table.columns:
    raise ValueError(f"importance: the table has no column {metric!r}; its metric columns: "
                     f"{[c for c in table.columns if c not in CELL]}.")
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
  """Mean and std over seeds of each drop and the loss increase per (layer, family, magnitude)."""
  g = table.groupby(["layer", "family", "magnitude_index", "magnitude"], sort=False)
  cols = [f"{m}_drop" for m in metric_names(table)] + ["loss_increase"]
  aggs = {}
  for c in cols:
    aggs[c] = (c, "mean")
    aggs[f"{c}_std"] = (c, "std")
  out = g.agg(**aggs, seeds=("seed", "count"))
  return out.reset_index().fillna({f"{c}_std": 0.0 for c in cols})
