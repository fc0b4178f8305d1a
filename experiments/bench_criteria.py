"""Benchmark: does every criterion's *default* cost a small part of the sweep it predicts, and
rank the layers as well as its full setting?

SAfER's premise is that a criterion can stand in for the ground-truth sweep.
For each model (default: mobilenet_v2, resnet20, vit_tiny and the language
model lm_tiny), in one process with the persistent XLA cache off, this times:

* the ground-truth sweep (every layer x the criteria benchmark's families,
  magnitudes and seeds) — cold (first call, compilation included) and warm (the
  fastest of ``warm_runs`` calls after it);
* every criterion at its **default** (the cheap setting of the expensive ones,
  :mod:`safer_jax.criteria.settings`) on the same calibration batches — cold
  (first call with nothing compiled: its compiled programs are forgotten
  first, so no criterion rides on another's) and warm — with its share of the
  warm and of the cold sweep, and its Spearman rho against the sweep's
  per-layer importance per family;
* every expensive criterion at its **full** setting (one call), whose rho's
  95% bootstrap interval over layers the default's rho must lie in;
* per Hutchinson probe, on conv layers, the per-layer estimator against a plain
  ``jit(jvp(grad))`` one probe at a time (what PyHessian does).

Writes ``bench_criteria.json`` (``{models: {name: {sweep_seconds, sweep_seconds_cold,
criteria: {name: {seconds, seconds_cold, fraction_of_sweep, fraction_of_sweep_cold,
needs_data, spearman_vs_truth, full: {...}, within_full_ci}}, per_probe}}, targets_met}``)
and ``bench_criteria.md``. Targets (2-core CPU): every data-dependent criterion at
its default <= 10% of the warm sweep and cold <= 1x the cold sweep, with every rho
inside the full setting's interval, on every model benchmarked; per probe at least
as fast as the plain ``jvp(grad)`` on every conv layer timed.
"""

from __future__ import annotations

import os
import time

import jax
import ml_collections

from experiments import common, criteria_benchmark
from safer_jax import criteria
from safer_jax.core import data, io
from safer_jax.core import layers as layers_lib
from safer_jax.core.progress import Progress
from safer_jax.measure import agreement, sweep
from safer_jax.training import train

TEXT_MODELS_OK = True  # lm_tiny: truth = loss increase, criteria on its token loss
EXTRA_MODELS = criteria_benchmark.EXTRA_MODELS  # None: config.models; "all": every zoo model
DATA_FREE = ("random", "param_count", "weight_norm", "quant_error", "spectral_norm")
TARGET_FRACTION = 0.10
TARGET_COLD_FRACTION = 1.0
COST_BAR_MODEL = "mobilenet_v2"  # the warm and cold cost bars are set on it (#30)
MODELS = ("mobilenet_v2", "resnet20", "vit_tiny", "lm_tiny")


def get_config(tiny: bool = False) -> ml_collections.ConfigDict:
  """The criteria benchmark's setting, per model, at the criteria's defaults and full settings.

  Fields (besides :func:`experiments.criteria_benchmark.get_config`, whose
  ``criteria_setting`` is not used: both settings run):
    models: the models benchmarked (``model`` picks one instead).
    trace_probes: probes of the per-probe comparison.
    warm_runs: warm times (the sweep's and every criterion's) are the fastest of
      this many calls after the cold one.
    metric: ground-truth metric the rho is computed against (None: the model's
      own, accuracy drop for classifiers, loss increase for a language model).
  """
  config = criteria_benchmark.get_config(tiny)
  config.models = ("mlp",) if tiny else MODELS
  config.trace_probes = 16 if tiny else 64
  config.warm_runs = 1 if tiny else 2
  config.metric = ml_collections.config_dict.placeholder(str)
  return config


def validate(config, check: common.Checker) -> None:
  """The criteria benchmark's checks, plus the per-probe comparison's and the timing's."""
  criteria_benchmark.validate(config, check)
  check.rule("trace_probes", common.COUNT)
  check.rule("warm_runs", common.COUNT)
  check.rule("metric", common.optional(common.choice(criteria_benchmark.METRICS)))


def _timed(fn):
  t0 = time.perf_counter()
  out = fn()
  jax.block_until_ready(jax.tree.leaves(out) if not hasattr(out, "shape") else out)
  return out, time.perf_counter() - t0


