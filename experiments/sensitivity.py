"""The layer-sensitivity ground truth for one model (SAfER's "dataset").

``python launch.py --experiment=sensitivity [--model=resnet8]`` writes to
``workdir/sensitivity/<model>/``: ``table.csv`` (one row per layer x family x
magnitude x seed), ``summary.csv`` (mean/std over seeds), ``importance.csv``
(area under the accuracy-drop curve, layer x family), ``meta.json``,
``heatmap.png`` and ``lines.png``. Killed half-way, a rerun resumes from
``table.csv`` (byte-identical to an uninterrupted run; the summary says how
many cells were reused and how many computed).

Activations too: with ``act_quantize`` bit widths (default ``(8, 6, 4, 3, 2)``;
``()``: off), the input of one layer at a time is fake-quantized per tensor
(:func:`safer_jax.measure.activations.act_sweep`, ranges calibrated on
``act_calib_examples`` training images) and the rows, family
``'act_quantize'``, join the weight families in the importance, heatmap and
summary (``act_table.csv``; linen and zoo models only).
"""

from __future__ import annotations

import os
import time

from experiments import common
import numpy as np
import pandas as pd
from ml_collections import config_dict

from safer_jax import zoo
from safer_jax.core import data, io, perturb
from safer_jax.measure import activations, sweep
from safer_jax.report import plots


TEXT_MODELS_OK = True  # runs the language models too (task from the dataset)


def get_config(tiny: bool = False):
  config = common.base_config()
  config.families = ("quantize", "prune", "bitflip", "noise")
  config.quantize = (8, 6, 5, 4, 3, 2)
  config.prune = (0.1, 0.3, 0.5, 0.7, 0.9)
  config.bitflip = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
  config.noise = (0.05, 0.1, 0.2, 0.5, 1.0)
  config.corrupt = (0.01, 0.02, 0.05, 0.1, 0.2)
  config.bitflip_representation = "int8"
  config.seeds = (0, 1, 2)
  config.layers = config_dict.placeholder(tuple)  # regexes of the layers; None: every layer
  config.max_parallel = 64
  config.eval_batch_size = 1024
  # pick max_parallel / eval_batch_size to fit this many 10**9 bytes; None: no budget
  config.memory_budget_gb = config_dict.placeholder(float)
  config.eval_examples = 0  # 0: the whole eval split
  config.act_quantize = (8, 6, 4, 3, 2)  # bits of each layer's input, alone; (): no activations
  config.act_calib_examples = 256  # training images the activation ranges come from
  if tiny:
    config.model = "mlp"
    config.quantize = (8, 2)
    config.prune = (0.5, 0.9)
    config.bitflip = (1e-3, 1e-2)
    config.noise = (0.2, 1.0)
    config.seeds = (0,)
    config.eval_examples = 128
    config.act_quantize = (8, 2)
    config.act_calib_examples = 64
  return config


def sweep_config(config) -> sweep.SweepConfig:
  families = {}
  for name in config.families:
    if name not in perturb.FAMILIES:
      raise ValueError(f"Unknown perturbation family {name!r}; valid families: "
                       f"{sorted(perturb.FAMILIES)}")
    families[name] = tuple(config[name]) if name in config else None
  return sweep.SweepConfig(
      families=families, seeds=tuple(config.seeds),
      layers=list(config.layers or ()) or None,
      family_options={"bitflip": {"representation": config.bitflip_representation}},
      max_parallel=config.max_parallel, eval_batch_size=config.get("eval_batch_size", 1024),
      memory_budget_bytes=(int(config.memory_budget_gb * 1e9)
                           if config.get("memory_budget_gb") else None))


def load(config) -> tuple[zoo.ZooEntry, object]:
  entry = common.pretrained(config)
  split = entry.dataset.eval.take(config.eval_examples or None)
  return entry, split


