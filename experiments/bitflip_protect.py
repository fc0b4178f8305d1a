"""Which layers to protect against random bit flips, under a parameter budget?

A protection rule scores the layers; the protected set is built greedily
(:func:`safer_jax.budgeting.protection.select_protected`): layers in descending score, each
taken if it still fits in ``budget_fraction`` of all kernel weights (a layer that does not fit
is skipped and the next one tried). Random bit flips
(:func:`safer_jax.core.perturb.bitflip`, ``representation`` default ``'int8'``)
are then injected into every *unprotected* kernel; protected kernels keep the
fault-free stored representation bit for bit (for ``'int8'``: the per-channel
int8 model, i.e. ``bitflip`` at rate 0; for ``'float32'``: the original
weights). Eval accuracy and loss are averaged over ``num_seeds`` fault
patterns per rate, vectorised over seeds with ``jax.vmap`` (the same fault
keys for every rule: common random numbers).

Rules (``config.rules``):

* ``oracle`` — ground-truth importance of the ``bitflip`` family: area under
  the per-layer ``oracle_metric`` curve over the rates of a small sensitivity
  sweep (each layer flipped alone) on calibration images from the *training*
  split;
* any criterion name of :data:`safer_jax.criteria.CRITERIA` (e.g. ``fisher``,
  ``grad_norm``), computed on the same calibration images;
* ``<rule>_per_param`` — that score divided by the layer's kernel size
  (protection value per protected weight);
* ``random`` — a random layer order (one per ``random_seeds``);
* ``none`` — nothing protected.

Writes ``results.csv`` (rule x budget x rate, with the protected layers and
per-seed accuracies), ``scores.json``, ``summary.md`` and ``accuracy_vs_rate.png``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence

import jax
import numpy as np
import pandas as pd

from experiments import common
from safer_jax import criteria
from safer_jax.budgeting import protection
from safer_jax.core import data, io, layers, perturb
from safer_jax.measure import sweep
from safer_jax.report import plots
from safer_jax.training import train

PER_PARAM = "_per_param"


def get_config(tiny: bool = False):
  config = common.base_config()
  config.budget_fractions = (0.1, 0.25)
  config.rates = (1e-3, 3e-3, 1e-2, 3e-2)
  config.representation = "int8"
  config.num_seeds = 20
  config.seed_chunk = 10
  config.rules = ("oracle", "oracle_per_param", "fisher", "fisher_per_param", "grad_norm",
                  "random", "none")
  config.random_seeds = (0, 1, 2)
  config.oracle_seeds = (0, 1, 2)
  config.oracle_metric = "loss_increase"  # or "accuracy_drop" (coarse on few images)
  config.calib_examples = 256
  config.calib_batch_size = 128
  if tiny:
    config.model = "mlp"
    config.budget_fractions = (0.25,)
    config.rates = (1e-2, 3e-2)
    config.num_seeds = 4
    config.seed_chunk = 4
    # no oracle here: its sweep compiles per layer (~10 s); the full config runs it.
    config.rules = ("fisher_per_param", "grad_norm", "random", "none")
    config.random_seeds = (0,)
    config.oracle_seeds = (0,)
    config.calib_examples = 128
  return config


def validate(config, check: common.Checker) -> None:
  """Budgets, rates, seeds and rules (see :func:`common.validate_config`)."""
  check.rule("budget_fractions", common.sequence(common.number(0, 1)))
  check.rule("rates", common.sequence(common.number(0, 1, note="per-bit flip rate")))
  check.rule("representation", common.choice(("int8", "float32", "bfloat16")))
  check.rule("num_seeds", common.COUNT)
  check.rule("seed_chunk", common.COUNT)
  bases = ["oracle", "random", "none", *sorted(criteria.CRITERIA)]
  names = bases + [b + PER_PARAM for b in bases if b not in ("random", "none")]
  check.rule("rules", common.sequence(common.choice(names), unique=True))
  check.rule("random_seeds", common.sequence(common.SEED, nonempty=False, unique=True))
  check.require(bool(config.random_seeds) or "random" not in config.rules, "random_seeds",
                "a non-empty tuple of integers >= 0 (the 'random' rule needs one seed per "
                "ordering; or drop it from rules)")
  check.rule("oracle_seeds", common.sequence(common.SEED, nonempty=False, unique=True))
  oracle = any(r.startswith("oracle") for r in config.rules)
  check.require(bool(config.oracle_seeds) or not oracle, "oracle_seeds",
                "a non-empty tuple of integers >= 0 (the oracle rules sweep bit flips, which "
                "need seeds; or drop them from rules)")
  check.rule("oracle_metric", common.choice(("loss_increase", "accuracy_drop")))


def rule_scores(rules: Sequence[str], entry, variables, calib, names, config) -> tuple[dict, dict]:
  """``{base score name: {layer: score}}`` for the non-random rules, and wall times (s)."""
  bases = sorted({r[:-len(PER_PARAM)] if r.endswith(PER_PARAM) else r for r in rules}
                 - {"random", "none"})
  unknown = [b for b in bases if b != "oracle" and b not in criteria.CRITERIA]
  if unknown:
    raise ValueError(f"Unknown rule(s) {unknown}; valid: oracle, random, none, "
                     f"{sorted(criteria.CRITERIA)} (each optionally with {PER_PARAM!r}).")
  scores, seconds = {}, {}
  if "oracle" in bases:
    t0 = time.perf_counter()
    table = sweep.run_sweep(entry.model, variables, calib, sweep.SweepConfig(
        families={"bitflip": tuple(float(r) for r in config.rates)},
        seeds=tuple(config.oracle_seeds),
        family_options={"bitflip": {"representation": config.representation}}),
        progress=config.progress)
    imp = sweep.importance(table, config.oracle_metric)["bitflip"]
    scores["oracle"] = {n: float(imp[n]) for n in names}
    seconds["oracle"] = time.perf_counter() - t0
  crits = [b for b in bases if b != "oracle"]
  if crits:
    batches = data.batches_from_split(calib, config.calib_batch_size,
                                 max(1, len(calib) // config.calib_batch_size))
    # Every calibration example (calib_examples): the criteria's full setting.
    out, secs = criteria.compute_all(crits, train.task_loss_fn(entry.model, variables),
                                     variables["params"], batches,
                                     key=jax.random.key(config.seed),
                                     options={c: {"setting": "full"} for c in crits
                                              if c in criteria.settings.OPTIONS})
    for c in crits:
      scores[c] = {n: float(out[c][n]) for n in names}
      seconds[c] = secs[c]
  return scores, seconds


def protection_plans(rules, scores, sizes, fractions, random_seeds) -> list[dict]:
  """One entry per (rule, random seed, budget): the protected layers."""
  names = list(sizes)
  plans = []
  for rule in rules:
    for frac in fractions:
      if rule == "none":
        plans.append({"rule": rule, "seed": -1, "budget_fraction": frac, "protected": []})
      elif rule == "random":
        for seed in random_seeds:
          u = np.random.default_rng(seed).permutation(len(names)).astype(float)
          plans.append({"rule": rule, "seed": int(seed), "budget_fraction": frac,
                        "protected": protection.select_protected(dict(zip(names, u)), sizes, frac)})
      else:
        base = rule[:-len(PER_PARAM)] if rule.endswith(PER_PARAM) else rule
        s = {n: scores[base][n] / (sizes[n] if rule.endswith(PER_PARAM) else 1) for n in names}
        plans.append({"rule": rule, "seed": -1, "budget_fraction": frac,
                      "protected": protection.select_protected(s, sizes, frac)})
  return plans


def run(config, workdir: str) -> dict:
  entry = common.pretrained(config)
  variables, split = entry.variables, entry.dataset.eval
  names = layers.find_layers(variables)
  sizes = {n: int(layers.get_kernel(variables, n).size) for n in names}
  for r in config.rates:
    perturb.validate_magnitude("bitflip", float(r))
  calib = entry.dataset.train.take(config.calib_examples)
  print(f"rule scores from {len(calib)} calibration images: {list(config.rules)}", flush=True)
  scores, seconds = rule_scores(config.rules, entry, variables, calib, names, config)
  plans = protection_plans(config.rules, scores, sizes, config.budget_fractions,
                           config.random_seeds)
  evaluate = protection.make_evaluator(entry.model, variables, names, split, config.representation,
                            config.seed_chunk)
  keys = jax.random.split(jax.random.key(config.seed), config.num_seeds)
  base = train.evaluate(entry.model.apply, variables, split)
  clean = evaluate(keys[:1], 0.0, np.zeros(len(names), bool))
  total = sum(sizes.values())
  cache, rows = {}, []
  for plan in plans:
    protect = np.array([n in plan["protected"] for n in names])
    for rate in config.rates:
      k = (tuple(protect), float(rate))
      if k not in cache:
        cache[k] = evaluate(keys, float(rate), protect)
      acc, loss = cache[k]
      rows.append({**{f: plan[f] for f in ("rule", "seed", "budget_fraction")},
                   "rate": float(rate), "accuracy": float(acc.mean()),
                   "accuracy_std": float(acc.std(ddof=1)) if acc.size > 1 else 0.0,
                   "loss": float(np.mean(loss)), "loss_std": float(np.std(loss)),
                   "num_seeds": int(acc.size),
                   "protected_fraction": sum(sizes[n] for n in plan["protected"]) / total,
                   "protected": json.dumps(plan["protected"]),
                   "accuracies": json.dumps([round(float(a), 6) for a in acc])})
    print(f"  {plan['rule']} (seed {plan['seed']}) budget {plan['budget_fraction']:g}: "
          + ", ".join(f"{r['rate']:g}: {100 * r['accuracy']:.1f}%"
                      for r in rows[-len(config.rates):]), flush=True)
  results = pd.DataFrame(rows)
  clean_acc = float(clean[0][0])
  summary = _summary(results, base, clean_acc, entry, config, seconds)
  paths = {"results": io.write_csv(os.path.join(workdir, "results.csv"), results),
           "scores": io.write_json(os.path.join(workdir, "scores.json"),
                                   {"scores": scores, "seconds": seconds, "sizes": sizes,
                                    "baseline": base, "clean_representation_accuracy": clean_acc,
                                    "model": entry.name, "versions": io.versions()}),
           "summary": io.write_text(os.path.join(workdir, "summary.md"), summary),
           "plot": _plot(results, clean_acc, entry, config,
                         os.path.join(workdir, "accuracy_vs_rate.png"))}
  print(summary)
  return {"paths": paths, "results": results}


def _pooled(results: pd.DataFrame) -> pd.DataFrame:
  """Mean and std over all fault seeds (and random orderings) per rule x budget x rate."""
  rows = []
  for (rule, frac, rate), g in results.groupby(["rule", "budget_fraction", "rate"], sort=False):
    accs = np.concatenate([json.loads(a) for a in g["accuracies"]])
    rows.append({"rule": rule, "budget_fraction": frac, "rate": rate, "accuracy": accs.mean(),
                 "accuracy_std": accs.std(ddof=1) if accs.size > 1 else 0.0,
                 "protected_fraction": g["protected_fraction"].mean()})
  return pd.DataFrame(rows)


def _summary(results, base, clean_acc, entry, config, seconds) -> str:
  pooled = _pooled(results)
  rates = list(dict.fromkeys(results["rate"]))
  lines = [f"# bitflip_protect: {entry.name} on {entry.dataset.name}", "",
           f"Float accuracy {100 * base['accuracy']:.2f}%, fault-free {config.representation} "
           f"accuracy {100 * clean_acc:.2f}%. Eval accuracy (%) mean ± std over "
           f"{config.num_seeds} fault seeds (random: pooled over {len(config.random_seeds)} "
           f"orderings) with random {config.representation} bit flips in the unprotected "
           f"kernels; best mean per rate in bold.", ""]
  for frac in dict.fromkeys(results["budget_fraction"]):
    sub = pooled[pooled.budget_fraction == frac]
    lines += [f"## Budget: {frac:g} of the kernel weights protected", "",
              "| rule | protected | " + " | ".join(f"rate {r:g}" for r in rates) + " |",
              "|---|---|" + "---|" * len(rates)]
    best = sub.groupby("rate")["accuracy"].max()
    for rule in dict.fromkeys(sub["rule"]):
      r = sub[sub.rule == rule].set_index("rate")
      cells = []
      for rate in rates:
        m, s = 100 * r.loc[rate, "accuracy"], 100 * r.loc[rate, "accuracy_std"]
        text = f"{m:.2f} ± {s:.2f}"
        cells.append(f"**{text}**" if np.isclose(r.loc[rate, "accuracy"], best[rate]) else text)
      lines.append(f"| {rule} | {100 * r['protected_fraction'].iloc[0]:.1f}% | "
                   + " | ".join(cells) + " |")
    lines.append("")
    for rule in dict.fromkeys(results["rule"]):
      if rule in ("random", "none"):
        continue
      prot = results[(results.rule == rule) & (results.budget_fraction == frac)]["protected"]
      lines.append(f"- {rule} protects: {', '.join(json.loads(prot.iloc[0])) or '(nothing)'}")
    lines.append("")
  if seconds:
    lines.append("Score time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
  return "\n".join(lines) + "\n"


def _plot(results, clean_acc, entry, config, path: str) -> str:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  pooled = _pooled(results)
  fracs = list(dict.fromkeys(results["budget_fraction"]))
  fig, axes = plt.subplots(1, len(fracs), figsize=(6 * len(fracs) + 1.5, 4.5), squeeze=False,
                           sharey=True, layout="constrained")
  rules = list(dict.fromkeys(pooled["rule"]))
  styles = plots.source_styles(rules + ["fault-free"])
  drops = 100 * (clean_acc - pooled["accuracy"])
  for ax, frac in zip(axes[0], fracs):
    sub = pooled[pooled.budget_fraction == frac]
    curves, errors = {}, {}
    for rule in dict.fromkeys(sub["rule"]):
      r = sub[sub.rule == rule].sort_values("rate")
      curves[rule] = (r["rate"], 100 * (clean_acc - r["accuracy"]))
      errors[rule] = 100 * r["accuracy_std"]
    plots.draw_curves(ax, curves, styles, errors)
    # accuracy drop vs the fault-free model, symlog: small and large drops both read
    plots.drop_axis(ax, drops, "", reference=(styles["fault-free"]["color"],
                                              f"fault-free {config.representation} "
                                              f"({100 * clean_acc:.2f}%)"))
    ax.set_xscale("log")
    ax.set_xlabel("per-bit flip rate")
    ax.set_title(f"budget {frac:g} of kernel weights")
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("drop in eval accuracy (%) vs fault-free (symlog)")
  fig.legend(*axes[0][-1].get_legend_handles_labels(), loc="outside right center", fontsize=8)
  fig.suptitle(f"{entry.name} on {entry.dataset.name}: protecting layers against bit flips")
  return io.save_figure(path, fig)
