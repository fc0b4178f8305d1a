"""Benchmark: is every criterion *cheap* next to the ground-truth sweep it predicts?

SAfER's premise is that a criterion can stand in for the sweep. On one model
(default ``mobilenet_v2``, the zoo model with the most layers) this times, in
one process:

* the ground-truth sweep (every layer x the criteria benchmark's families,
  magnitudes and seeds) — cold (first call, compilation included) and warm
  (the fastest of ``warm_runs`` calls after it);
* every criterion on the same calibration batches — cold and warm — and its
  Spearman rho (with a 95% bootstrap interval over layers) against the sweep's
  per-layer importance, per family;
* the expensive criteria again at a *cheap setting* (``cheap``: fewer
  calibration images, quadrature nodes, ascent steps, Lanczos iterations or
  probes), and whether each of its rho still lies inside the 95% bootstrap
  interval of the same criterion at its full setting;
* the all-layer Hutchinson trace (one full Hessian-vector product per probe)
  against the per-layer estimator (one HVP per layer per probe) at an equal
  number of probes, warm.

Writes ``bench_criteria.json`` (``model``, ``sweep_seconds`` (warm),
``criteria: {name: {seconds, seconds_cold, needs_data, fraction_of_sweep,
spearman_vs_truth: {family: rho}, ...}}``, ``cheap: {name: {setting, seconds,
..., within_full_ci: {family: bool}}}``, ``trace_all_layers_speedup``, ...)
and ``bench_criteria.md``. The targets (2-core CPU): every data-dependent
criterion <= 10% of the warm sweep (at its full setting; and at its cheap
setting, where every rho must stay inside the full setting's interval),
all-layer trace >= 20x the per-layer one.
"""

from __future__ import annotations

import inspect
import os
import time

import jax
import ml_collections

from experiments import common, criteria_benchmark
from safer_jax import benchmark, criteria, io, sweep
from safer_jax import layers as layers_lib
from safer_jax.progress import Progress

DATA_FREE = ("random", "param_count", "weight_norm", "quant_error", "spectral_norm")
TARGET_FRACTION = 0.10
TARGET_TRACE_SPEEDUP = 20.0


def get_config(tiny: bool = False) -> ml_collections.ConfigDict:
  """The criteria benchmark's setting on one model, plus the trace comparison.

  Fields (besides :func:`experiments.criteria_benchmark.get_config`):
    trace_probes: probes of the all-layer vs per-layer trace comparison.
    warm_runs: warm times (the sweep's and every criterion's) are the fastest of
      this many calls after the cold one.
    metric: ground-truth metric the rho is computed against.
    cheap: ``{criterion: {option: value}}``, the cheap setting of each
      expensive criterion, timed again (a criterion not in ``criteria`` is
      skipped). ``images``: the criterion sees only the first ``images``
      calibration images (one batch); the other keys are the criterion's
      options and replace those of ``criteria_options``. Chosen on
      mobilenet_v2 (2-core CPU) as the cheapest settings tried whose rho
      stayed inside the full setting's interval.
  """
  config = criteria_benchmark.get_config(tiny)
  config.model = "mlp" if tiny else "mobilenet_v2"
  config.trace_probes = 16 if tiny else 64
  config.warm_runs = 1 if tiny else 2
  config.metric = "accuracy_drop"
  hutchinson = {"probe_examples": 8 if tiny else 12, "max_probes": 8 if tiny else 20,
                "chunk_size": 4}
  config.cheap = ml_collections.ConfigDict({
      "hessian_trace": dict(hutchinson),
      "hawq_v2": dict(hutchinson),
      "top_eigenvalue": {"images": 32, "max_iter": 3},
      "corruption_pga": {"images": 16, "steps": 2},
      "integrated_gradients": {"images": 32, "steps": 4},
      "fisher": {"images": 64},  # per-example gradients: 23% of resnet8's sweep on 256 images
  })
  return config