def _met(flag) -> str:
  """A target's verdict in the Markdown table: met, NOT met, or n/a (None: not measurable)."""
  return "n/a" if flag is None else "met" if flag else "NOT met"


def _spearman(scores, truth_frame, n_boot, seed) -> dict:
  out = {}
  for family in truth_frame.columns:
    ranks = agreement.rank_agreement(scores, truth_frame[family].to_dict(), n_boot=n_boot,
                                     seed=seed)
    out[family] = {"rho": ranks["spearman"], "lo": ranks["spearman_lo"],
                   "hi": ranks["spearman_hi"]}
  return out


def _call(name, loss_fn, params, batches, key, opts):
  scores, seconds = criteria.compute_all([name], loss_fn, params, batches, key=key,
                                         options={name: opts} if opts else None)
  return {layer: float(getattr(v, "mean", v)) for layer, v in scores[name].items()}, seconds[name]


def _time_criterion(name, loss_fn, params, batches, key, opts, warm_runs):
  """(scores, cold seconds, warm seconds) of one criterion.

  Cold: the first call after the criteria's compiled programs are forgotten
  (``criteria.clear_compiled``); warm: the fastest of the ``warm_runs`` calls after it.
  """
  criteria.clear_compiled()
  values, cold = _call(name, loss_fn, params, batches, key, opts)
  warm = min(_call(name, loss_fn, params, batches, key, opts)[1] for _ in range(warm_runs))
  return values, cold, warm


