"""Experiment registry: ``launch.py --experiment=NAME`` runs ``experiments/<module>.run``.

Each experiment module defines ``get_config(tiny: bool = False) -> ConfigDict``
and ``run(config, workdir) -> dict`` (the paths and headline numbers it wrote).
The ``tiny`` setting runs in seconds and is what the tests use.
"""

from __future__ import annotations

import importlib
from types import ModuleType

REGISTRY: dict[str, str] = {
    "criteria_benchmark": "experiments.criteria_benchmark",
    "train": "experiments.train",
    "sensitivity": "experiments.sensitivity",
    "bench_sweep": "experiments.bench_sweep",
    "quant_sweep": "experiments.quant_sweep",
    "prune_sweep": "experiments.prune_sweep",
    "bitflip_protect": "experiments.bitflip_protect",
    "attribution_preservation": "experiments.attribution_preservation",
    "corruption": "experiments.corruption",
    "acr_train": "experiments.acr_train",
    "memory_check": "experiments.memory_check",
    "bench_devices": "experiments.bench_devices",
    "bench_criteria": "experiments.bench_criteria",
    "trace_calibration": "experiments.trace_calibration",
}


def list_experiments() -> list[str]:
  return sorted(REGISTRY)


def get_experiment(name: str) -> ModuleType:
  """Imports the experiment module registered as ``name``.

  Raises:
    ConfigError: unknown name (a ValueError; the message lists the valid names).
  """
  if name not in REGISTRY:
    from safer_jax.core.errors import ConfigError  # pylint: disable=import-outside-toplevel
    raise ConfigError(f"Unknown experiment {name!r}; valid experiments: {list_experiments()}")
  return importlib.import_module(REGISTRY[name])