def validate(config, check: common.Checker) -> None:
  """The criteria benchmark's checks, plus the trace comparison's and the cheap settings'."""
  criteria_benchmark.validate(config, check)
  check.rule("trace_probes", common.COUNT)
  check.rule("warm_runs", common.COUNT)
  unknown = sorted(set(config.cheap) - set(criteria.CRITERIA))
  check.require(not unknown, "cheap", f"criterion names from {sorted(criteria.CRITERIA)}",
                problem=f"unknown criteria {unknown}")
  pooled = config.calib_batches * config.calib_batch_size
  for name, setting in config.cheap.items():
    check.rule(f"cheap.{name}.images", common.integer(1, pooled, note="calibration images"))
    parameters = inspect.signature(criteria.CRITERIA[name]).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
      allowed = sorted(set(parameters) - {"loss_fn", "params", "batches", "layers", "key"}
                       | {"images"})
      bad = sorted(set(setting) - set(allowed))
      check.require(not bad, f"cheap.{name}", f"options of {name}: {allowed}",
                    problem=f"unknown options {bad}")
    images = setting.get("images", pooled)
    if "probe_examples" in setting:
      check.rule(f"cheap.{name}.probe_examples", common.integer(
          1, images, note=f"at most the {images} images the criterion sees"))


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
    agreement = benchmark.rank_agreement(scores, truth_frame[family].to_dict(), n_boot=n_boot,
                                         seed=seed)
    out[family] = {"rho": agreement["spearman"], "lo": agreement["spearman_lo"],
                   "hi": agreement["spearman_hi"]}
  return out


def _first_images(batches, n: int) -> list:
  """The first ``n`` examples of ``batches`` (a list of batches), as one batch in a list."""
  pooled = jax.tree.map(lambda *xs: jax.numpy.concatenate(xs), *batches)
  return [jax.tree.map(lambda x: x[:n], pooled)]


def _time_criterion(name, loss_fn, params, batches, key, opts, progress, warm_runs):
  """(scores as floats, cold seconds, warm seconds) of one criterion.

  Cold: the first call; warm: the fastest of the ``warm_runs`` calls after it.
  """
  times = []
  for _ in range(1 + warm_runs):
    scores, seconds = criteria.compute_all([name], loss_fn, params, batches, key=key,
                                           progress=progress,
                                           options={name: opts} if opts else None)
    times.append(seconds[name])
  values = {layer: float(getattr(v, "mean", v)) for layer, v in scores[name].items()}
  return values, times[0], min(times[1:])


def _per_probe_seconds(loss_fn, params, batches, key, probes: int) -> dict:
  """Warm seconds per Hutchinson probe on three conv layers, against a plain ``jvp(grad)``.

  Layers: the first and the middle conv layer in path order, and the one with
  the largest kernel. ``reference``: a plain ``jax.jit`` of ``vdot(v, jvp(grad f, (W,), (v,)))``
  for that layer's kernel, one probe per call; ``per_layer``: this library's
  per-layer estimator on that layer (the probes of a call share one linearisation).
  The two alternate, twice after a warm-up, and the mean is reported.
  ``all_layers``: the all-layer estimator (one full HVP per probe gives every layer).
  Top-level ``layer``/``reference``/``per_layer``: the largest-kernel layer.
  """
  convs = [n for n in layers_lib.find_layers(params) if layers_lib.get_kernel(params, n).ndim == 4]
  if not convs:
    return {"layer": None, "reference": float("nan"), "per_layer": float("nan"),
            "all_layers": float("nan"), "layers": {}}
  largest = max(convs, key=lambda n: layers_lib.get_kernel(params, n).size)
  opts = dict(stop="rel_tol", rel_tol=0.0, max_probes=probes, min_probes=probes,
              chunk_size=min(16, probes))
  per_layer = {}
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
    per_layer[layer] = {k: sum(v[1:]) / 2 for k, v in times.items()}
  for _ in range(2):
    _, t = _timed(lambda: criteria.hutchinson_trace(loss_fn, params, batches, key=key,
                                                    estimator="all_layers", **opts))
  return {"layer": largest, **per_layer[largest], "all_layers": t / probes,
          "layers": per_layer}