def _per_probe_seconds(loss_fn, params, batches, key, probes: int) -> dict:
  """Warm seconds per Hutchinson probe on up to three conv layers, against a plain ``jvp(grad)``.

  Layers: the first and the middle conv layer in path order, and the one with
  the largest kernel. ``reference``: a plain ``jax.jit`` of ``vdot(v, jvp(grad f, (W,), (v,)))``
  for that layer's kernel, one probe per call (PyHessian's way); ``per_layer``: this
  library's per-layer estimator on that layer (the probes of a call share one
  linearisation). The two alternate, twice after a warm-up, and the mean is reported.
  """
  convs = [n for n in layers_lib.find_layers(params) if layers_lib.get_kernel(params, n).ndim == 4]
  if not convs:
    return {}
  largest = max(convs, key=lambda n: layers_lib.get_kernel(params, n).size)
  opts = dict(stop=None, max_probes=probes, chunk_size=min(16, probes))
  out = {}
  for layer in dict.fromkeys([convs[0], convs[len(convs) // 2], largest]):
    kernel = layers_lib.get_kernel(params, layer)
    f = lambda k, b, layer=layer: loss_fn(layers_lib.replace_kernel(params, layer, k), b)

    @jax.jit
    def reference(k, v, b, f=f):
      return jax.numpy.vdot(v, jax.jvp(lambda w: jax.grad(f)(w, b), (k,), (v,))[1])

    vs = [jax.random.rademacher(jax.random.fold_in(key, i), kernel.shape, dtype=kernel.dtype)
          for i in range(probes)]
    times = {"reference": [], "per_layer": []}
    for _ in range(3):  # warm-up, then two measured rounds
      _, t = _timed(lambda: [reference(kernel, v, b) for v in vs for b in batches])
      times["reference"].append(t / probes)
      _, t = _timed(lambda layer=layer: criteria.hutchinson_trace(
          loss_fn, params, batches, key=key, estimator="per_layer", layers=layer, **opts))
      times["per_layer"].append(t / probes)
    out[layer] = {k: sum(v[1:]) / 2 for k, v in times.items()}
  return out


def run(config, workdir: str) -> dict:
  # Cold timings must include compilation: no persistent XLA cache for this run.
  previous = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  try:
    results = {}
    for name in criteria_benchmark.model_names(config):
      results[name] = _bench_model(config, name)
  finally:
    jax.config.update("jax_enable_compilation_cache", previous)
  return _write(config, workdir, results)


def _bench_model(config, model: str) -> dict:
  """Every timing and rho of one model (see the module docstring)."""
  entry = common.pretrained(config, model=model)
  split = entry.dataset.eval.take(config.eval_examples or None)
  scfg = criteria_benchmark.sweep_config(config)
  run_sweep = lambda progress: sweep.run_sweep(entry.model, entry.variables, split, scfg,
                                               progress=progress, task=entry.task)
  table, sweep_cold = _timed(lambda: run_sweep(config.progress))
  sweep_warm = min(_timed(lambda: run_sweep(False))[1] for _ in range(config.warm_runs))
  metric = config.metric or sweep.tables.default_metric(table)
  truth = sweep.importance(table, metric)
  print(f"{model}: sweep {len(table)} cells, cold {sweep_cold:.1f} s, warm {sweep_warm:.1f} s",
        flush=True)

  loss_fn = train.task_loss_fn(entry.model, entry.variables, entry.task)
  batches = data.batches_from_split(entry.dataset.train, config.calib_batch_size,
                                         config.calib_batches)
  params = entry.variables["params"]
  key = jax.random.key(config.seed)
  defaults = criteria_benchmark.criterion_options(config, "cheap")
  full = criteria_benchmark.criterion_options(config, "full")
  rho = lambda values: _spearman(values, truth, config.n_boot, config.seed)
  bar = Progress(len(config.criteria), f"{model} criteria", enabled=config.progress,
                 unit="criterion")
  results = {}
  for name in config.criteria:
    values, cold, warm = _time_criterion(name, loss_fn, params, batches, key,
                                         defaults.get(name), config.warm_runs)
    r = results[name] = {
        "seconds": warm, "seconds_cold": cold, "needs_data": name not in DATA_FREE,
        "fraction_of_sweep": warm / sweep_warm, "fraction_of_sweep_cold": cold / sweep_cold,
        "spearman_vs_truth": rho(values), "setting": "cheap" if name in full else None}
    if name in criteria.settings.OPTIONS:
      full_values, seconds = _call(name, loss_fn, params, batches, key, full[name])
      r["full"] = {"seconds": seconds, "spearman_vs_truth": rho(full_values)}
      reference = r["full"]["spearman_vs_truth"]
    else:  # its default is its only setting
      reference = r["spearman_vs_truth"]
    r["within_full_ci"] = {f: reference[f]["lo"] <= r["spearman_vs_truth"][f]["rho"]
                           <= reference[f]["hi"] for f in truth.columns}
    bar.update(1, postfix=f"{name} {warm:.2f}s")
  bar.close()
  data_dependent = [r for r in results.values() if r["needs_data"]]
  return {
      "model": entry.name, "dataset": entry.dataset.name, "layers": int(len(truth)),
      "cells": len(table), "eval_examples": len(split), "metric": metric,
      "calibration_examples": config.calib_batches * config.calib_batch_size,
      "sweep_seconds": sweep_warm, "sweep_seconds_cold": sweep_cold, "criteria": results,
      "per_probe": _per_probe_seconds(loss_fn, params, batches, key, int(config.trace_probes)),
      "max_fraction": max((r["fraction_of_sweep"] for r in data_dependent), default=0.0),
      "max_fraction_cold": max((r["fraction_of_sweep_cold"] for r in data_dependent),
                               default=0.0),
      "all_within_full_ci": all(all(r["within_full_ci"].values()) for r in data_dependent)}


def _targets(models: dict) -> dict:
  per_probe = [t for m in models.values() for t in m["per_probe"].values()]
  return {
      "fraction_of_sweep": all(m["max_fraction"] <= TARGET_FRACTION for m in models.values()),
      "fraction_of_sweep_cold": all(m["max_fraction_cold"] <= TARGET_COLD_FRACTION
                                    for m in models.values()),
      "within_full_ci": all(m["all_within_full_ci"] for m in models.values()),
      "per_probe_vs_reference": (all(t["per_layer"] <= t["reference"] for t in per_probe)
                                 if per_probe else None)}


def _model_markdown(m: dict) -> list[str]:
  families = list(next(iter(m["criteria"].values()))["spearman_vs_truth"])
  md = [f"## {m['model']} on {m['dataset']}", "",
        f"Ground truth: {m['cells']} cells on {m['eval_examples']} eval examples, {m['layers']} "
        f"layers; sweep **{m['sweep_seconds']:.1f} s warm, {m['sweep_seconds_cold']:.1f} s "
        f"cold**. Criteria on {m['calibration_examples']} training examples at their defaults; "
        f"rho = Spearman vs. the sweep's {m['metric']} importance; [interval] = 95% bootstrap "
        f"interval over layers of the full setting's rho (* marks a default rho outside it).",
        "",
        "| criterion | warm s | % warm sweep | cold s | % cold sweep | full s | "
        + " | ".join(f"rho {f} [full]" for f in families) + " |",
        "|---" * (6 + len(families)) + "|"]
  for name, r in m["criteria"].items():
    ref = r.get("full", r)["spearman_vs_truth"]
    cells = [f"{r['spearman_vs_truth'][f]['rho']:.2f}{'' if r['within_full_ci'][f] else '*'} "
             f"[{ref[f]['lo']:.2f}, {ref[f]['hi']:.2f}]" for f in families]
    full_s = f"{r['full']['seconds']:.2f}" if "full" in r else "="
    md.append(f"| {name}{'' if r['needs_data'] else ' (data-free)'} | {r['seconds']:.2f} | "
              f"{100 * r['fraction_of_sweep']:.1f}% | {r['seconds_cold']:.2f} | "
              f"{100 * r['fraction_of_sweep_cold']:.0f}% | {full_s} | " + " | ".join(cells) + " |")
  if m["per_probe"]:
    md += ["", "Per Hutchinson probe (ms, warm): " + "; ".join(
        f"`{layer}` plain `jit(jvp(grad))` {1e3 * t['reference']:.2f}, per-layer estimator "
        f"{1e3 * t['per_layer']:.2f} ({t['reference'] / t['per_layer']:.2f}x)"
        for layer, t in m["per_probe"].items()) + "."]
  md += ["", f"Data-dependent criteria at their defaults: at most "
         f"{100 * m['max_fraction']:.1f}% of the warm sweep and "
         f"{100 * m['max_fraction_cold']:.0f}% of the cold sweep; every rho inside the full "
         f"setting's interval: {'yes' if m['all_within_full_ci'] else 'NO'}.", ""]
  return md


def _write(config, workdir: str, models: dict) -> dict:
  targets = _targets(models)
  device = (f"{jax.default_backend()} ({jax.devices()[0].device_kind}, "
            f"{os.cpu_count()} CPU cores visible)")
  result = {"models": models, "targets": {"fraction_of_sweep": TARGET_FRACTION,
                                          "fraction_of_sweep_cold": TARGET_COLD_FRACTION},
            "targets_met": targets, "device": device, "versions": io.versions()}
  md = ["# bench_criteria: criteria at their defaults against the sweep", "",
        f"Device: {device}. Regenerate: `python launch.py --experiment=bench_criteria`.", ""]
  for m in models.values():
    md += _model_markdown(m)
  md += [f"Targets on every model: data-dependent defaults <= {100 * TARGET_FRACTION:.0f}% of "
         f"the warm sweep ({_met(targets['fraction_of_sweep'])}), cold <= "
         f"{TARGET_COLD_FRACTION:.0f}x the cold sweep ({_met(targets['fraction_of_sweep_cold'])}"
         f"), every rho inside the full setting's interval ({_met(targets['within_full_ci'])}); "
         f"per probe at least as fast as plain `jvp(grad)` on every conv layer timed "
         f"({_met(targets['per_probe_vs_reference'])})."]
  if COST_BAR_MODEL in models:  # the cost bars are set on this model; the others are reported
    m = models[COST_BAR_MODEL]
    md += ["", f"On {COST_BAR_MODEL}, where the cost bars are set: warm <= "
           f"{100 * TARGET_FRACTION:.0f}% ({_met(m['max_fraction'] <= TARGET_FRACTION)}), cold <= "
           f"{TARGET_COLD_FRACTION:.0f}x ({_met(m['max_fraction_cold'] <= TARGET_COLD_FRACTION)})."]
  paths = {"json": io.write_json(os.path.join(workdir, "bench_criteria.json"), result),
           "md": io.write_text(os.path.join(workdir, "bench_criteria.md"), "\n".join(md) + "\n")}
  print("\n".join(md[2:]))
  return {"paths": paths, "targets_met": targets,
          "models": {n: {k: m[k] for k in ("sweep_seconds", "max_fraction", "max_fraction_cold",
                                            "all_within_full_ci")} for n, m in models.items()}}
