"""Benchmark: the vectorised sweep engine vs. the naive loop, in one run on one model.

Both compute the same full sweep (every layer x 4 families x >= 5 magnitudes x
seeds). The naive loop is one jitted full-model evaluation per perturbed model
in a Python loop (:func:`safer_jax.measure.sweep.naive_sweep`); the engine is
:func:`safer_jax.measure.sweep.run_sweep`. Each is timed in this process *cold* (first
call: includes every XLA compilation it needs) and *warm* (compiled functions
reused, the steady state of long sweeps and notebooks: the median of
``warm_runs`` calls, the two methods' calls interleaved).
The tables must agree (accuracy to 1e-6, loss to 1e-4 relative) or the run fails.

It also reports the *FLOP ratio*: any method that evaluates every perturbed
model exactly must re-run, per perturbed copy, the network from the perturbed
layer on. XLA's cost analysis of the engine's compiled call with 1 and 2 copies
gives those per-copy FLOPs for each layer; the ratio is ``sum over cells of
full-forward FLOPs / sum of per-copy FLOPs``: the speed-up that saving work
alone gives, at equal FLOP rates. A measured speed-up above it means the engine
also runs its FLOPs faster than the naive loop (batched copies make larger
matrix products, one call replaces hundreds of dispatches). Writes
``bench.json`` and ``bench.md``.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np


from experiments import common, sensitivity
from safer_jax.core import io
from safer_jax.core import layers as layers_lib
from safer_jax.measure import sweep


TEXT_MODELS_OK = True  # a language model is swept on its token loss (the dataset's task)


def get_config(tiny: bool = False):
  """The sensitivity sweep's setting on resnet8, plus the small job.

  Fields (besides :func:`experiments.sensitivity.get_config`):
    small_family, small_grid: the small job: one family over this grid on every
      layer (default: quantization at 8, 6, 4, 3, 2 bits, 50 cells on resnet8),
      where compilation is most of a first run.
    warm_runs: warm times are the median of this many calls per method,
      interleaved with the other method's.
  """
  config = sensitivity.get_config(tiny)
  config.model = "mlp" if tiny else "resnet8"
  config.small_family = "quantize"
  config.small_grid = (8, 4) if tiny else (8, 6, 4, 3, 2)
  config.warm_runs = 1 if tiny else 3
  return config


def validate(config, check: common.Checker) -> None:
  """bench_sweep's own field (the shared ones are checked as for every experiment)."""
  check.rule("warm_runs", common.COUNT)


def _timed(fn):
  t0 = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - t0


def _counting_compiles(fn) -> tuple:
  """``(fn()'s result, seconds, XLA compilations during the call)``."""
  compiles = []
  listener = lambda event, seconds, **kw: compiles.append(event == _COMPILE_EVENT)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    out, seconds = _timed(fn)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  return out, seconds, sum(compiles)


def cold_and_warm(fns: dict, warm_runs: int) -> dict:
  """Cold and warm seconds of each of ``fns`` (``{method: fn}``, all computing one job).

  Cold: each ``fn()`` after emptying JAX's caches (every program compiled, none
  shared with another method). Warm: the median of ``warm_runs`` calls per
  method, interleaved (``a, b, a, b, ...``: a machine that slows down or speeds
  up during the run weighs on both alike), after one untimed call of every
  method whose programs a later method's cold call emptied.

  Returns ``{method: {'table' (the cold call's), 'cold_s', 'warm_s', 'warm_runs_s',
  'compiles_cold', 'compiles_warm'}}``.
  """
  out = {}
  for method, fn in fns.items():
    jax.clear_caches()
    sweep.clear_compiled()
    table, cold, n_cold = _counting_compiles(fn)
    out[method] = {"table": table, "cold_s": cold, "compiles_cold": n_cold,
                   "warm_runs_s": [], "compiles_warm": 0}
  for method in list(fns)[:-1]:
    fns[method]()  # compiles again what the later cold calls emptied (untimed)
  for _ in range(warm_runs):
    for method, fn in fns.items():
      _, seconds, n = _counting_compiles(fn)
      out[method]["warm_runs_s"].append(seconds)
      out[method]["compiles_warm"] += n
  for entry in out.values():
    entry["warm_s"] = float(np.median(entry["warm_runs_s"]))
  return out


