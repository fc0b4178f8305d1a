"""safer_jax: which layers of a trained network can be perturbed, and which must be protected.

>>> import safer_jax as sj
>>> ds = sj.load_dataset("digits")                      # embedded, no download
>>> entry = sj.pretrained("resnet8", ds, seed=0)        # trains once, then restores (orbax)
>>> sj.evaluate(entry.model.apply, entry.variables, ds.eval)
{'accuracy': 0.98..., 'loss': 0.05..., 'num_examples': 359}

The package, by role (each imports only the roles above it in this list):

* :mod:`safer_jax.core` -- layers, perturbations, norms, tasks, wrapping, data, I/O;
* :mod:`safer_jax.training` -- fit, evaluate, ACR training;
* :mod:`safer_jax.zoo` -- the model zoo: architectures, trained weights, corpora;
* :mod:`safer_jax.measure` and :mod:`safer_jax.criteria` -- layer sensitivity: the
  sweep's ground truth, calibrated grids, rank agreement, and the cheap criteria;
* :mod:`safer_jax.budgeting` -- per-layer budgets and the compressed model
  (:func:`allocate`, quantization, pruning, protection, qwix deployment);
* :mod:`safer_jax.report` -- figures and the per-workdir report (core only).
"""

from safer_jax import budgeting, core, criteria, measure, report, training, zoo
from safer_jax.budgeting.plan import (BitBudget, Plan, Planner, ProtectBudget, RatioBudget,
                                      allocate)
from safer_jax.core import tasks
from safer_jax.core.caches import clear_caches
from safer_jax.core.data import Dataset, Split, load_dataset
from safer_jax.core.layers import find_layers, get_kernel, replace_kernel, select_layers
from safer_jax.core.wrapping import WrappedModel, wrap
from safer_jax.measure.sweep import SweepConfig, importance, run_sweep
from safer_jax.training.train import TrainConfig, evaluate, init_variables, task_loss_fn
from safer_jax.training.train import train as fit
from safer_jax.zoo import models
from safer_jax.zoo.cache import pretrained
from safer_jax.zoo.models import get_model, list_models


def __getattr__(name):  # `sj.deploy` on first use: importing qwix takes ~1 s
  if name == "deploy":
    import importlib  # pylint: disable=import-outside-toplevel
    return importlib.import_module("safer_jax.budgeting.deploy")
  raise AttributeError(f"module 'safer_jax' has no attribute {name!r}")


__all__ = [
    "budgeting", "core", "criteria", "deploy", "measure", "models", "report", "tasks",
    "training", "zoo",
    "Dataset", "Split", "load_dataset",
    "find_layers", "get_kernel", "replace_kernel", "select_layers",
    "get_model", "list_models",
    "BitBudget", "Plan", "Planner", "ProtectBudget", "RatioBudget", "allocate",
    "SweepConfig", "importance", "run_sweep",
    "TrainConfig", "evaluate", "fit", "init_variables", "task_loss_fn",
    "pretrained",
    "WrappedModel", "wrap",
    "clear_caches",
]
