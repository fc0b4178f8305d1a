"""Benchmark: the vectorised sweep engine vs. the naive loop, in one run on one model.

Both compute the same full sweep (every layer x 4 families x >= 5 magnitudes x
seeds). The naive loop is one jitted full-model evaluation per perturbed model
in a Python loop (:func:`safer_jax.sweep.naive_sweep`); the engine is
:func:`safer_jax.sweep.run_sweep`. Each is timed twice in this process:
*cold* (first call: includes every XLA compilation it needs) and *warm* (second
call: compiled functions reused, the steady state of long sweeps and notebooks).
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

import os
import time

import jax
import jax.numpy as jnp
import numpy as np


from experiments import sensitivity
from safer_jax import io, sweep
from safer_jax import layers as layers_lib


def get_config(tiny: bool = False):
  config = sensitivity.get_config(tiny)
  config.model = "mlp" if tiny else "resnet8"
  return config


def _timed(fn):
  t0 = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - t0


def flop_ratio(entry, split, scfg, table) -> dict:
  """Per-layer per-copy FLOP fractions and the naive / engine FLOP ratio of the sweep.

  Returns ``{'full_flops': FLOPs of one forward of one eval batch, 'per_copy_fraction':
  {layer: per-copy FLOPs / full_flops}, 'ratio': float}``.
  """
  engine = sweep._Engine(entry.model, entry.variables, split, scfg)  # pylint: disable=protected-access
  images, labels, mask = engine.batches[0]
  full = jax.jit(entry.model.apply).lower(entry.variables, images).compile().cost_analysis()
  full_flops = float(full["flops"])
  fractions = {}
  for layer in dict.fromkeys(table["layer"]):
    stage = sweep._stage_of(entry.model, layer) if scfg.use_prefix else 0  # pylint: disable=protected-access
    fn = engine.eval_fn(layer, stage)
    h = engine.prefix(stage)[0]
    kernel = jnp.asarray(layers_lib.get_kernel(entry.variables, layer))
    flops = [float(fn.lower(entry.variables, jnp.stack([kernel] * p), h, labels, mask)
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
  kwargs = dict(progress=config.progress)
  naive_cold, t_naive_cold = _timed(lambda: sweep.naive_sweep(entry.model, entry.variables,
                                                              split, scfg, **kwargs))
  _, t_naive_warm = _timed(lambda: sweep.naive_sweep(entry.model, entry.variables, split, scfg,
                                                     **kwargs))
  fast_cold, t_fast_cold = _timed(lambda: sweep.run_sweep(entry.model, entry.variables, split,
                                                          scfg, **kwargs))
  _, t_fast_warm = _timed(lambda: sweep.run_sweep(entry.model, entry.variables, split, scfg,
                                                  **kwargs))
  acc_diff = float(np.max(np.abs(naive_cold["accuracy"].to_numpy()
                                 - fast_cold["accuracy"].to_numpy())))
  loss_diff = float(np.max(np.abs(naive_cold["loss"].to_numpy() - fast_cold["loss"].to_numpy())
                           / np.maximum(np.abs(naive_cold["loss"].to_numpy()), 1e-3)))
  same = (len(naive_cold) == len(fast_cold) and acc_diff <= 1e-6 and loss_diff <= 1e-4
          and list(naive_cold["layer"]) == list(fast_cold["layer"]))
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



