"""Mixed-precision quantization under a size budget: does a sensitivity ranking beat uniform bits?

For each cost source (the measured oracle, each criterion, and the baselines
uniform and random) and each budget (average bits per weight, weighted by
parameter count): allocate a bit width per layer exactly (multiple-choice
knapsack, :func:`safer_jax.budgeting.budget.allocate_bits`), build that model and measure
its real accuracy and loss on the eval split. Costs are computed on
calibration data from the *training* split, never on the eval split. Every
allocation is one :meth:`safer_jax.Planner.allocate` call (one planner: each cost
table once) and measured through the :class:`safer_jax.Plan` it returns.

Quantization follows qwix's convention by default (``full_range``: the full
signed grid, what qwix deploys), and each allocation is also deployed *through
qwix* (``qwix.QtProvider`` with the rules of :func:`safer_jax.budgeting.deploy.to_qwix_rules`)
and evaluated: ``qwix_accuracy`` next to the simulated ``accuracy``.

Source ``searched`` (``search.evals`` > 0) measures whole allocations instead
of adding per-layer costs: a batched local search (:mod:`safer_jax.budgeting.search`)
from the knapsack allocations of every other non-random source, scored by loss
on ``search.examples`` training images, keeping an improvement over the best
start only when it is significant on those images; the interaction figure
compares the joint loss increase of pairs of layers with the sum of each alone.

Writes ``results.csv`` (one row per source x budget, with the per-layer bits),
``qwix_rules.json`` (the qwix rules of every source x budget), ``costs.json``
(the cost tables), ``search.json`` (per budget: evaluations, seconds, the
calibration scores of the starts and of the result), ``interactions.csv`` /
``interactions.png``, ``summary.md`` and ``accuracy_vs_bits.png``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any


import ml_collections
import numpy as np
import pandas as pd
from ml_collections import config_dict

from experiments import common
from safer_jax.budgeting import budget, deploy, mixed_precision, search
from safer_jax.budgeting import plan as plan_lib
from safer_jax.core import data, io, layers, tasks
from safer_jax.measure import activations
from safer_jax.report import plots
from safer_jax.training import train
from safer_jax.zoo import models


TEXT_MODELS_OK = True  # runs the language models too (task from the dataset)


def get_config(tiny: bool = False):
  config = common.base_config()
  config.candidates = (2, 3, 4, 5, 6, 8)
  config.budgets = (2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0)
  config.sources = mixed_precision.COST_SOURCES
  config.random_seeds = (0, 1, 2)
  config.calib_examples = 256
  config.calib_batch_size = 128
  # Layers sharing one bit width: a tuple of groups of layer names, e.g.
  # (("stage2_block1/conv1", "stage2_block1/shortcut"), ...); (): none.
  config.tie_groups = ()
  # Tie each attention's query/key/value (and gate/up) kernels to one bit width
  # (mixed_precision.tie_groups): None = for language models (TEXT_MODELS) only.
  config.tie_qkv = config_dict.placeholder(bool)
  config.full_range = True  # qwix's grid (every signed code); False: -(2^(b-1)-1)..2^(b-1)-1
  # What a budget limits: 'bits' (average bits per weight: the model's size in bytes) or
  # 'bops' (average weight bits per multiply-accumulate: bit operations, MACs x weight bits x
  # act_bits, counted from the model's own layer shapes).
  config.budget_unit = "bits"
  # Granularity: None = per output channel; an integer = group-wise scales of that many input
  # rows on Dense (2-D) kernels (qwix's tile_size; convolutions stay per channel).
  config.group_size = config_dict.placeholder(int)
  config.act_bits = 8  # activation bits (the BOPs count; the inputs' grid with quantize_acts)
  # Weights *and* activations: every layer's input quantized to act_bits (per tensor, static
  # ranges calibrated on the calibration images), in the evaluation of every allocation.
  config.quantize_acts = False
  config.qwix = True  # also deploy every allocation through qwix and evaluate it
  # deploy.verify: qwix vs the simulation layer by layer on the lowest budget's first allocation
  # (one qwix compilation per layer), printed in summary.md
  config.verify = True
  # Interaction-aware search (source 'searched'): `evals` whole-model evaluations per budget,
  # from the knapsack solutions of every source (and uniform), selected by loss on `examples`
  # training images (never the eval split), `batch` candidates proposed per batched
  # evaluation. evals=0: no search.
  config.search = common.search_config(tiny)
  # The interaction figure: every layer quantized alone and the `top` most sensitive ones in
  # pairs, at `bits` (None: no figure).
  config.interaction = ml_collections.ConfigDict({"bits": 3, "top": 6})
  if tiny:
    config.model = "mlp"
    config.budgets = (3.0, 6.0)
    config.sources = ("oracle", "quant_error", "fisher")
    config.random_seeds = (0,)
    config.calib_examples = 128
  return config


def validate(config, check: common.Checker) -> None:
  """Bit widths, budgets, sources, seeds and tie groups (see :func:`common.validate_config`)."""
  check.rule("candidates", common.sequence(common.integer(1, 16), unique=True,
                                           note="bit widths"))
  lowest, highest = min(config.candidates), max(config.candidates)
  check.rule("budgets", common.sequence(common.number(
      lowest, highest, note="average bits per weight, from the smallest to the largest "
      "candidate")))
  check.rule("sources", common.sequence(common.choice(mixed_precision.COST_SOURCES),
                                        nonempty=False, unique=True))
  check.rule("random_seeds", common.sequence(common.SEED, nonempty=False, unique=True))
  check.rule("tie_qkv", common.optional(common.boolean()))
  check.rule("tie_groups", common.sequence(
      common.sequence(common.text(nonempty=True), note="layer names"), nonempty=False,
      note="groups of layers sharing one bit width, e.g. (('a', 'b'), ('c', 'd'))"))
  check.rule("full_range", common.boolean())
  check.rule("budget_unit", common.choice(BUDGET_UNITS))
  check.rule("group_size", common.optional(common.integer(1, note="input rows per scale group")))
  check.rule("act_bits", common.integer(2, 16, note="activation bits"))
  check.rule("quantize_acts", common.boolean())
  check.rule("qwix", common.boolean())
  check.rule("verify", common.boolean())
  common.validate_search(check, "interaction.bits", common.optional(common.integer(
      1, 16, note="bits of the interaction figure; None: off")))
  if config.qwix:
    check.require(all(deploy.MIN_BITS <= b <= deploy.MAX_BITS for b in config.candidates),
                  "candidates", f"bit widths {deploy.MIN_BITS}..{deploy.MAX_BITS} with qwix=True "
                  f"(qwix's integer types), or --config.qwix=False")
  ties = _tie_groups(config.tie_groups) or []
  common.check_layers(check, "tie_groups", [re.escape(n) for g in ties for n in g])


BUDGET_UNITS = ("bits", "bops")


def _tie_groups(groups) -> list[list[str]] | None:
  """``config.tie_groups`` as lists of layer names; None when there are none."""
  return [list(group) for group in groups if group] or None


@dataclasses.dataclass(frozen=True)
class Score:
  """What the tables report per allocation: the eval ``column`` of :func:`safer_jax.evaluate`."""
  column: str  # 'accuracy' (classifiers) or 'perplexity' / 'loss'
  label: str
  higher_is_better: bool
  scale: float = 1.0  # accuracy in %

  def fmt(self, value: float) -> str:
    return f"{self.scale * value:.2f}"


def score_of(task) -> Score:
  if "accuracy" in task.metrics:
    return Score("accuracy", "eval accuracy (%)", True, 100.0)
  if "perplexity" in task.derived:
    return Score("perplexity", "eval perplexity", False)
  return Score("loss", f"eval loss ({task.name})", False)


# A language model's defaults where the config still holds the image ones (the per-token
# criteria cost more per example: integrated gradients took minutes on lm_tiny; budgets below 3
# bits leave it no better than a unigram model).
TEXT_DEFAULTS = {"sources": ("oracle", "hawq", "fisher", "corruption", "quant_error"),
                 "budgets": (3.0, 4.0, 5.0, 6.0, 8.0), "calib_examples": 128,
                 "random_seeds": (0,), "search.examples": 128, "search.evals": 96}


def text_defaults(config):
  """``config`` with :data:`TEXT_DEFAULTS` for each field still at its image default (printed)."""
  base = get_config(False)
  changed = {}
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for key, value in TEXT_DEFAULTS.items():
      section, _, field = key.rpartition(".")
      node, default = (config[section], base[section]) if section else (config, base)
      if tuple(np.atleast_1d(node[field])) == tuple(np.atleast_1d(default[field])):
        node[field] = value
        changed[key] = value
  if changed:
    print(f"language model defaults: {changed}", flush=True)
  return config


def _bit_budget(config, avg: float, ties: list[list[str]] | None) -> plan_lib.BitBudget:
  """The :class:`safer_jax.budgeting.plan.BitBudget` of ``avg`` under ``config``'s unit, grid
  and ties."""
  return plan_lib.BitBudget(avg, tuple(int(b) for b in config.candidates),
                            unit=config.budget_unit, tie_groups=ties or (),
                            full_range=config.full_range, group_size=config.group_size)


def run(config, workdir: str) -> dict:
  if models.ALIASES.get(config.model, config.model) in models.TEXT_MODELS:
    config = text_defaults(config)
  entry = common.pretrained(config)
  task = entry.task
  score = score_of(task)
  variables, split = entry.variables, entry.dataset.eval
  calib = plan_lib.calibration_split(entry.dataset.train, config.calib_examples)
  # The layers qwix deploys (kernels of Dense/Conv/Einsum); embeddings stay in float.
  names = plan_lib.quantized_layers(variables)
  apply = entry.model.apply
  if config.quantize_acts:  # W + A: every layer's input at act_bits, calibrated ranges
    ranges = activations.input_ranges(entry.model, variables, data.batches_from_split(
        calib, config.calib_batch_size), names)
    apply = activations.quantized_inputs_apply(entry.model, ranges, config.act_bits)
  planner = plan_lib.Planner(
      entry.model, variables, entry.dataset.train, task=task,
      calib_examples=config.calib_examples, search_examples=config.search.examples,
      batch_size=config.calib_batch_size, seed=config.seed, search_batch=config.search.batch,
      search_model=apply if config.quantize_acts else None, progress=config.progress)
  kept = [n for n in layers.find_layers(variables) if n not in names]
  if kept:
    print(f"kept in float (qwix does not quantize embedding lookups): {kept}", flush=True)
  sizes = {n: int(layers.get_kernel(variables, n).size) for n in names}
  macs = {n: planner.macs[n] for n in names}
  ties = _tie_groups(config.tie_groups)
  tie_qkv = (config.tie_qkv if config.tie_qkv is not None
             else models.ALIASES.get(entry.name, entry.name) in models.TEXT_MODELS)
  if tie_qkv:
    ties = (ties or []) + mixed_precision.tie_groups(names)
    print(f"tied bit widths: {ties}", flush=True)
  budgets = {avg: _bit_budget(config, avg, ties) for avg in config.budgets}
  print(f"cost tables from {len(calib)} calibration examples: {list(config.sources)}",
        flush=True)
  tables = planner.cost_tables(next(iter(budgets.values())), config.sources)
  seconds = dict(planner.seconds)
  base = train.evaluate(entry.model.apply, variables, split, task=task)
  rows, rules, deployed = [], {}, {}

  def through_qwix(plan: plan_lib.Plan) -> dict:
    """The allocation deployed by qwix and evaluated (one compilation per distinct one)."""
    key = tuple(sorted(plan.values.items()))
    if key not in deployed:
      deployed[key] = train.evaluate(plan.deploy(entry.model, variables), variables, split,
                                     task=task)
    return deployed[key]

  baselines = [(s, None) for s in config.sources] + [("uniform", None)] + [
      ("random", seed) for seed in config.random_seeds]
  searching = config.search.evals > 0
  if searching:
    seconds["searched"] = 0.0

  def measure(source: str, seed: int | None, avg: float, plan: plan_lib.Plan,
              solver: str) -> dict:
    """The row of one allocation: held-out accuracy and loss, qwix, size, BOPs."""
    m = plan.evaluate(apply, split, task, variables=variables)
    bits = plan.values
    # (W + A: qwix's QtProvider refuses a convolution whose input and weight types differ.)
    q = (through_qwix(plan) if config.qwix and not config.quantize_acts
         else {score.column: np.nan, "loss": np.nan})
    label = source if seed is None else f"{source}_seed{seed}"
    rules.setdefault(label, {})[f"{avg:g}"] = deploy.rules_to_json(plan.to_qwix(variables))
    size_bits = sum(sizes[n] * b for n, b in bits.items())
    return {"source": source, "seed": -1 if seed is None else seed, "budget_avg_bits": avg,
            "budget_unit": config.budget_unit,
            "avg_bits": size_bits / sum(sizes.values()), "size_bytes": size_bits / 8,
            "bops": budget.bops(bits, macs, config.act_bits),
            "avg_bits_per_mac": sum(macs[n] * b for n, b in bits.items())
                                / max(sum(macs.values()), 1),
            **({"accuracy": m["accuracy"], "loss": m["loss"],
                "accuracy_drop": base["accuracy"] - m["accuracy"],
                "qwix_accuracy": q["accuracy"]} if score.column == "accuracy" else
               {score.column: m[score.column], "loss": m["loss"],
                "loss_increase": m["loss"] - base["loss"],
                f"qwix_{score.column}": q[score.column], "qwix_loss": q["loss"]}),
            "bits": json.dumps(bits), "solver": solver}

  searches = []
  for avg, bit_budget in budgets.items():
    for source, seed in baselines:
      plan = planner.allocate(bit_budget, source=source, seed=seed)
      rows.append(measure(source, seed, avg, plan, plan.method))
    if searching:  # from the knapsack solutions of every source, and uniform
      plan = planner.allocate(bit_budget, source=(*config.sources, "uniform"),
                              search=config.search.evals)
      r = plan.search
      seconds["searched"] += r["seconds"]
      searches.append({"budget_avg_bits": avg, **common.search_record(r)})
      rows.append({**measure("searched", None, avg, plan, f"search from {r['start']}"),
                   "search_evals": r["evaluations"], "search_seconds": r["seconds"]})
    print(f"  budget {avg:4.1f} bits: " + ", ".join(
        f"{r['source']} {score.fmt(r[score.column])}"
        for r in rows[-len(baselines) - searching:] if r["seed"] <= 0), flush=True)
  interactions = None
  if config.interaction.bits:
    perturbed = {n: mixed_precision.quantize_model(
        variables, {n: config.interaction.bits}, full_range=config.full_range,
        group_size=config.group_size)["params"] for n in names}
    perturbed = {n: layers.get_kernel(p, n) for n, p in perturbed.items()}
    interactions = search.interactions(planner.search_model, variables, planner.search_split,
                                       perturbed, top=min(config.interaction.top, len(names)),
                                       task=task)
  results = pd.DataFrame(rows)
  check = None
  if config.qwix and config.verify and not config.quantize_acts:
    check = _verify(entry, variables, calib, task, results, config)
  summary = _summary(results, base, entry, seconds, config, searches, interactions, score,
                     kept, ties if tie_qkv else None, check)
  costs = {"tables": tables, "seconds": seconds, "sizes": sizes, "macs_per_example": macs,
           "baseline": base, "model": entry.name}
  paths = common.write_allocation_files(
      workdir, results, costs, summary, lambda path: plot_accuracy(results, base, entry, path, score),
      "accuracy_vs_bits.png",
      {"search_examples": config.search.examples, "objective": "loss", "budgets": searches},
      interactions, f"{entry.name}: joint vs additive loss increase, layers at "
      f"{config.interaction.bits} bits ({config.search.examples} training images)",
      extra={"qwix_rules": ("qwix_rules.json", rules)})
  print(summary)
  return {"paths": paths, "results": results}


def _mean_by_source(results: pd.DataFrame, score: Score | None = None) -> pd.DataFrame:
  col = "accuracy" if score is None else score.column
  qwix = f"qwix_{col}"
  return results.groupby(["source", "budget_avg_bits"], sort=False).agg(
      accuracy=(col, "mean"), accuracy_std=(col, "std"),
      qwix_accuracy=(qwix, "mean") if qwix in results else (col, lambda v: np.nan),
      avg_bits=("avg_bits", "mean"),
      avg_bits_per_mac=("avg_bits_per_mac", "mean")).reset_index()


def _verify(entry, variables, calib, task, results: pd.DataFrame, config) -> Any:
  """qwix vs simulation on a few calibration examples, layer by layer, at the lowest budget's
  oracle-or-first allocation (:func:`safer_jax.budgeting.deploy.verify`); None when it cannot
  run."""
  if not config.full_range:  # (qwix deploys the full grid only)
    return None
  low = results[results.budget_avg_bits == results.budget_avg_bits.min()]
  row = low.iloc[0]
  bits = json.loads(row["bits"])
  inputs = task.model_inputs(calib.batch(0, min(8, len(calib))))
  args = (inputs,) if not isinstance(inputs, tasks.Call) else inputs.args
  kwargs = {} if not isinstance(inputs, tasks.Call) else inputs.kwargs
  return deploy.verify(entry.model, variables, bits, *args, group_size=config.group_size,
                       **kwargs)


def _summary(results: pd.DataFrame, base: dict, entry, seconds: dict, config,
             searches: list | None = None, interactions: pd.DataFrame | None = None,
             score: Score | None = None, kept: list | None = None, ties: list | None = None,
             check: Any = None) -> str:
  score = score or Score("accuracy", "eval accuracy (%)", True, 100.0)
  classifier = score.column == "accuracy"
  pct = "%" if classifier else ""
  full_range = config.full_range
  unit = ("average bits per weight" if config.budget_unit == "bits" else
          f"average weight bits per multiply-accumulate: BOPs at {config.act_bits}-bit "
          f"activations / ({config.act_bits} x MACs)")
  mean = _mean_by_source(results, score)
  pivot = mean.pivot(index="source", columns="budget_avg_bits", values="accuracy")
  order = list(dict.fromkeys(results["source"]))
  pivot = pivot.reindex(order)
  budgets = list(pivot.columns)
  n_random = int((results.source == 'random').sum() / max(len(budgets), 1))
  if classifier:
    head = (f"Float accuracy {100 * base['accuracy']:.2f}%. Eval accuracy (%) of the "
            f"mixed-precision model at each budget ({unit}); random: mean of "
            f"{n_random} seeds. Best per budget in bold.")
  else:
    head = (f"Float {score.column} {score.fmt(base[score.column])} (loss {base['loss']:.4f}, "
            f"task {entry.task.name}). {score.label[0].upper() + score.label[1:]} of the "
            f"mixed-precision model at each budget ({unit}); random: mean of {n_random} seeds. "
            f"Best (lowest) per budget in bold.")
  lines = [f"# quant_sweep: {entry.name} on {entry.dataset.name}", "", head, "",
           "| source | " + " | ".join(f"{b:g} bits" for b in budgets) + " | cost time (s) |",
           "|---|" + "---|" * (len(budgets) + 1)]
  best = pivot.max(axis=0) if score.higher_is_better else pivot.min(axis=0)
  for source, row in pivot.iterrows():
    cells = [(f"**{score.fmt(v)}**" if np.isclose(v, best[b]) else score.fmt(v))
             for b, v in row.items()]
    lines.append(f"| {source} | " + " | ".join(cells) + f" | {seconds.get(source, 0.0):.1f} |")
  criteria_rows = pivot.drop(index=[s for s in ("oracle", "uniform", "random", "searched")
                                    if s in pivot.index])
  lines.append("")
  for b in budgets:
    parts = []
    if "oracle" in pivot.index:
      parts.append(f"oracle {score.fmt(pivot.loc['oracle', b])}{pct}")
    if len(criteria_rows):
      top = criteria_rows[b].idxmax() if score.higher_is_better else criteria_rows[b].idxmin()
      parts.append(f"best criterion ({top}) {score.fmt(criteria_rows.loc[top, b])}{pct}")
    parts.append(f"uniform {score.fmt(pivot.loc['uniform', b])}{pct}")
    if "searched" in pivot.index:
      parts.append(f"searched {score.fmt(pivot.loc['searched', b])}{pct}")
    lines.append(f"- At {b:g} bits average: " + ", ".join(parts) + ".")
  grid = ("qwix's full signed grid (codes -2^(b-1)..2^(b-1)-1)" if full_range else
          "the restricted grid (codes -(2^(b-1)-1)..2^(b-1)-1)")
  scales = ("per output channel" if config.group_size is None else
            f"per output channel and group of {config.group_size} input rows on Dense kernels")
  acts = (f" Activations: every layer's input at {config.act_bits} bits (per tensor, static "
          f"ranges from the calibration images). No qwix column: qwix's QtProvider refuses a "
          f"convolution whose input and weight types differ (int{config.act_bits} inputs, "
          f"int2..int8 weights); `qwix_rules.json` holds the weight rules."
          if config.quantize_acts else " Activations in float.")
  lines += ["", f"Simulated quantization: {grid}, {scales}.{acts}"]
  if kept:
    lines += ["", f"Kept in float (embedding lookups, which qwix does not quantize): "
              f"{', '.join(f'`{n}`' for n in kept)}."]
  if ties:
    lines += ["", "Tied to one bit width (query/key/value of each attention): " + "; ".join(
        "(" + ", ".join(f"`{n}`" for n in g) + ")" for g in ties) + "."]
  if searches:
    lines += ["", common.search_summary(results, searches, config.search.examples, "budget_avg_bits",
                                 "bits", metric=score.column)]
  if interactions is not None and len(interactions):
    lines += ["", common.interaction_summary(interactions, f"{config.interaction.bits} bits")]
  qcol = f"qwix_{score.column}"
  if qcol in results and results[qcol].notna().any():
    qwix_pivot = mean.pivot(index="source", columns="budget_avg_bits",
                            values="qwix_accuracy").reindex(order)
    if classifier:
      n = base["num_examples"]
      gap = float(np.nanmax(np.abs(results["qwix_accuracy"] - results["accuracy"]))) * n
      what = (f"eval accuracy (%); largest gap to the simulated model: {gap:.0f} of {n} "
              "eval images.")
    else:
      gap = float(np.nanmax(np.abs(results[qcol] - results[score.column])))
      what = f"{score.label}; largest gap to the simulated model: {gap:.4f}."
    lines += ["", "Deployed through qwix (`qwix.QtProvider`, the rules in `qwix_rules.json`), "
              + what, "",
              "| source | " + " | ".join(f"{b:g} bits" for b in budgets) + " |",
              "|---|" + "---|" * len(budgets)]
    for source, row in qwix_pivot.iterrows():
      lines.append(f"| {source} | " + " | ".join(score.fmt(v) for v in row) + " |")
  if check is not None:
    lines += ["", "qwix vs simulation, layer by layer (`deploy.verify`, "
              f"{results.budget_avg_bits.min():g}-bit allocation of `{results.iloc[0]['source']}`):",
              "", "```", str(check).rstrip(), "```"]
  return "\n".join(lines) + "\n"


def plot_accuracy(results: pd.DataFrame, base: dict, entry, path: str, score: Score | None = None) -> str:
  """Each source's score as its difference to float32 (symlog y: 0.3 points and 25 both read).

  Sources with equal scores (criteria often agree) share their segments in dashes of their
  colours (:func:`safer_jax.report.plots.draw_curves`).
  """
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  score = score or Score("accuracy", "eval accuracy (%)", True, 100.0)
  mean = _mean_by_source(results, score)
  x = "avg_bits_per_mac" if results["budget_unit"].iloc[0] == "bops" else "avg_bits"
  sources = list(dict.fromkeys(results["source"]))
  styles = plots.source_styles(sources + ["float32"])
  # worse than float32 is positive: a drop of accuracy, a rise of perplexity or loss
  sign = 1.0 if score.higher_is_better else -1.0
  fig, ax = plt.subplots(figsize=(7.5, 4.8), layout="constrained")
  curves, errors = {}, {}
  for source in sources:
    sub = mean[mean.source == source].sort_values(x)
    curves[source] = (sub[x], sign * score.scale * (base[score.column] - sub["accuracy"]))
    errors[source] = score.scale * sub["accuracy_std"].fillna(0)
  plots.draw_curves(ax, curves, styles, errors)
  drops = [v for _, ys in curves.values() for v in ys]
  plots.drop_axis(ax, drops, f"{'drop' if score.higher_is_better else 'rise'} in "
                  f"{score.label} vs float32 (symlog)",
                  reference=(styles["float32"]["color"],
                             f"float32 ({score.fmt(base[score.column])})"))
  ax.set_xlabel("average bits per weight (parameter-weighted)" if x == "avg_bits" else
                "average weight bits per MAC (BOPs / (activation bits x MACs))")
  ax.set_title(f"{entry.name} on {entry.dataset.name}: mixed precision under a "
               f"{'size' if x == 'avg_bits' else 'BOPs'} budget", fontsize=10)
  ax.grid(alpha=0.3)
  fig.legend(*ax.get_legend_handles_labels(), loc="outside right center", fontsize=8)
  return io.save_figure(path, fig)
