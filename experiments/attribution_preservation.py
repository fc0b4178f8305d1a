"""Does WCAM fine-tuning preserve attribution maps better than plain fine-tuning?

For each compression level (global magnitude pruning at several sparsities,
uniform per-channel quantization at several bit widths), three students of the
pretrained model are compared with it:

* ``compressed`` -- one-shot compression, no training;
* ``plain_ft`` -- iterative pruning / quantization-aware fine-tuning, task loss only (β = 0);
* ``wcam_ft`` -- the same with ``task + β · L_att`` (β = 100, as in the official code).

On the eval split: accuracy, and the deformation of the collapsed Grad-CAM map
at ``config.layer`` (for the original model's predicted class) w.r.t. the
original model's map -- Spearman rank correlation, top-k IoU, cosine -- per
image, summarised as mean ± std.

Writes ``results.csv`` (one row per level x variant), ``per_image.csv``,
``summary.md``, ``example_maps.png`` (original / compressed / plain FT / WCAM FT
side by side) and ``metrics.png`` (metric curves over levels).
"""

from __future__ import annotations

import dataclasses
import os
import re

import jax
import numpy as np
import pandas as pd

from experiments import common
from safer_jax.budgeting import wcam
from safer_jax.core import io
from safer_jax.measure import attribution
from safer_jax.report import plots
from safer_jax.training import train

VARIANTS = ("compressed", "plain_ft", "wcam_ft")


def get_config(tiny: bool = False):
  config = common.base_config()
  config.model = "lenet"
  config.layer = "conv2/conv"
  config.levels = ("prune:0.5", "prune:0.7", "prune:0.9", "quantize:4", "quantize:3",
                   "quantize:2")
  config.steps = 400
  config.batch_size = 64
  config.learning_rate = 1e-3
  config.beta = 100.0
  config.channel_drop = 0.0
  config.top_k = 0.25
  config.num_examples = 2
  if tiny:
    config.levels = ("prune:0.7",)
    config.steps = 4
    config.num_examples = 1
  return config


def validate(config, check: common.Checker) -> None:
  """Layer, compression levels and fine-tuning (see :func:`common.validate_config`)."""
  from safer_jax.core import perturb  # pylint: disable=import-outside-toplevel
  check.rule("layer", common.text(nonempty=True, note="the Grad-CAM layer, e.g. conv2/conv"))
  common.check_layers(check, "layer", [re.escape(config.layer)])
  allowed = "'prune:R' (R in [0, 1]) or 'quantize:B' (B an integer in 1..16)"
  check.rule("levels", common.sequence(common.text(nonempty=True), note=allowed))
  for text in config.levels:
    try:
      method, level = _parse_level(text)
      perturb.validate_magnitude(method, level)
    except ValueError as e:
      check.fail("levels", allowed, problem=f"{text!r}: {e}")
  check.rule("steps", common.integer(0))
  check.rule("beta", common.number(0))
  check.rule("channel_drop", common.number(0, 1, hi_open=True))
  check.rule("top_k", common.number(0, 1, lo_open=True, note="fraction of the map"))
  check.rule("num_examples", common.integer(1, note="example maps drawn per level"))


def _parse_level(text: str) -> tuple[str, float]:
  method, _, value = str(text).partition(":")
  if method not in wcam.COMPRESSIONS or not value:
    raise ValueError(f"level {text!r} must look like 'prune:0.7' or 'quantize:4'.")
  return method, float(value)


def _label(method: str, level: float) -> str:
  return f"prune {100 * level:g}%" if method == "prune" else f"{level:g}-bit"


def run(config, workdir: str) -> dict:
  entry = common.pretrained(config)
  model, teacher, split = entry.model, entry.variables, entry.dataset.eval
  levels = [_parse_level(t) for t in config.levels]
  images = np.asarray(split.images)
  maps_fn = jax.jit(lambda v, x, k: attribution.gradcam(model, v, x, config.layer, k))
  classes = np.asarray(jax.jit(lambda v, x: attribution.predict(model, v, x))(teacher, images))
  reference = np.asarray(maps_fn(teacher, images, classes))
  base = train.evaluate(model.apply, teacher, split)
  ft_config = wcam.FinetuneConfig(layer=config.layer, steps=config.steps,
                                  batch_size=config.batch_size,
                                  learning_rate=config.learning_rate,
                                  channel_drop=config.channel_drop, seed=config.seed)
  rows, per_image, examples = [], [], {}
  for method, level in levels:
    label = _label(method, level)
    students = {"compressed": wcam.compress(teacher, method, level)}
    for name, beta in (("plain_ft", 0.0), ("wcam_ft", float(config.beta))):
      students[name], _ = wcam.finetune(model, teacher, entry.dataset, method, level,
                                        dataclasses.replace(ft_config, beta=beta),
                                        progress=config.progress)
    examples[label] = {}
    for name, student in students.items():
      maps = np.asarray(maps_fn(student, images, classes))
      metrics = attribution.deformation_metrics(reference, maps, config.top_k)
      acc = train.evaluate(model.apply, student, split)
      rows.append({"method": method, "level": level, "label": label, "variant": name,
                   "accuracy": acc["accuracy"], "loss": acc["loss"],
                   **attribution.summarize(metrics)})
      per_image.append(pd.DataFrame({"label": label, "variant": name, "image": np.arange(len(maps)),
                                     **metrics}))
      examples[label][name] = maps[:config.num_examples]
    print(f"  {label}: " + ", ".join(
        f"{r['variant']} acc {100 * r['accuracy']:.1f}% rho {r['spearman_mean']:.3f}"
        for r in rows[-3:]), flush=True)
  results = pd.DataFrame(rows)
  summary = _summary(results, base, entry, config)
  paths = {"results": io.write_csv(os.path.join(workdir, "results.csv"), results),
           "per_image": io.write_csv(os.path.join(workdir, "per_image.csv"),
                                     pd.concat(per_image, ignore_index=True)),
           "summary": io.write_text(os.path.join(workdir, "summary.md"), summary),
           "examples": _plot_examples(images[:config.num_examples],
                                      reference[:config.num_examples], examples,
                                      os.path.join(workdir, "example_maps.png")),
           "metrics": plot_metrics(results, base, os.path.join(workdir, "metrics.png"))}
  print(summary)
  return {"paths": paths, "results": results}


