"""Per-layer pruning ratios under a global sparsity budget: does a sensitivity ranking help?

For each global sparsity target and each source of per-layer ratios, prune
every layer's kernel by unstructured magnitude pruning
(:func:`safer_jax.core.perturb.prune`) at its ratio and measure eval accuracy and
loss, without fine-tuning. Sources:

* ``uniform`` — the same ratio everywhere; ``erk`` — Erdős–Rényi-Kernel
  (RigL); ``global_magnitude`` — one magnitude threshold over all layers.
* cost-guided (exact min-cost allocation over candidate ratios,
  :func:`safer_jax.budgeting.budget.allocate_ratios`), with cost tables
  ``layer -> {ratio -> cost}`` (:func:`safer_jax.budgeting.pruning.cost_tables`):

  - ``oracle`` — measured loss increase of pruning that layer alone at that
    ratio (sensitivity sweep, ``prune`` family) on calibration images;
  - ``magnitude`` — data-free Σ w² over the weights that ratio removes;
  - ``fisher`` — Σ F_ii w_i² over the removed weights, F the diagonal
    empirical Fisher (:func:`safer_jax.criteria.fisher_diagonal`).

  Each allocation is one :meth:`safer_jax.Planner.allocate` call (one planner:
  each cost table once).

* ``searched`` — whole allocations measured, not per-layer costs added: a
  batched local search (:mod:`safer_jax.budgeting.search`) from every source's ratios,
  scored by loss on ``search.examples`` training images; with BatchNorm,
  ``searched_bn`` scores each candidate after re-estimating its BatchNorm
  statistics (what the ``_bn`` columns report).

Costs are computed on calibration data from the *training* split, never on
the eval split. With ``bn_recalibration`` (default), every pruned model is also
evaluated after re-estimating its BatchNorm statistics on those calibration
images (no weight is trained): columns ``accuracy_bn`` / ``loss_bn``. Writes ``results.csv`` (one row per source x target, with the
per-layer ratios), ``costs.json``, ``search.json``, ``interactions.csv`` /
``interactions.png`` (joint vs additive loss of layer pairs), ``summary.md`` and
``accuracy_vs_sparsity.png``.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import ml_collections
import numpy as np
import pandas as pd

from experiments import common
from safer_jax.budgeting import budget, pruning, search
from safer_jax.budgeting import plan as plan_lib
from safer_jax.core import io, layers, perturb
from safer_jax.core.errors import ConfigError
from safer_jax.report import plots
from safer_jax.training import train

FIXED_SOURCES = pruning.FIXED_SOURCES
COST_SOURCES = pruning.COST_SOURCES


def get_config(tiny: bool = False):
  config = common.base_config()
  config.targets = (0.5, 0.7, 0.8, 0.9, 0.95)
  # 0.98 / 0.99 make 0.95 reachable for the cost-guided allocation: with 0.95 as the largest
  # candidate, the per-layer flooring of the pruned count leaves a 0.95 target out of reach.
  config.candidates = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)
  config.sources = FIXED_SOURCES + COST_SOURCES
  config.calib_examples = 256
  config.calib_batch_size = 128
  config.bn_recalibration = True
  config.finetune_steps = 0  # > 0: also report accuracy after a short fine-tune, masks fixed
  config.finetune_lr = 1e-3
  # Interaction-aware search (source 'searched'): `evals` whole-model evaluations per target,
  # from every source's ratios, selected by loss on `examples` training images (never the
  # eval split), `batch` candidates per batched evaluation; the candidate ratios plus every
  # source's ratios at that target are the options. evals=0: off.
  config.search = common.search_config(tiny)
  # The interaction figure: every layer pruned alone and the `top` most sensitive ones in
  # pairs, at pruning ratio `ratio` (None: no figure).
  config.interaction = ml_collections.ConfigDict({"ratio": 0.9, "top": 6})
  if tiny:
    config.model = "mlp"
    config.targets = (0.5, 0.9)
    config.calib_examples = 128
  return config


def validate(config, check: common.Checker) -> None:
  """Targets, candidate ratios, sources and fine-tuning (see :func:`common.validate_config`)."""
  check.rule("targets", common.sequence(common.number(0, 1, note="global sparsity")))
  check.rule("candidates", common.sequence(common.number(0, 1, note="pruning ratio"),
                                           unique=True))
  check.rule("sources", common.sequence(common.choice(FIXED_SOURCES + COST_SOURCES),
                                        unique=True))
  if not set(config.sources) & set(FIXED_SOURCES):  # then no source could give some targets
    top = max(config.candidates)
    check.require(all(t <= top for t in config.targets), "targets",
                  f"targets <= the largest candidate ratio ({top:g}) when every source is "
                  f"cost-guided (add uniform, erk or global_magnitude to sources, or larger "
                  f"candidates)")
  check.rule("bn_recalibration", common.boolean())
  check.rule("finetune_steps", common.integer(0, note="0: no fine-tuning"))
  check.rule("finetune_lr", common.number(0, lo_open=True))
  common.validate_search(check, "interaction.ratio", common.optional(common.number(
      0, 1, lo_open=True, note="pruning ratio of the interaction figure; None: off")))


def run(config, workdir: str) -> dict:
  entry = common.pretrained(config)
  variables, split = entry.variables, entry.dataset.eval
  names = layers.find_layers(variables)
  sizes = {n: int(layers.get_kernel(variables, n).size) for n in names}
  candidates = tuple(float(r) for r in config.candidates)
  planner = plan_lib.Planner(
      entry.model, variables, entry.dataset.train, calib_examples=config.calib_examples,
      search_examples=config.search.examples, batch_size=config.calib_batch_size,
      seed=config.seed, search_batch=config.search.batch, progress=config.progress)
  budgets = {float(t): plan_lib.RatioBudget(float(t), candidates) for t in config.targets}
  cost_sources = [s for s in config.sources if s in COST_SOURCES]
  print(f"cost tables from {len(planner.calib)} calibration images: {cost_sources}", flush=True)
  tables = planner.cost_tables(next(iter(budgets.values())), config.sources)
  seconds = dict(planner.seconds)
  base = train.evaluate(entry.model.apply, variables, split)
  bn = bool(config.bn_recalibration) and "batch_stats" in variables
  plans = {}  # (source, target) -> Plan
  for target, ratio_budget in budgets.items():
    for source in config.sources:
      try:
        plans[source, target] = planner.allocate(ratio_budget, source=source)
      except ValueError as e:  # e.g. an unreachable target for the candidate ratios
        print(f"  {source} at {target}: {e}", flush=True)
  # Searches from every source's ratios; with BatchNorm a second one scored after
  # re-estimating its statistics, as the _bn columns are.
  searches_by = ({"searched": False, **({"searched_bn": True} if bn else {})}
                 if config.search.evals > 0 and plans else {})
  seconds.update({label: 0.0 for label in searches_by})

  def measure(source: str, target: float, plan: plan_lib.Plan) -> dict:
    """The row of one allocation: held-out accuracy and loss (BN re-estimated, fine-tuned)."""
    pruned = plan.apply(variables)
    m = train.evaluate(entry.model.apply, pruned, split)
    row = {"source": source, "target": target,
           "achieved_sparsity": budget.global_sparsity(plan.values, sizes),
           "accuracy": m["accuracy"], "loss": m["loss"],
           "accuracy_drop": base["accuracy"] - m["accuracy"]}
    if bn:
      recalibrated = train.recalibrate_bn(entry.model, pruned, planner.calib.images)
      mb = train.evaluate(entry.model.apply, recalibrated, split)
      row.update(accuracy_bn=mb["accuracy"], loss_bn=mb["loss"])
    if config.finetune_steps > 0:
      masks = {n: np.asarray(layers.get_kernel(pruned, n)) != 0 for n in names}
      tuned = train.finetune(entry.model, pruned, entry.dataset.train,
                             int(config.finetune_steps), masks=masks,
                             learning_rate=float(config.finetune_lr), seed=config.seed)
      mf = train.evaluate(entry.model.apply, tuned, split)
      row.update(accuracy_ft=mf["accuracy"], loss_ft=mf["loss"])
    return {**row, "ratios": json.dumps(plan.values)}

  rows, searches = [], []
  for target, ratio_budget in budgets.items():
    reached = [s for s in config.sources if (s, target) in plans]
    rows += [measure(s, target, plans[s, target]) for s in reached]
    for label, recalibrate in (searches_by.items() if reached else ()):
      try:
        plan = planner.allocate(ratio_budget, source=reached, search=config.search.evals,
                                recalibrate_bn=recalibrate)
      except ValueError as e:  # every source's ratios over the budget (per-layer flooring)
        print(f"  {label} at {target}: {e}", flush=True)
        continue
      r = plan.search
      seconds[label] += r["seconds"]
      searches.append({"source": label, "target": target, **common.search_record(r),
                       "skipped_starts": r["skipped_starts"]})
      rows.append({**measure(label, target, plan),
                   "search_evals": r["evaluations"], "search_seconds": r["seconds"]})
    print(f"  sparsity {target:.2f}: " + ", ".join(
        f"{r['source']} {100 * r['accuracy']:.1f}%"
        + (f" (bn {100 * r['accuracy_bn']:.1f}%)" if bn else "")
        for r in rows if r["target"] == target), flush=True)
  interactions = None
  if config.interaction.ratio:
    interactions = search.interactions(
        entry.model, variables, planner.search_split,
        {n: perturb.prune(jnp.asarray(w), float(config.interaction.ratio))
         for n, w in planner.kernels.items()}, top=min(config.interaction.top, len(names)))
  if not rows:
    raise ConfigError(f"--config.targets={tuple(config.targets)}: no source reached any target "
                      f"with the candidate ratios {candidates}; add a fixed source (uniform, "
                      f"erk, global_magnitude) or larger candidates.")
  results = pd.DataFrame(rows)
  summary = _summary(results, base, entry, seconds)
  for label in dict.fromkeys(s["source"] for s in searches):
    bn_search = label == "searched_bn"
    summary += "\n" + common.search_summary(
        results, searches, config.search.examples, "target", "sparsity", source=label,
        metric="accuracy_bn" if bn_search else "accuracy",
        scored=" after re-estimating BatchNorm on the calibration images" if bn_search
        else "") + "\n"
  if interactions is not None and len(interactions):
    summary += "\n" + common.interaction_summary(
        interactions, f"pruning ratio {config.interaction.ratio:g}") + "\n"
  costs = {"tables": {s: {n: {str(r): c for r, c in t.items()} for n, t in tab.items()}
                      for s, tab in tables.items()},
           "seconds": seconds, "sizes": sizes, "baseline": base, "model": entry.name}
  paths = common.write_allocation_files(
      workdir, results, costs, summary, lambda path: plot_accuracy(results, base, entry, path),
      "accuracy_vs_sparsity.png",
      {"search_examples": config.search.examples, "objective": "loss", "targets": searches},
      interactions, f"{entry.name}: joint vs additive loss increase, layers pruned at "
      f"{config.interaction.ratio or 0:g} ({config.search.examples} training images)")
  print(summary)
  return {"paths": paths, "results": results}


def _table(results: pd.DataFrame, column: str, seconds: dict) -> list[str]:
  pivot = results.pivot(index="source", columns="target", values=column)
  pivot = pivot.reindex(list(dict.fromkeys(results["source"])))
  targets = list(pivot.columns)
  lines = ["| source | " + " | ".join(f"{t:g}" for t in targets) + " | cost time (s) |",
           "|---|" + "---|" * (len(targets) + 1)]
  best = pivot.max(axis=0)
  for source, row in pivot.iterrows():
    cells = ["-" if np.isnan(v) else (f"**{100 * v:.2f}**" if np.isclose(v, best[t])
                                       else f"{100 * v:.2f}") for t, v in row.items()]
    lines.append(f"| {source} | " + " | ".join(cells) + f" | {seconds.get(source, 0.0):.1f} |")
  lines.append("")
  for t in targets:
    col = pivot[t].dropna()
    if len(col) and not np.isclose(col.max(), col.min()):
      lines.append(f"- At sparsity {t:g}: best {col.idxmax()} {100 * col.max():.2f}%"
                   + (f", uniform {100 * col['uniform']:.2f}%." if "uniform" in col else "."))
    elif len(col):
      lines.append(f"- At sparsity {t:g}: all sources tie at {100 * col.max():.2f}%.")
  return lines


def _summary(results: pd.DataFrame, base: dict, entry, seconds: dict) -> str:
  lines = [f"# prune_sweep: {entry.name} on {entry.dataset.name}", "",
           f"Dense accuracy {100 * base['accuracy']:.2f}%. Eval accuracy (%) after one-shot "
           f"unstructured magnitude pruning at each global sparsity target (columns), no "
           f"fine-tuning. Best per target in bold; '-' = target unreachable for that source.", ""]
  lines += _table(results, "accuracy", seconds)
  if "accuracy_bn" in results:
    lines += ["", "## With BatchNorm statistics re-estimated on the calibration images", ""]
    lines += _table(results, "accuracy_bn", seconds)
  if "accuracy_ft" in results:
    lines += ["", "## After a short fine-tune with the pruning masks fixed", ""]
    lines += _table(results, "accuracy_ft", seconds)
  lines.append("")
  dev = (results["achieved_sparsity"] - results["target"]).groupby(results["source"],
                                                                   sort=False).agg(["min", "max"])
  lines.append("Achieved minus target sparsity (min / max over targets): " + "; ".join(
      f"{s} {r['min']:+.1e} / {r['max']:+.1e}" for s, r in dev.iterrows()) + ".")
  return "\n".join(lines) + "\n"


def plot_accuracy(results: pd.DataFrame, base: dict, entry, path: str) -> str:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  panels = [("accuracy", "no fine-tuning")]
  if "accuracy_bn" in results:
    panels.append(("accuracy_bn", "BatchNorm re-estimated"))
  if "accuracy_ft" in results:
    panels.append(("accuracy_ft", "short fine-tune, masks fixed"))
  fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels) + 1.5, 4.5), squeeze=False,
                           sharey=True, layout="constrained")
  sources = list(dict.fromkeys(results["source"]))
  styles = plots.source_styles(sources + ["dense"])
  drops = 100 * (base["accuracy"] - results[[c for c, _ in panels]].to_numpy().ravel())
  for ax, (column, title) in zip(axes[0], panels):
    curves = {}
    for source in sources:
      sub = results[results.source == source].sort_values("achieved_sparsity")
      curves[source] = (sub["achieved_sparsity"], 100 * (base["accuracy"] - sub[column]))
    plots.draw_curves(ax, curves, styles)
    # accuracy drop vs the dense model, symlog: the small differences of mild sparsity and the
    # large ones of high sparsity both read
    plots.drop_axis(ax, drops, "", reference=(styles["dense"]["color"],
                                              f"dense ({100 * base['accuracy']:.2f}%)"))
    ax.set_xlabel("global sparsity (fraction of kernel weights removed)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("drop in eval accuracy (%) vs dense (symlog)")
  fig.legend(*axes[0][-1].get_legend_handles_labels(), loc="outside right center", fontsize=8)
  fig.suptitle(f"{entry.name} on {entry.dataset.name}: pruning ratios under a sparsity budget")
  return io.save_figure(path, fig)