def run(config, workdir: str) -> dict:
  entry, split = load(config)
  scfg = sweep_config(config)
  task = entry.task
  t0 = time.perf_counter()
  table = sweep.run_sweep(entry.model, entry.variables, split, scfg,
                          results_path=os.path.join(workdir, "table.csv"),
                          progress=config.progress, task=task)
  classifier = "accuracy" in task.metrics
  if config.get("act_quantize") and not classifier:
    print(f"(activation quantization is measured for image classifiers; skipped for task "
          f"{task.name!r})", flush=True)
  if config.get("act_quantize") and classifier:
    calib = data.batches_from_split(entry.dataset.train.take(config.act_calib_examples),
                                         min(config.act_calib_examples, 128))
    acts = activations.act_sweep(entry.model, entry.variables, split, calib,
                                 tuple(int(b) for b in config.act_quantize),
                                 layers=list(dict.fromkeys(table["layer"])),
                                 batch_size=scfg.eval_batch_size, progress=config.progress)
    io.write_csv(os.path.join(workdir, "act_table.csv"), acts)
    attrs = dict(table.attrs)
    table = pd.concat([table, acts[list(table.columns)]], ignore_index=True)
    table.attrs.update(attrs)
  seconds = time.perf_counter() - t0
  metric = sweep.tables.default_metric(table)
  what = metric.replace("_", " ")
  title = f"{entry.name} on {entry.dataset.name}: {what} per layer"
  imp = sweep.importance(table, metric)
  paths = {
      "table": os.path.join(workdir, "table.csv"),
      "summary": io.write_csv(os.path.join(workdir, "summary.csv"), sweep.summary_stats(table)),
      "importance": io.write_csv(os.path.join(workdir, "importance.csv"),
                                 imp.reset_index(names="layer")),
      "heatmap": plots.sensitivity_heatmap(table, os.path.join(workdir, "heatmap.png"),
                                           metric=metric, title=title),
      "lines": plots.sensitivity_lines(table, os.path.join(workdir, "lines.png"),
                                       title=f"{entry.name}: {_score(table)} vs magnitude",
                                       metric=_score(table)),
  }
  meta = {"model": entry.name, "dataset": entry.dataset.name, "seed": config.seed,
          "task": task.name, "ground_truth": metric,
          "eval_examples": len(split), "baseline": table.attrs,
          "families": {k: list(v) for k, v in scfg.grids().items()},
          "act_quantize": list(config.get("act_quantize", ())),
          "seeds": list(scfg.seeds), "cells": len(table),
          "reused_cells": table.attrs["reused_cells"],
          "computed_cells": table.attrs["computed_cells"], "seconds": seconds,
          "checkpoint": entry.path, "versions": io.versions()}
  paths["meta"] = io.write_json(os.path.join(workdir, "meta.json"), meta)
  paths["summary_md"] = io.write_text(os.path.join(workdir, "summary.md"),
                                      _markdown(entry, split, table, imp, seconds, metric))
  print(f"{len(table)} cells ({cells_summary(table)}) in {seconds:.1f}s; {_baseline(table)}. "
        f"Most sensitive layer per family (area under the {what} curve):")
  for family in imp.columns:
    print(f"  {family:9s} {imp[family].idxmax():28s} {imp[family].max():.4f}")
  return {"paths": paths, "table": table, "importance": imp}


def cells_summary(table) -> str:
  """How many cells were computed now and how many reused from an earlier run's table.csv."""
  reused, computed = table.attrs["reused_cells"], table.attrs["computed_cells"]
  return f"{computed} computed, {reused} reused from table.csv" if reused else "all computed"


def _score(table) -> str:
  """The column the line plot shows: accuracy for classifiers, else the loss."""
  return "accuracy" if "accuracy" in table.columns else "loss"


def _baseline(table) -> str:
  """The float model's scores, e.g. 'float accuracy 98.61%' or 'float loss 1.68 (perplexity 5.36)'."""
  if "baseline_accuracy" in table.attrs:
    return f"float accuracy {100 * table.attrs['baseline_accuracy']:.2f}%"
  loss = table.attrs["baseline_loss"]
  ppl = f" (perplexity {np.exp(loss):.2f})" if table.attrs.get("task") == "token_cross_entropy" \
      else ""
  return f"float loss {loss:.4f}{ppl}"


def _markdown(entry, split, table, imp, seconds: float, metric: str = "accuracy_drop") -> str:
  unit = "eval images" if not entry.dataset.is_text else "eval sequences"
  lines = [f"# sensitivity: {entry.name} on {entry.dataset.name}", "",
           f"{len(table)} cells ({cells_summary(table)}) on {len(split)} {unit} in "
           f"{seconds:.1f} s; {_baseline(table)}. Importance = area under the "
           f"seed-averaged {metric.replace('_', '-')} curve over the magnitude grid (higher = more "
           f"sensitive); the most sensitive layer per family in bold.", "",
           "| layer | " + " | ".join(imp.columns) + " |", "|---|" + "---|" * len(imp.columns)]
  for layer, row in imp.iterrows():
    cells = [f"**{v:.4f}**" if v == imp[f].max() else f"{v:.4f}" for f, v in row.items()]
    lines.append(f"| {layer} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"
