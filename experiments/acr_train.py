"""Adversarial corruption-resistant (ACR) training vs plain training, same steps and seeds.

For each seed, trains the model twice with the same recipe (init, data order,
optimizer, number of steps): plain (:func:`safer_jax.training.train.train`) and ACR
(:func:`safer_jax.training.acr.train_acr`, options under ``config.acr``). Each trained
model is evaluated on the eval split:

* ``clean``: no perturbation.
* ``corrupt``: white-box gradient corruption of every kernel, one ball per
  layer, ``||a||_p = eps ||W||_p`` for each ``eps`` in ``eval_eps``
  (closed form + ``eval_steps`` of projected ascent on the eval loss).
* ``bitflip``: int8 per-channel quantization with random bit flips
  (:func:`safer_jax.core.perturb.bitflip`) at each rate, mean over ``bitflip_trials``.
* ``quantize``: every kernel quantized to ``quant_bits`` bits (per channel).

Writes ``results.csv`` (one row per seed x method x condition), ``summary.md``
(mean +- std over seeds) and ``robustness.png``.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections
import numpy as np
import pandas as pd

from experiments import common
from safer_jax.core import io, layers, norms, perturb
from safer_jax.report import plots
from safer_jax.training import acr, train
from safer_jax.zoo import models


def get_config(tiny: bool = False):
  config = common.base_config(model="lenet")
  config.seeds = (0, 1, 2)
  config.epochs = 20
  config.batch_size = 64
  config.learning_rate = 3e-3
  config.acr = ml_collections.ConfigDict({
      "eps": 0.05, "p": "2", "steps": 1, "step_size": 0.25, "mix": 0.5, "scope": "layer",
      "warmup_epochs": 2, "n_sparse": 0})
  config.eval_eps = (0.01, 0.02, 0.05, 0.1)
  config.eval_p = "2"
  config.eval_steps = 5
  config.bitflip_rates = (1e-3, 3e-3, 1e-2)
  config.bitflip_trials = 5
  config.quant_bits = (4, 3)
  if tiny:
    config.model = "mlp"
    config.seeds = (0,)
    config.epochs = 2
    config.acr.warmup_epochs = 1
    config.eval_eps = (0.05,)
    config.eval_steps = 0
    config.bitflip_rates = (1e-2,)
    config.bitflip_trials = 1
  return config


def validate(config, check: common.Checker) -> None:
  """Seeds, training, ACR options, robustness conditions (see :func:`common.validate_config`)."""
  check.rule("seeds", common.SEEDS)
  check.rule("epochs", common.COUNT)
  check.rule("acr.eps", common.number(0, note="relative radius"))
  check.rule("acr.p", common.choice(norms.ALLOWED_P))
  check.rule("acr.steps", common.integer(0))
  check.rule("acr.step_size", common.number(0))
  check.rule("acr.mix", common.number(0, 1))
  check.rule("acr.scope", common.choice(acr.SCOPES))
  check.rule("acr.warmup_epochs", common.integer(0))
  check.rule("acr.n_sparse", common.integer(0, note="0: dense"))
  check.rule("eval_eps", common.sequence(common.number(0), nonempty=False))
  check.rule("eval_p", common.choice(norms.ALLOWED_P))
  check.rule("eval_steps", common.integer(0))
  check.rule("bitflip_rates", common.sequence(common.number(0, 1), nonempty=False))
  check.rule("bitflip_trials", common.COUNT)
  check.rule("quant_bits", common.sequence(common.integer(1, 16), nonempty=False))


def acr_config(config) -> acr.ACRConfig:
  c = config.acr
  return acr.ACRConfig(eps=float(c.eps), p=c.p, steps=int(c.steps), step_size=float(c.step_size),
                       mix=float(c.mix), scope=c.scope, warmup_epochs=int(c.warmup_epochs),
                       n_sparse=int(c.n_sparse) or None)


def _attack(model, names, eval_p, steps):
  """Jitted ``f(variables, images, labels, eps) -> corrupted variables`` (eps traced)."""

  @jax.jit
  def f(variables, images, labels, eps):
    loss_fn = train.task_loss_fn(model, variables)
    params = variables["params"]
    batch = {"image": images, "label": labels}
    kernels = layers.get_kernels(params, names)
    res = acr.adversarial_corruption(lambda a: loss_fn(acr.add_corruption(params, a), batch),
                                     kernels, eps=eps, p=eval_p, steps=steps, scope="layer")
    return {**variables, "params": acr.add_corruption(params, res.corruption)}

  return f


def robustness(model, variables, split, names, config, seed: int, attack=None) -> list[dict]:
  """Rows ``{condition, magnitude, accuracy, loss}`` of one trained model on ``split``."""
  ev = lambda v: train.evaluate(model.apply, v, split)  # noqa: E731
  rows = [{"condition": "clean", "magnitude": 0.0, **ev(variables)}]
  attack = attack or _attack(model, names, config.eval_p, int(config.eval_steps))
  for eps in config.eval_eps:
    m = ev(attack(variables, split.images, split.labels, np.float32(eps)))
    rows.append({"condition": "corrupt", "magnitude": float(eps), **m})
  for rate in config.bitflip_rates:
    ms = [ev(perturb.perturb_params(variables, names, "bitflip", float(rate),
                                    jax.random.key(1000 * seed + t)))
          for t in range(int(config.bitflip_trials))]
    rows.append({"condition": "bitflip", "magnitude": float(rate),
                 "accuracy": float(np.mean([m["accuracy"] for m in ms])),
                 "loss": float(np.mean([m["loss"] for m in ms])), "num_examples": len(split)})
  for bits in config.quant_bits:
    m = ev(perturb.perturb_params(variables, names, "quantize", int(bits), None))
    rows.append({"condition": "quantize", "magnitude": float(bits), **m})
  return rows


def run(config, workdir: str) -> dict:
  ds = common.load_dataset(config)
  model = models.get_model(config.model, num_classes=ds.num_classes)
  acr_cfg = acr_config(config)
  rows, attack = [], None
  for seed in config.seeds:
    tc = train.TrainConfig(epochs=int(config.epochs), batch_size=int(config.batch_size),
                           learning_rate=float(config.learning_rate), seed=int(seed))
    trained = {"plain": train.train(model, ds, tc, progress=config.progress),
               "acr": acr.train_acr(model, ds, tc, acr_cfg, progress=config.progress)}
    for method, (variables, history) in trained.items():
      names = layers.find_layers(variables)
      if attack is None:
        attack = _attack(model, names, config.eval_p, int(config.eval_steps))
      for r in robustness(model, variables, ds.eval, names, config, int(seed), attack):
        rows.append({"method": method, "seed": int(seed), **r,
                     "train_seconds": history["train_seconds"]})
    clean = {r["method"]: r["accuracy"] for r in rows
             if r["seed"] == int(seed) and r["condition"] == "clean"}
    print(f"  seed {seed}: clean accuracy plain {100 * clean['plain']:.2f}%, "
          f"acr {100 * clean['acr']:.2f}%", flush=True)
  results = pd.DataFrame(rows)
  summary = _summary(results, config, acr_cfg, ds)
  paths = {"results": io.write_csv(os.path.join(workdir, "results.csv"), results),
           "summary": io.write_text(os.path.join(workdir, "summary.md"), summary),
           "meta": io.write_json(os.path.join(workdir, "meta.json"),
                                 {"config": config.to_dict(),
                                  "acr": dataclasses.asdict(acr_cfg),
                                  "versions": io.versions()}),
           "plot": _plot(results, config, os.path.join(workdir, "robustness.png"))}
  print(summary)
  return {"paths": paths, "results": results}


def _label(condition: str, magnitude: float, config) -> str:
  if condition == "clean":
    return "clean"
  if condition == "corrupt":
    return f"grad corrupt p={config.eval_p} eps={magnitude:g}"
  if condition == "bitflip":
    return f"bitflip int8 rate={magnitude:g}"
  return f"quantize {int(magnitude)} bits"


def _table(results: pd.DataFrame) -> pd.DataFrame:
  g = results.groupby(["condition", "magnitude", "method"], sort=False)["accuracy"]
  return g.agg(["mean", "std", "count"]).reset_index()


def _summary(results, config, acr_cfg, ds) -> str:
  table = _table(results)
  n = len(config.seeds)
  lines = [f"# acr_train: {config.model} on {ds.name}", "",
           f"{n} seed(s) {tuple(config.seeds)}, {config.epochs} epochs each, same steps, init "
           f"and data order for both. ACR: eps={acr_cfg.eps} (relative, {acr_cfg.scope}), "
           f"p={acr_cfg.p}, K={acr_cfg.steps}, mix={acr_cfg.mix}, warm-up "
           f"{acr_cfg.warmup_epochs} epochs. Eval accuracy (%) mean ± std over seeds; "
           f"gradient corruption: white-box, every kernel, {config.eval_steps} ascent steps; "
           f"bit flips: mean of {config.bitflip_trials} draws per seed.", "",
           "| condition | plain | ACR | ACR − plain |", "|---|---|---|---|"]
  keys = list(dict.fromkeys(zip(table.condition, table.magnitude)))
  wins = 0
  for cond, mag in keys:
    sub = table[(table.condition == cond) & (table.magnitude == mag)].set_index("method")
    cell = {m: f"{100 * sub.loc[m, 'mean']:.2f} ± {100 * np.nan_to_num(sub.loc[m, 'std']):.2f}"
            for m in ("plain", "acr")}
    diff = 100 * (sub.loc["acr", "mean"] - sub.loc["plain", "mean"])
    wins += diff > 0
    lines.append(f"| {_label(cond, mag, config)} | {cell['plain']} | {cell['acr']} | "
                 f"{diff:+.2f} |")
  lines += ["", f"ACR is better than plain training in {wins}/{len(keys)} conditions. "
            "See `robustness.png`."]
  return "\n".join(lines) + "\n"


def _plot(results, config, path) -> str:
  table = _table(results)
  keys = list(dict.fromkeys(zip(table.condition, table.magnitude)))
  series = []
  for method, color in plots.source_colors(["plain", "acr"]).items():
    sub = table[table.method == method].set_index(["condition", "magnitude"]).loc[keys]
    series.append((method, color, 100 * sub["mean"], 100 * sub["std"].fillna(0)))
  return plots.grouped_bars(
      path, [_label(c, m, config) for c, m in keys], series, ylabel="eval accuracy (%)",
      title=f"{config.model}: ACR vs plain training ({len(config.seeds)} seed(s))", width=0.38)