_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def flop_ratio(entry, split, scfg, table) -> dict:
  """Per-layer per-copy FLOP fractions and the naive / engine FLOP ratio of the sweep.

  Returns ``{'full_flops': FLOPs of one forward of one eval batch, 'per_copy_fraction':
  {layer: per-copy FLOPs / full_flops}, 'ratio': float}``.
  """
  engine = sweep.Engine(entry.model, entry.variables, split, scfg, task=entry.task)
  images, batch, mask = engine.batches[0]
  full = jax.jit(entry.model.apply).lower(entry.variables, images).compile().cost_analysis()
  full_flops = float(full["flops"])
  fractions = {}
  for layer in dict.fromkeys(table["layer"]):
    stage = engine.stage_of(layer)  # (invariant work is not per copy: XLA hoists it)
    fn = engine.eval_fn(layer, stage)
    h = engine.prefix(stage)[0]
    kernel = jnp.asarray(layers_lib.get_kernel(entry.variables, layer))
    flops = [float(fn.lower(entry.variables, jnp.stack([kernel] * p), h, batch, mask)
                   .compile().cost_analysis()["flops"]) for p in (1, 2)]
    fractions[layer] = (flops[1] - flops[0]) / full_flops
  cells = table.groupby("layer", sort=False).size()
  ratio = float(cells.sum() / sum(cells[l] * f for l, f in fractions.items()))
  return {"full_flops": full_flops, "per_copy_fraction": fractions, "ratio": ratio}