def run(config, workdir: str) -> dict:
  # Cold timings must include compilation: no persistent XLA cache for this run.
  previous = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  try:
    return _run(config, workdir)
  finally:
    jax.config.update("jax_enable_compilation_cache", previous)


def _run(config, workdir: str) -> dict:
  entry = common.pretrained(config)
  split = entry.dataset.eval.take(config.eval_examples or None)
  scfg = criteria_benchmark.sweep_config(config)
  table, sweep_cold = _timed(lambda: sweep.run_sweep(entry.model, entry.variables, split, scfg,
                                                     progress=config.progress))
  sweep_warm = min(_timed(lambda: sweep.run_sweep(entry.model, entry.variables, split, scfg,
                                                  progress=False))[1]
                   for _ in range(config.warm_runs))
  truth = sweep.importance(table, config.metric)
  print(f"sweep: {len(table)} cells, cold {sweep_cold:.1f} s, warm {sweep_warm:.1f} s",
        flush=True)

  loss_fn = benchmark.classifier_loss_fn(entry.model, entry.variables)
  batches = benchmark.batches_from_split(entry.dataset.train, config.calib_batch_size,
                                         config.calib_batches)
  params = entry.variables["params"]
  key = jax.random.key(config.seed)
  options = config.criteria_options.to_dict()
  cheap = {n: dict(o) for n, o in config.cheap.to_dict().items() if n in config.criteria}
  bar = Progress(len(config.criteria) + len(cheap), "criteria", enabled=config.progress,
                 unit="criterion")
  results = {}
  for name in config.criteria:
    values, cold, warm = _time_criterion(name, loss_fn, params, batches, key,
                                         options.get(name), config.progress, config.warm_runs)
    results[name] = {
        "seconds": warm, "seconds_cold": cold, "needs_data": name not in DATA_FREE,
        "fraction_of_sweep": warm / sweep_warm, "fraction_of_sweep_cold": cold / sweep_cold,
        "spearman_vs_truth": _spearman(values, truth, config.n_boot, config.seed)}
    bar.update(1, postfix=f"{name} {warm:.2f}s")

  # The expensive criteria at their cheap setting: is each rho inside the full setting's CI?
  cheap_results = {}
  for name, setting in cheap.items():
    opts = {**(options.get(name) or {}), **setting}
    images = opts.pop("images", None)
    data = batches if images is None else _first_images(batches, images)
    values, cold, warm = _time_criterion(name, loss_fn, params, data, key, opts,
                                         config.progress, config.warm_runs)
    rho = _spearman(values, truth, config.n_boot, config.seed)
    full = results[name]["spearman_vs_truth"]
    inside = {f: full[f]["lo"] <= rho[f]["rho"] <= full[f]["hi"] for f in rho}
    cheap_results[name] = {
        "setting": setting,
        "calibration_images": images or config.calib_batches * config.calib_batch_size,
        "seconds": warm, "seconds_cold": cold, "needs_data": name not in DATA_FREE,
        "fraction_of_sweep": warm / sweep_warm, "fraction_of_sweep_cold": cold / sweep_cold,
        "spearman_vs_truth": rho, "within_full_ci": inside, "agrees": all(inside.values())}
    bar.update(1, postfix=f"{name} (cheap) {warm:.2f}s")
  bar.close()

  # All-layer vs per-layer Hutchinson at equal probes (no early stop), warm.
  n = int(config.trace_probes)
  trace_opts = dict(stop="rel_tol", rel_tol=0.0, max_probes=n, min_probes=n,
                    chunk_size=min(16, n))
  # Also the all-layer estimator at hessian_trace's cheap probe size, the same number of
  # probes: each probe sees fewer images, cheaper work, so it is reported apart from the target.
  cheap_trace = cheap.get("hessian_trace", {})
  probe_examples = cheap_trace.get("probe_examples")
  runs = {"all_layers": (batches, {"estimator": "all_layers"}),
          "per_layer": (batches, {"estimator": "per_layer"})}
  if probe_examples:
    runs["all_layers_cheap"] = (
        _first_images(batches, cheap_trace["images"]) if "images" in cheap_trace else batches,
        {"estimator": "all_layers", "probe_examples": probe_examples})
  trace_seconds = {}
  for label, (data, kwargs) in runs.items():
    for _ in range(2):
      _, t = _timed(lambda data=data, kwargs=kwargs: criteria.hutchinson_trace(
          loss_fn, params, data, key=key, **kwargs, **trace_opts))
    trace_seconds[label] = t
  speedup = trace_seconds["per_layer"] / trace_seconds["all_layers"]

  per_probe = _per_probe_seconds(loss_fn, params, batches, key, n)
  data_dependent = [r["fraction_of_sweep"] for r in results.values() if r["needs_data"]]
  # Each data-dependent criterion at its cheap setting where it has one, else its full one.
  cheapest = [cheap_results.get(name, r)["fraction_of_sweep"] for name, r in results.items()
              if r["needs_data"]]
  result = {
      "model": entry.name, "dataset": entry.dataset.name, "layers": int(len(truth)),
      "cells": len(table), "eval_examples": len(split),
      "calibration_images": config.calib_batches * config.calib_batch_size,
      "sweep_seconds": sweep_warm, "sweep_seconds_cold": sweep_cold, "metric": config.metric,
      "criteria": results, "cheap": cheap_results, "trace_probes": n,
      "trace_seconds": trace_seconds, "trace_all_layers_speedup": speedup,
      "trace_all_layers_cheap_speedup": (
          trace_seconds["per_layer"] / trace_seconds["all_layers_cheap"]
          if "all_layers_cheap" in trace_seconds else None),
      "per_probe": per_probe,
      "max_data_dependent_fraction": max(data_dependent, default=0.0),
      "max_data_dependent_fraction_cheap": max(cheapest, default=0.0),
      "targets": {"fraction_of_sweep": TARGET_FRACTION,
                  "trace_all_layers_speedup": TARGET_TRACE_SPEEDUP},
      "targets_met": {
          "fraction_of_sweep": max(data_dependent, default=0.0) <= TARGET_FRACTION,
          "fraction_of_sweep_cheap": max(cheapest, default=0.0) <= TARGET_FRACTION,
          "cheap_agreement": (all(r["agrees"] for r in cheap_results.values())
                              if cheap_results else None),
          "trace_all_layers_speedup": speedup >= TARGET_TRACE_SPEEDUP,
          "per_probe_vs_reference": (all(t["per_layer"] <= t["reference"]
                                         for t in per_probe["layers"].values())
                                     if per_probe["layers"] else None)},
      "device": f"{jax.default_backend()} ({jax.devices()[0].device_kind}, "
                f"{os.cpu_count()} CPU cores visible)",
      "versions": io.versions()}
  families = list(truth.columns)
  md = [f"# bench_criteria: {entry.name} on {entry.dataset.name}", "",
        f"Ground truth: {len(table)} cells on {len(split)} eval images, {len(truth)} layers; "
        f"sweep {sweep_warm:.1f} s warm ({sweep_cold:.1f} s cold). Criteria on "
        f"{result['calibration_images']} training images; rho = Spearman vs. the sweep's "
        f"{config.metric} importance [95% bootstrap over layers]. Device: {result['device']}.",
        "",
        "| criterion | data | warm s | % of sweep | cold s | " + " | ".join(
            f"rho {f}" for f in families) + " |",
        "|---" * (5 + len(families)) + "|"]
  for name, r in results.items():
    rho = [f"{r['spearman_vs_truth'][f]['rho']:.2f} [{r['spearman_vs_truth'][f]['lo']:.2f}, "
           f"{r['spearman_vs_truth'][f]['hi']:.2f}]" for f in families]
    md.append(f"| {name} | {'yes' if r['needs_data'] else 'no'} | {r['seconds']:.2f} | "
              f"{100 * r['fraction_of_sweep']:.1f}% | {r['seconds_cold']:.2f} | "
              + " | ".join(rho) + " |")
  if cheap_results:
    md += ["", "Cheap settings (each rho marked * when it lies outside the full setting's "
           "interval above):", "",
           "| criterion | setting | warm s | % of sweep | cold s | " + " | ".join(
               f"rho {f}" for f in families) + " |",
           "|---" * (5 + len(families)) + "|"]
    for name, r in cheap_results.items():
      listed = ", ".join(f"{k}={v}" for k, v in r["setting"].items() if k != "images")
      setting = f"{r['calibration_images']} images" + (f"; {listed}" if listed else "")
      rho = [f"{r['spearman_vs_truth'][f]['rho']:.2f}" + ("" if r["within_full_ci"][f] else "*")
             for f in families]
      md.append(f"| {name} | {setting} | {r['seconds']:.2f} | "
                f"{100 * r['fraction_of_sweep']:.1f}% | {r['seconds_cold']:.2f} | "
                + " | ".join(rho) + " |")
  md += ["", f"Hutchinson trace at {n} probes, warm: all layers in one HVP per probe "
         f"{trace_seconds['all_layers']:.2f} s, one HVP per layer per probe "
         f"{trace_seconds['per_layer']:.2f} s: **{speedup:.1f}x**" + (
             f"; all layers with each probe on {probe_examples} of the images (cheaper work "
             f"per probe, the cheap setting above) {trace_seconds['all_layers_cheap']:.2f} s: "
             f"{result['trace_all_layers_cheap_speedup']:.1f}x" if probe_examples else "")
         + ".", "",
         "Per probe (ms, warm; the probes of one call share one linearisation of the "
         "gradient): " + ("; ".join(
             f"`{l}` plain `jit(jvp(grad))` one probe at a time {1e3 * t['reference']:.2f}, our "
             f"per-layer estimator {1e3 * t['per_layer']:.2f} "
             f"({t['reference'] / t['per_layer']:.2f}x)" for l, t in per_probe["layers"].items())
                              or "no conv layer")
         + f"; our all-layer estimator {1e3 * per_probe['all_layers']:.2f} (every layer at once).",
         "",
         f"Targets: every data-dependent criterion <= {100 * TARGET_FRACTION:.0f}% of the sweep "
         f"(max {100 * result['max_data_dependent_fraction']:.1f}%: "
         f"{_met(result['targets_met']['fraction_of_sweep'])}; at the cheap settings max "
         f"{100 * result['max_data_dependent_fraction_cheap']:.1f}%: "
         f"{_met(result['targets_met']['fraction_of_sweep_cheap'])}, every rho inside the full "
         f"setting's interval: {_met(result['targets_met']['cheap_agreement'])}); all-layer "
         f"trace >= {TARGET_TRACE_SPEEDUP:.0f}x ({speedup:.1f}x: "
         f"{_met(result['targets_met']['trace_all_layers_speedup'])}); per "
         f"probe at least as fast as the plain `jvp(grad)` on every conv layer above ("
         f"{_met(result['targets_met']['per_probe_vs_reference'])})."]
  paths = {"json": io.write_json(os.path.join(workdir, "bench_criteria.json"), result),
           "md": io.write_text(os.path.join(workdir, "bench_criteria.md"), "\n".join(md) + "\n")}
  print("\n".join(md[2:]))
  return {"paths": paths, **{k: result[k] for k in (
      "model", "sweep_seconds", "trace_all_layers_speedup", "max_data_dependent_fraction",
      "max_data_dependent_fraction_cheap")}}
