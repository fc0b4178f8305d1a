"""Does the sweep fit an accelerator? Memory estimates per chunking, and the automatic choice.

``python launch.py --experiment=memory_check`` (default: ResNet-50 at 224x224x3,
1000 classes, a 16 GB budget) estimates, without allocating the model, what one
compiled sweep call needs for every ``max_parallel x eval_batch_size`` of the
grid (XLA's memory analysis of the engine's own function, for the backend this
runs on: on CPU an estimate of a GPU's need; see :mod:`safer_jax.measure.memory`),
marks what fits the budget and prints the chunking ``SweepConfig(
memory_budget_bytes=...)`` would pick. Writes ``memory.json`` and ``memory.md``.
"""

from __future__ import annotations

import os
import time

import jax

from experiments import common, sensitivity
from safer_jax.core import io
from safer_jax.measure import memory, sweep
from safer_jax.zoo import models

GB = memory.GB


def get_config(tiny: bool = False):
  config = common.base_config(model="resnet50", dataset="imagenet")
  config.image_size = 224
  config.channels = 3
  config.num_classes = 1000
  config.budget_gb = 16.0  # what JAX may use on the device (10**9 bytes)
  config.margin = 1.25  # safety factor on the compiled call's estimate
  config.max_parallels = (1, 2, 4, 8, 16, 32)
  config.batch_sizes = (32, 64, 128)
  config.eval_examples = 1000  # cached prefix activations scale with it
  config.max_parallel = 64  # upper bounds for the automatic choice
  config.eval_batch_size = 128
  config.use_prefix = True
  config.check_layers = True  # also measure the other probe layers at one chunking
  if tiny:
    config.model = "resnet8"
    config.image_size = 16
    config.num_classes = 10
    config.budget_gb = 0.02
    config.max_parallels = (1, 4)
    config.batch_sizes = (8, 32)
    config.eval_examples = 64
    config.max_parallel = 8
    config.eval_batch_size = 32
  return config


def validate(config, check: common.Checker) -> None:
  """Model shape, budget and the chunking grid (see :func:`common.validate_config`)."""
  check.rule("image_size", common.COUNT)
  check.rule("channels", common.COUNT)
  check.rule("num_classes", common.COUNT)
  check.rule("budget_gb", common.number(0, lo_open=True, note="10**9 bytes"))
  check.rule("margin", common.number(1, note="safety factor"))
  check.rule("max_parallels", common.sequence(common.COUNT))
  check.rule("batch_sizes", common.sequence(common.COUNT))
  check.rule("use_prefix", common.boolean())
  check.rule("check_layers", common.boolean())


def _copies_per_layer(config) -> int:
  """Cells per layer of the default sensitivity sweep (its families, grids and seeds)."""
  scfg = sensitivity.sweep_config(sensitivity.get_config())
  return sum(len(sweep.cells("layer", f, g, scfg.seeds, scfg.family_options.get(f, {})))
             for f, g in scfg.grids().items())


def run(config, workdir: str) -> dict:
  t_start = time.perf_counter()
  model = models.get_model(config.model, num_classes=config.num_classes)
  shape = (config.image_size, config.image_size, config.channels)
  variables = memory.abstract_variables(model, shape)
  order = memory.layer_order(model, variables, shape)
  copies = _copies_per_layer(config)
  budget = int(config.budget_gb * GB)
  n = config.eval_examples or None
  first = order[0]
  kwargs = dict(num_examples=n, num_copies=copies, use_prefix=config.use_prefix)
  resident = max((sum(memory.resident_bytes(model, variables, shape, l, b, **kwargs))
                  for l in order for b in config.batch_sizes))
  grid = []
  for b in config.batch_sizes:
    for p in config.max_parallels:
      t0 = time.perf_counter()
      e = memory.memory_breakdown(model, variables, shape, first, p, b, **kwargs)
      res = max(sum(memory.resident_bytes(model, variables, shape, l, b, **kwargs))
                for l in order)
      needed = int(config.margin * e.program) + res
      grid.append({"max_parallel": p, "eval_batch_size": e.eval_batch_size,
                   "program_gb": e.program / GB, "temps_gb": e.temps / GB,
                   "arguments_gb": e.arguments / GB, "resident_gb": res / GB,
                   "needed_gb": needed / GB, "fits": needed <= budget,
                   "seconds": time.perf_counter() - t0})
  layers_check = []
  if config.check_layers:
    p, b = config.max_parallels[min(2, len(config.max_parallels) - 1)], config.batch_sizes[0]
    for layer in memory.probe_layers(model, variables, shape, order,
                                     use_prefix=config.use_prefix):
      e = memory.memory_breakdown(model, variables, shape, layer, p, b, **kwargs)
      layers_check.append({"layer": layer, "max_parallel": p, "eval_batch_size": b,
                           "program_gb": e.program / GB, "prefix_gb": e.prefix / GB,
                           "kernels_gb": e.kernels / GB})
  stage_in = memory.stage_inputs(model, variables, shape)
  per_example = max((memory.tree_bytes(h) for h in stage_in[1:]), default=0)  # batch of 1
  choice, error = None, None
  t0 = time.perf_counter()
  try:
    c = memory.plan_chunking(model, variables, shape, order, budget,
                             max_parallel=config.max_parallel,
                             eval_batch_size=config.eval_batch_size, num_examples=n,
                             copies=copies, margin=config.margin, use_prefix=config.use_prefix)
    choice = {"max_parallel": c.max_parallel, "eval_batch_size": c.eval_batch_size,
              "needed_gb": c.needed_bytes / GB, "worst_layer": c.worst.layer,
              "program_gb": c.worst.program / GB, "resident_gb": c.worst.resident / GB,
              "probes": list(c.probes)}
  except ValueError as e:
    error = str(e)
  t_plan = time.perf_counter() - t0
  result = {"model": config.model, "input_shape": list(shape), "num_classes": config.num_classes,
            "num_params": memory.tree_bytes(variables["params"]) // 4,
            "budget_gb": config.budget_gb, "margin": config.margin,
            "backend": jax.default_backend(),
            "eval_examples": n, "copies_per_layer": copies, "first_layer": first,
            "layers": len(order), "largest_prefix_bytes_per_example": per_example,
            "max_resident_gb": resident / GB, "grid": grid, "layers_check": layers_check,
            "auto": choice, "auto_error": error, "auto_seconds": t_plan,
            "seconds": time.perf_counter() - t_start, "versions": io.versions()}
  md = _markdown(config, result)
  paths = {"json": io.write_json(os.path.join(workdir, "memory.json"), result),
           "md": io.write_text(os.path.join(workdir, "memory.md"), md)}
  print(md)
  return {"paths": paths, **result}