def run(config, workdir: str) -> dict:
  # Cold timings must include compilation: no persistent XLA cache for this run.
  jax.config.update("jax_enable_compilation_cache", False)
  entry, split = sensitivity.load(config)
  scfg = sensitivity.sweep_config(config)
  kwargs = dict(progress=config.progress, task=entry.task)
  score = next(iter(entry.task.metrics), "loss")  # accuracy, token_accuracy, ...
  jobs = {"full": scfg,
          "small": dataclasses.replace(scfg, families={config.small_family:
                                                       tuple(config.small_grid)})}
  runs = {}
  for job, job_cfg in jobs.items():
    timed = cold_and_warm(
        {method: lambda f=fn, c=job_cfg: f(entry.model, entry.variables, split, c, **kwargs)
         for method, fn in (("naive", sweep.naive_sweep), ("engine", sweep.run_sweep))},
        config.warm_runs)
    for method, times in timed.items():
      runs[job, method] = times
      print(f"{job} {method}: cold {times['cold_s']:.2f} s ({times['compiles_cold']} "
            f"compilations), warm {times['warm_s']:.2f} s (median of "
            f"{', '.join(f'{t:.2f}' for t in times['warm_runs_s'])})", flush=True)
  naive_cold, fast_cold = runs["full", "naive"]["table"], runs["full", "engine"]["table"]
  t_naive_cold, t_naive_warm = runs["full", "naive"]["cold_s"], runs["full", "naive"]["warm_s"]
  t_fast_cold, t_fast_warm = runs["full", "engine"]["cold_s"], runs["full", "engine"]["warm_s"]
  acc_diff = float(np.max(np.abs(naive_cold[score].to_numpy()
                                 - fast_cold[score].to_numpy())))
  loss_diff = float(np.max(np.abs(naive_cold["loss"].to_numpy() - fast_cold["loss"].to_numpy())
                           / np.maximum(np.abs(naive_cold["loss"].to_numpy()), 1e-3)))
  same = (len(naive_cold) == len(fast_cold) and acc_diff <= 1e-6 and loss_diff <= 1e-4
          and list(naive_cold["layer"]) == list(fast_cold["layer"]))
  small_naive, small_fast = runs["small", "naive"]["table"], runs["small", "engine"]["table"]
  same = same and len(small_naive) == len(small_fast) and float(np.max(np.abs(
      small_naive[score].to_numpy() - small_fast[score].to_numpy()))) <= 1e-6
  small = {"cells": len(small_fast), "family": config.small_family,
           "grid": list(config.small_grid),
           **{f"{m}_{k}": runs["small", m][k] for m in ("naive", "engine")
              for k in ("cold_s", "warm_s", "compiles_cold")},
           "speedup_cold": runs["small", "naive"]["cold_s"] / runs["small", "engine"]["cold_s"],
           "speedup_warm": runs["small", "naive"]["warm_s"] / runs["small", "engine"]["warm_s"]}
  flops = flop_ratio(entry, split, scfg, fast_cold)
  device = f"{jax.default_backend()} ({jax.device_count()} x {jax.devices()[0].device_kind}, " \
           f"{os.cpu_count()} CPU cores visible)"
  result = {
      "model": entry.name, "dataset": entry.dataset.name, "eval_examples": len(split),
      "cells": len(fast_cold), "layers": int(fast_cold["layer"].nunique()),
      "families": {k: list(v) for k, v in scfg.grids().items()}, "seeds": list(scfg.seeds),
      "device": device, "naive_cold_s": t_naive_cold, "naive_warm_s": t_naive_warm,
      "engine_cold_s": t_fast_cold, "engine_warm_s": t_fast_warm,
      "speedup_cold": t_naive_cold / t_fast_cold, "speedup_warm": t_naive_warm / t_fast_warm,
      "compiles_cold": {m: runs["full", m]["compiles_cold"] for m in ("naive", "engine")},
      "compiles_warm": {m: runs["full", m]["compiles_warm"] for m in ("naive", "engine")},
      "warm_runs_s": {m: runs["full", m]["warm_runs_s"] for m in ("naive", "engine")},
      "strategy": sweep.engine_strategy(scfg, False), "small_job": small,
      "flop_ratio": flops["ratio"], "per_copy_flop_fraction": flops["per_copy_fraction"],
      "max_accuracy_diff": acc_diff, "max_loss_rel_diff": loss_diff, "same_numbers": same,
      "versions": io.versions()}
  md = [f"# bench_sweep: {entry.name} on {entry.dataset.name} ({len(split)} eval images)", "",
        f"{result['cells']} cells = {result['layers']} layers x "
        f"{len(result['families'])} families x magnitudes x seeds {list(scfg.seeds)}; "
        f"device: {device}", "",
        "| | naive loop | engine | speed-up |", "|---|---|---|---|",
        f"| cold (incl. compilation) | {t_naive_cold:.1f} s | {t_fast_cold:.1f} s | "
        f"{result['speedup_cold']:.2f}x |",
        f"| warm (compiled) | {t_naive_warm:.1f} s | {t_fast_warm:.1f} s | "
        f"{result['speedup_warm']:.2f}x |",
        f"| XLA compilations, cold | {result['compiles_cold']['naive']} | "
        f"{result['compiles_cold']['engine']} | |",
        f"| small job cold ({small['cells']} cells: {small['family']} {small['grid']}) | "
        f"{small['naive_cold_s']:.1f} s | {small['engine_cold_s']:.1f} s | "
        f"{small['speedup_cold']:.2f}x |",
        f"| small job warm | {small['naive_warm_s']:.2f} s | {small['engine_warm_s']:.2f} s | "
        f"{small['speedup_warm']:.2f}x |",
        f"| FLOP ratio (work saved alone) | | | {flops['ratio']:.2f}x |", "",
        "Per-copy FLOPs of the engine (from the perturbed layer on) as a fraction of a full "
        "forward: " + ", ".join(f"{l} {f:.2f}" for l, f in flops["per_copy_fraction"].items())
        + ".", "",
        f"Same numbers: {same} (max |accuracy diff| {acc_diff:.2e}, max relative loss diff "
        f"{loss_diff:.2e})."]
  paths = {"json": io.write_json(os.path.join(workdir, "bench.json"), result),
           "md": io.write_text(os.path.join(workdir, "bench.md"), "\n".join(md) + "\n")}
  print("\n".join(md[4:]))
  if not same:
    raise RuntimeError(f"Engine and naive loop disagree: {acc_diff=} {loss_diff=}")
  return {"paths": paths, **result}



