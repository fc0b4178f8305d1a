"""Benchmark: sweep throughput vs. number of devices, and the same table on every count.

``python launch.py --experiment=bench_devices`` runs the ``sensitivity`` sweep of
one model once per device count in ``config.devices``, each in a fresh
subprocess that sees that many devices:

* on CPU, ``--xla_force_host_platform_device_count=N`` fake devices (they share
  the machine's cores, so this measures the sharding overhead, not a speed-up);
* on GPU, ``CUDA_VISIBLE_DEVICES`` = the first N GPUs.

Each subprocess times the sweep twice (cold: with compilation; warm: compiled)
and the tables must agree across device counts (accuracy exactly, loss to 1e-5
relative), or the run fails. Writes ``devices.json`` and ``devices.md``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np

from experiments import common, sensitivity
from safer_jax.core import io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = """
import json, sys, time
import jax, numpy as np
from experiments import sensitivity
from safer_jax.measure import sweep
config = sensitivity.get_config()
config.update(json.loads(sys.argv[1]))
entry, split = sensitivity.load(config)
scfg = sensitivity.sweep_config(config)
times = []
for _ in range(2):
  t0 = time.perf_counter()
  table = sweep.run_sweep(entry.model, entry.variables, split, scfg, progress=False)
  times.append(time.perf_counter() - t0)
print("RESULT " + json.dumps({
    "devices": jax.local_device_count(), "kind": jax.devices()[0].device_kind,
    "cold_s": times[0], "warm_s": times[1], "cells": len(table),
    "accuracy": table["accuracy"].tolist(), "loss": table["loss"].tolist()}))
"""


def get_config(tiny: bool = False):
  config = sensitivity.get_config(tiny)
  config.devices = (1, 2) if tiny else (1, 2, 4, 8)
  config.timeout_s = 1200
  return config


def _child_env(n: int, backend: str) -> dict:
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  if backend == "cpu":
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
    env["JAX_PLATFORMS"] = "cpu"
  elif backend == "gpu":
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(n))
  return env


def run(config, workdir: str) -> dict:
  backend = jax.default_backend()
  if backend not in ("cpu", "gpu"):
    raise ValueError(f"bench_devices restricts the device count on 'cpu' (fake devices) and "
                     f"'gpu' (CUDA_VISIBLE_DEVICES), not on {backend!r}.")
  counts = [int(n) for n in config.devices]
  if not counts or min(counts) < 1:
    raise ValueError(f"devices={config.devices} must be positive device counts, e.g. (1, 2, 4).")
  if backend == "gpu" and max(counts) > jax.local_device_count():
    raise ValueError(f"devices={config.devices}: only {jax.local_device_count()} GPUs here.")
  entry = common.pretrained(config)  # train / restore once here, so children only restore.
  overrides = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()
               if k not in ("devices", "timeout_s")}
  overrides["cache_dir"] = os.path.dirname(entry.path) if not config.checkpoint else None
  rows = []
  for n in counts:
    print(f"[bench_devices] {n} device(s) ...", flush=True)
    out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(overrides)], cwd=ROOT,
                         env=_child_env(n, backend), capture_output=True, text=True,
                         timeout=config.timeout_s, check=False)
    lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
      raise RuntimeError(f"The {n}-device run failed (rc {out.returncode}):\n{out.stderr[-3000:]}")
    rows.append(json.loads(lines[-1][len("RESULT "):]))
  ref = rows[0]
  same = all(np.array_equal(r["accuracy"], ref["accuracy"])
             and np.allclose(r["loss"], ref["loss"], rtol=1e-5, atol=1e-7) for r in rows)
  table = [{"devices": r["devices"], "kind": r["kind"], "cells": r["cells"],
            "cold_s": round(r["cold_s"], 2), "warm_s": round(r["warm_s"], 2),
            "cells_per_s_warm": round(r["cells"] / r["warm_s"], 1),
            "speedup_warm_vs_1": round(ref["warm_s"] / r["warm_s"], 2)} for r in rows]
  md = [f"# bench_devices: {entry.name} on {entry.dataset.name} ({backend}, "
        f"{os.cpu_count()} CPU cores visible)", "",
        "| devices | cold (s) | warm (s) | cells/s (warm) | warm speed-up vs 1 |",
        "|---|---|---|---|---|"]
  md += [f"| {t['devices']} | {t['cold_s']} | {t['warm_s']} | {t['cells_per_s_warm']} | "
         f"{t['speedup_warm_vs_1']}x |" for t in table]
  md += ["", f"Same table on every device count: {same}."]
  if backend == "cpu":
    md += ["", "Fake CPU devices share the same cores: this checks that sharding is correct and "
           "measures its overhead; it cannot show a speed-up."]
  paths = {"json": io.write_json(os.path.join(workdir, "devices.json"),
                                 {"model": entry.name, "backend": backend, "rows": table,
                                  "same_table": same, "versions": io.versions()}),
           "md": io.write_text(os.path.join(workdir, "devices.md"), "\n".join(md) + "\n")}
  print("\n".join(md[2:]))
  if not same:
    raise RuntimeError("The sweep table differs between device counts.")
  return {"paths": paths, "rows": table, "same_table": same}