def _summary(results: pd.DataFrame, base: dict, entry, config) -> str:
  lines = [f"# attribution_preservation: {entry.name} on {entry.dataset.name}, "
           f"Grad-CAM at {config.layer}", "",
           f"Original accuracy {100 * base['accuracy']:.2f}%. Maps compared with the original "
           f"model's on {base['num_examples']} eval images (mean ± std per image; top-"
           f"{100 * config.top_k:g}% IoU). Fine-tuning: {config.steps} steps, "
           f"β = {config.beta:g} for WCAM, 0 for plain.", "",
           "| level | variant | accuracy (%) | Spearman | IoU | cosine |",
           "|---|---|---|---|---|---|"]
  for _, r in results.iterrows():
    lines.append(f"| {r['label']} | {r['variant']} | {100 * r['accuracy']:.2f} | "
                 f"{r['spearman_mean']:.3f} ± {r['spearman_std']:.3f} | "
                 f"{r['iou_mean']:.3f} ± {r['iou_std']:.3f} | "
                 f"{r['cosine_mean']:.3f} ± {r['cosine_std']:.3f} |")
  lines.append("")
  for label, sub in results.groupby("label", sort=False):
    p = sub.set_index("variant")
    if {"plain_ft", "wcam_ft"} <= set(p.index):
      d_acc = 100 * (p.loc["wcam_ft", "accuracy"] - p.loc["plain_ft", "accuracy"])
      d_rho = p.loc["wcam_ft", "spearman_mean"] - p.loc["plain_ft", "spearman_mean"]
      lines.append(f"- {label}: WCAM − plain: accuracy {d_acc:+.2f} points, "
                   f"Spearman {d_rho:+.3f}, cosine "
                   f"{p.loc['wcam_ft', 'cosine_mean'] - p.loc['plain_ft', 'cosine_mean']:+.3f}.")
  return "\n".join(lines) + "\n"


def _plot_examples(images, reference, examples, path: str) -> str:
  """One row per level; per example image: input, original, compressed, plain FT, WCAM FT."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  labels = list(examples)
  n = len(images)
  cols = ["input", "original", *VARIANTS]
  fig, axes = plt.subplots(len(labels), len(cols) * n, squeeze=False,
                           figsize=(1.3 * len(cols) * n, 1.4 * len(labels) + 0.4))
  for i, label in enumerate(labels):
    for j in range(n):
      panels = [images[j, ..., 0], reference[j], *(examples[label][v][j] for v in VARIANTS)]
      for c, panel in enumerate(panels):
        ax = axes[i, j * len(cols) + c]
        ax.imshow(panel, cmap="gray" if c == 0 else "inferno")
        ax.set_xticks([])
        ax.set_yticks([])
        if i == 0:
          ax.set_title(cols[c].replace("_", " "), fontsize=8)
    axes[i, 0].set_ylabel(label, fontsize=8)
  fig.suptitle("Grad-CAM maps for the original model's class (each map on its own colour scale)",
               fontsize=9)
  fig.tight_layout()
  return io.save_figure(path, fig)


def plot_metrics(results: pd.DataFrame, base: dict, path: str) -> str:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  labels = list(dict.fromkeys(results["label"]))
  xs = np.arange(len(labels))
  # Dodge: each variant a little left or right of the level, so error bars do not overlap.
  offsets = {v: (k - (len(VARIANTS) - 1) / 2) * 0.12 for k, v in enumerate(VARIANTS)}
  fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
  colors = plots.source_colors([*VARIANTS, "original"])
  for ax, (col, title) in zip(axes, (("accuracy", "eval accuracy"), ("spearman", "Spearman"),
                                     ("iou", "top-k IoU"), ("cosine", "cosine"))):
    for v in VARIANTS:
      sub = results[results.variant == v].set_index("label").reindex(labels)
      if col == "accuracy":
        ax.plot(xs + offsets[v], 100 * sub["accuracy"], marker="o", label=v, color=colors[v])
      else:
        ax.errorbar(xs + offsets[v], sub[f"{col}_mean"], yerr=sub[f"{col}_std"], marker="o",
                    capsize=2, label=v, alpha=0.85, color=colors[v])
    if col == "accuracy":
      ax.axhline(100 * base["accuracy"], color=colors["original"], ls="-.", lw=0.8,
                 label="original")
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, rotation=30, fontsize=8)
    ax.set_title(title)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  return io.save_figure(path, fig)
