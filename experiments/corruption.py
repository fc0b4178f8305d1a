"""Worst-case parameter corruption: is gradient corruption far worse than random at equal norm?

For each layer and the whole network (all kernels raveled into one vector,
target ``all``), each norm p in ``config.norms``, dense and ``n``-sparse, and
each relative radius eps (``||a||_p = eps * ||W||_p``), the indicator
``Delta(eps) = L(W + a) - L(W)`` on calibration batches from the *training*
split, by three methods:

* ``first_order``: the closed-form maximiser of ``<g, a>``
  (:func:`safer_jax.core.perturb.corruption_direction`); its first-order prediction
  ``eps_abs * ||g||_q`` is the ``delta_pred`` column.
* ``pga``: ``pga_steps`` of projected gradient ascent from it
  (:func:`safer_jax.criteria.corruption.pga_corruption`).
* ``random``: the best of ``num_random`` random corruptions of the same norm
  and sparsity (Gaussian direction for p=2, random signs for p=inf, random
  support for n-sparse), evaluated at once with ``jax.vmap``.

Each corruption is also applied and evaluated on the eval split (accuracy and
loss). Writes ``results.csv``, ``summary.md``, ``delta_vs_eps.png`` (log-log)
and ``layer_vulnerability.png``.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jax.flatten_util import ravel_pytree
from ml_collections import config_dict

from experiments import common
from safer_jax import criteria
from safer_jax.core import data, io, layers, norms
from safer_jax.core.norms import dual_norm, random_corruptions
from safer_jax.core.perturb import corruption_direction
from safer_jax.core.progress import Progress
from safer_jax.criteria.corruption import eps_absolute, pga_corruption
from safer_jax.report import plots
from safer_jax.training import acr, train

METHODS = ("first_order", "pga", "random")
ALL = "all"


def get_config(tiny: bool = False):
  config = common.base_config()
  config.eps = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
  config.norms = ("2", "inf")
  config.n_sparse = (0, 32)  # 0: dense.
  config.pga_steps = 10
  config.step_size = 0.25
  config.num_random = 64
  config.calib_examples = 256
  config.calib_batch_size = 128
  config.bar_eps = 1e-2
  # A regex of the layers to study (None: all); the whole network is always in.
  config.layers = config_dict.placeholder(str)
  # Train (and cache) the model for this many epochs; None: the zoo recipe.
  config.zoo_epochs = config_dict.placeholder(int)
  if tiny:
    config.model = "mlp"
    config.eps = (1e-2, 1e-1)
    config.norms = ("2",)
    config.n_sparse = (0, 8)
    config.pga_steps = 2
    config.num_random = 4
    config.calib_examples = 64
    config.calib_batch_size = 64
    config.bar_eps = 1e-1
    config.layers = "dense2/fc|head/fc"
    config.zoo_epochs = 3
  return config


def validate(config, check: common.Checker) -> None:
  """Radii, norms, sparsities, ascent and layers (see :func:`common.validate_config`)."""
  check.rule("eps", common.sequence(common.number(0, lo_open=True, note="relative radius")))
  check.rule("norms", common.sequence(common.choice(norms.ALLOWED_P), unique=True))
  check.rule("n_sparse", common.sequence(common.integer(0, note="0: dense"), unique=True))
  check.rule("pga_steps", common.integer(0))
  check.rule("step_size", common.number(0, lo_open=True))
  check.rule("num_random", common.COUNT)
  check.rule("bar_eps", common.number(0, lo_open=True))
  check.rule("layers", common.optional(common.text(nonempty=True,
                                                   note="a regex of layers; None: every layer")))
  common.check_layers(check, "layers", [config.layers] if config.layers else [])
  check.rule("zoo_epochs", common.optional(common.integer(1, note="None: the zoo recipe")))


def _vmapped_losses(loss_fn, layer):
  def f(params, corruptions, batch):
    w = layers.get_kernel(params, layer)
    return jax.vmap(lambda a: loss_fn(layers.replace_kernel(params, layer, w + a), batch))(
        corruptions)
  return f


class _Target:
  """One layer, or the whole network as a single raveled 'layer' named ``all``."""

  def __init__(self, name, loss_fn, params, model, variables):
    self.name = name
    if name == ALL:
      flat, unravel = ravel_pytree(layers.get_kernels(params))
      self.layer, self.params = ALL, {ALL: {"kernel": flat}}

      def full(a):
        return acr.add_corruption(params, unravel(a))

      def loss_all(p_all, batch):
        delta = p_all[ALL]["kernel"] - flat
        return loss_fn(full(delta), batch)

      self.loss_fn, self._full = loss_all, full
    else:
      self.layer, self.params, self.loss_fn = name, params, loss_fn
      w = layers.get_kernel(params, name)
      self._full = lambda a: layers.replace_kernel(params, name, w + a)
    self.kernel = layers.get_kernel(self.params, self.layer)
    self.model, self.variables = model, variables
    self.random_losses = jax.jit(_vmapped_losses(self.loss_fn, self.layer))

  def corrupted_variables(self, a):
    return {**self.variables, "params": self._full(a)}


def run(config, workdir: str) -> dict:
  recipe = (train.TrainConfig(epochs=int(config.zoo_epochs), seed=int(config.seed))
            if config.zoo_epochs else None)
  entry = common.pretrained(config, recipe=recipe)
  variables = entry.variables
  params = variables["params"]
  loss_fn = train.task_loss_fn(entry.model, variables)
  batches = data.batches_from_split(entry.dataset.train.take(config.calib_examples),
                                         config.calib_batch_size)
  base_loss = float(criteria.mean_loss(loss_fn, params, batches))
  base = train.evaluate(entry.model.apply, variables, entry.dataset.eval)
  names = layers.select_layers(params, config.layers or None)
  targets = names + [ALL]
  orders = [norms.normalize_p(p) for p in config.norms]
  sparsities = [int(n) for n in config.n_sparse]
  print(f"corruption study on {entry.name}: {len(targets)} targets x {len(orders)} norms x "
        f"{len(sparsities)} sparsities x {len(config.eps)} eps", flush=True)
  key = jax.random.key(config.seed)
  rows = []
  bar = Progress(len(targets), "corruption", enabled=config.progress, unit="target")
  for ti, name in enumerate(targets):
    t = _Target(name, loss_fn, params, entry.model, variables)
    _, grads = criteria.mean_value_and_grads(t.loss_fn, t.params, batches, [t.layer])
    g = grads[t.layer]
    for p in orders:
      for n in sparsities:
        n_or_none = n if n > 0 else None
        for ei, eps in enumerate(config.eps):
          e = eps_absolute(t.kernel, eps, p)
          common_row = {"target": name, "p": p, "n_sparse": n, "eps": float(eps), "eps_abs": e,
                        "num_weights": int(t.kernel.size)}
          a_fo = corruption_direction(g, e, p=p, n_sparse=n_or_none)
          pred = e * float(dual_norm(g, p, n_or_none))
          pga = pga_corruption(t.loss_fn, t.params, batches, t.layer, eps=eps, p=p,
                               steps=int(config.pga_steps), step_size=config.step_size,
                               n_sparse=n_or_none)
          k = jax.random.fold_in(jax.random.fold_in(key, ti), len(rows))
          cands = random_corruptions(k, jnp.float32(e), shape=tuple(t.kernel.shape), p=p,
                                     n_sparse=n_or_none, num=int(config.num_random))
          rl = sum(t.random_losses(t.params, cands, b) for b in batches) / len(batches)
          best = int(jnp.argmax(rl))
          a_rand = cands[best]
          d_fo = float(criteria.mean_loss(t.loss_fn, layers.replace_kernel(
              t.params, t.layer, t.kernel + a_fo), batches)) - base_loss
          found = {"first_order": (a_fo, d_fo, pred),
                   "pga": (pga.corruption, pga.loss_increase, np.nan),
                   "random": (a_rand, float(rl[best]) - base_loss, np.nan)}
          for method, (a, delta, delta_pred) in found.items():
            m = train.evaluate(entry.model.apply, t.corrupted_variables(a), entry.dataset.eval)
            rows.append({**common_row, "method": method, "delta": delta,
                         "delta_pred": delta_pred,
                         "random_mean_delta": (float(jnp.mean(rl)) - base_loss
                                               if method == "random" else np.nan),
                         "eval_accuracy": m["accuracy"], "eval_loss": m["loss"],
                         "eval_loss_increase": m["loss"] - base["loss"]})
    bar.update(1, postfix=name)
  bar.close()
  results = pd.DataFrame(rows)
  summary = _summary(results, base, base_loss, entry, config)
  paths = {"results": io.write_csv(os.path.join(workdir, "results.csv"), results),
           "summary": io.write_text(os.path.join(workdir, "summary.md"), summary),
           "meta": io.write_json(os.path.join(workdir, "meta.json"),
                                 {"model": entry.name, "baseline_eval": base,
                                  "baseline_calib_loss": base_loss, "config": config.to_dict(),
                                  "versions": io.versions()}),
           "delta_plot": _plot_delta(results, entry, os.path.join(workdir, "delta_vs_eps.png")),
           "bars": _plot_bars(results, entry, config,
                              os.path.join(workdir, "layer_vulnerability.png"))}
  print(summary)
  return {"paths": paths, "results": results}


def _wide(results: pd.DataFrame) -> pd.DataFrame:
  keys = ["target", "p", "n_sparse", "eps"]
  wide = results.pivot_table(index=keys, columns="method", values="delta", sort=False)
  acc = results.pivot_table(index=keys, columns="method", values="eval_accuracy", sort=False)
  pred = results[results.method == "first_order"].set_index(keys)["delta_pred"]
  wide = wide.join(acc.add_prefix("acc_")).join(pred)
  return wide.reset_index()


def _summary(results, base, base_loss, entry, config) -> str:
  wide = _wide(results)
  ratio = wide["pga"] / np.maximum(wide["random"], 1e-12)
  meaningful = wide["pga"] > 1e-4
  r = ratio[meaningful]
  dense = meaningful & (wide["n_sparse"] == 0)
  holds = len(r) > 0 and float(np.median(r)) >= 10.0
  lines = [f"# corruption: {entry.name} on {entry.dataset.name}", "",
           f"Clean eval accuracy {100 * base['accuracy']:.2f}%, eval loss {base['loss']:.4f}; "
           f"calibration loss {base_loss:.4f} ({config.calib_examples} training images). "
           f"Delta = loss increase on the calibration batches; eps relative to ||W||_p; "
           f"random = best of {config.num_random} random corruptions of the same norm and "
           f"sparsity; pga = {config.pga_steps} projected ascent steps.", "",
           "## Claim: gradient corruption is far more damaging than random at equal norm", "",
           f"Over {len(r)} settings (target x p x sparsity x eps with Delta_pga > 1e-4): "
           f"Delta_pga / Delta_random median {np.median(r):.3g}, min {np.min(r):.3g}; "
           f"pga >= random in {int((wide['pga'] >= wide['random']).sum())}/{len(wide)} of all "
           f"settings, >= 10x in {int((r >= 10).sum())}/{len(r)} "
           f"(dense only: median {np.median(ratio[dense]) if dense.any() else float('nan'):.3g}). "
           f"**The claim {'holds' if holds else 'does not hold'} here** "
           f"(criterion: median ratio >= 10). See `delta_vs_eps.png` and "
           f"`layer_vulnerability.png`.", "",
           "## Whole network (all kernels, one ball)", "",
           "| p | n | eps | Delta pred (eps·‖g‖_q) | Delta first-order | Delta PGA | "
           "Delta random | acc FO % | acc PGA % | acc random % |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for _, row in wide[wide.target == ALL].iterrows():
    lines.append(f"| {row.p} | {row.n_sparse or 'dense'} | {row.eps:g} | {row.delta_pred:.4g} | "
                 f"{row.first_order:.4g} | {row.pga:.4g} | {row.random:.3g} | "
                 f"{100 * row.acc_first_order:.1f} | {100 * row.acc_pga:.1f} | "
                 f"{100 * row.acc_random:.1f} |")
  bar_eps = _nearest(wide, config.bar_eps)
  sub = wide[(wide.target != ALL) & (wide.p == "2") & (wide.n_sparse == 0) &
             (wide.eps == bar_eps)].sort_values("pga", ascending=False)
  lines += ["", f"## Per-layer vulnerability ranking (p=2, dense, eps={bar_eps:g})", "",
            "| rank | layer | Delta PGA | Delta first-order | Delta random | acc PGA % |",
            "|---|---|---|---|---|---|"]
  for i, (_, row) in enumerate(sub.iterrows()):
    lines.append(f"| {i + 1} | {row.target} | {row.pga:.4g} | {row.first_order:.4g} | "
                 f"{row.random:.3g} | {100 * row.acc_pga:.1f} |")
  lines += ["", "This per-layer ranking is already a criterion of the criteria benchmark: "
            "`corruption_first_order` and `corruption_pga` in `safer_jax/criteria/corruption.py` "
            "(run `python launch.py --experiment=criteria_benchmark`)."]
  return "\n".join(lines) + "\n"


def _nearest(wide, eps):
  values = np.array(sorted(set(wide["eps"])))
  return float(values[np.argmin(np.abs(np.log(values) - np.log(eps)))])


def _plot_delta(results, entry, path) -> str:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  ps = list(dict.fromkeys(results.p))
  ns = list(dict.fromkeys(results.n_sparse))
  fig, axes = plt.subplots(len(ps), len(ns), figsize=(4.5 * len(ns), 3.6 * len(ps)),
                           squeeze=False)
  colors = plots.source_colors(METHODS)
  for i, p in enumerate(ps):
    for j, n in enumerate(ns):
      ax = axes[i, j]
      sub = results[(results.p == p) & (results.n_sparse == n)]
      for method in METHODS:
        for target, g in sub[sub.method == method].groupby("target", sort=False):
          g = g.sort_values("eps")
          whole = target == ALL
          ax.plot(g.eps, np.maximum(g.delta, 1e-7), color=colors[method],
                  lw=2.2 if whole else 0.6, alpha=1.0 if whole else 0.35,
                  marker="o" if whole else None, ms=3,
                  label=f"{method} (whole net)" if whole else None)
      ax.set_xscale("log")
      ax.set_yscale("log")
      ax.set_title(f"p={p}, {'dense' if n == 0 else f'n={n}'}", fontsize=9)
      ax.set_xlabel("eps (relative to ||W||_p)")
      ax.set_ylabel("Delta = loss increase (nats)")
      ax.grid(alpha=0.3, which="both")
  axes[0, 0].legend(fontsize=7)
  fig.suptitle(f"{entry.name}: corruption indicator (thick: whole network, thin: layers)")
  fig.tight_layout()
  return io.save_figure(path, fig)


def _plot_bars(results, entry, config, path) -> str:
  wide = _wide(results)
  eps = _nearest(wide, config.bar_eps)
  sub = wide[(wide.target != ALL) & (wide.p == "2") & (wide.n_sparse == 0) & (wide.eps == eps)]
  series = [(method, color, np.maximum(sub[method], 1e-7), None)
            for method, color in plots.source_colors(METHODS).items()]
  return plots.grouped_bars(
      path, list(sub.target), series, ylabel="Delta = loss increase (nats)",
      title=f"{entry.name}: per-layer vulnerability (p=2, dense, eps={eps:g})", width=0.27,
      log=True, rotation=45, figsize=(0.7, 4))