def _markdown(config, r) -> str:
  ps = list(config.max_parallels)
  lines = [f"# memory_check: {r['model']} at {'x'.join(map(str, r['input_shape']))}, "
           f"{r['num_classes']} classes, budget {r['budget_gb']:g} GB", "",
           f"Estimated device memory (GB = 10^9 bytes) of the sweep on the worst layer "
           f"(`{r['first_layer']}`: the longest vmapped suffix), all copies of a chunk in one "
           f"`vmap` (the accelerator setting). needed = {r['margin']} (margin) x compiled call "
           f"(XLA memory analysis on {r['backend']}: arguments + outputs + temps - aliases) + "
           f"resident buffers ({r['eval_examples']} eval examples of prefix activations, "
           f"{r['copies_per_layer']} perturbed kernels per layer; the largest over layers). "
           f"✓ = fits {r['budget_gb']:g} GB.", "",
           "| eval_batch_size \\ max_parallel | " + " | ".join(map(str, ps)) + " |",
           "|---|" + "---|" * len(ps)]
  for b in config.batch_sizes:
    cells = [g for g in r["grid"] if g["eval_batch_size"] == min(b, r["eval_examples"] or b)]
    row = [f"{g['needed_gb']:.3g} {'✓' if g['fits'] else '✗'}" for g in cells]
    lines.append(f"| {b} | " + " | ".join(row) + " |")
  lines += ["", "Compiled call alone (GB, no margin): " + "; ".join(
      f"P={g['max_parallel']} B={g['eval_batch_size']}: {g['program_gb']:.3g}" for g in r["grid"]),
            "", f"Largest resident buffers: {r['max_resident_gb']:.2f} GB (prefix activations "
            f"cached for every eval batch: up to {r['largest_prefix_bytes_per_example'] / 1e6:.2f} "
            f"MB per example and stage)."]
  if r["layers_check"]:
    lines += ["", "Other probe layers at one chunking (compiled call GB; resident prefix and "
              "kernels):"]
    lines += [f"- `{c['layer']}` P={c['max_parallel']} B={c['eval_batch_size']}: "
              f"{c['program_gb']:.2f} GB (+ prefix {c['prefix_gb']:.2f}, kernels "
              f"{c['kernels_gb']:.3f})" for c in r["layers_check"]]
  lines.append("")
  if r["auto"]:
    a = r["auto"]
    lines.append(f"Automatic choice for {r['budget_gb']:g} GB (`SweepConfig(memory_budget_bytes="
                 f"{int(r['budget_gb'] * GB)})`, upper bounds max_parallel={config.max_parallel}, "
                 f"eval_batch_size={config.eval_batch_size}): **max_parallel={a['max_parallel']}, "
                 f"eval_batch_size={a['eval_batch_size']}**, needing {a['needed_gb']:.2f} GB "
                 f"(worst compiled call {a['program_gb']:.2f} GB on `{a['worst_layer']}` + "
                 f"{a['resident_gb']:.2f} GB resident); {r['auto_seconds']:.0f} s to plan.")
  else:
    lines.append(f"Automatic choice: none fits. {r['auto_error']}")
  return "\n".join(lines) + "\n"
