"""safer_jax: which layers of a trained network can be perturbed, and which must be protected.

>>> import safer_jax as sj
>>> ds = sj.load_dataset("digits")                      # embedded, no download
>>> entry = sj.pretrained("resnet8", ds, seed=0)        # trains once, then restores (orbax)
>>> sj.evaluate(entry.model.apply, entry.variables, ds.eval)
{'accuracy': 0.98..., 'loss': 0.05..., 'num_examples': 359}
"""

from safer_jax import (acr, activations, attribution, benchmark, budget, criteria, data, layers,
                       mixed_precision, models, norms, perturb, plan, protection, pruning,
                       search, sweep, tasks, text, train, wcam, wrapping, zoo)
from safer_jax.data import Dataset, Split, load_dataset
from safer_jax.layers import find_layers, get_kernel, replace_kernel, select_layers
from safer_jax.models import get_model, list_models
from safer_jax.plan import BitBudget, Plan, ProtectBudget, RatioBudget, allocate
from safer_jax.sweep import SweepConfig, importance, run_sweep
from safer_jax.train import TrainConfig, evaluate, init_variables, task_loss_fn
from safer_jax.train import train as fit
from safer_jax.wrapping import WrappedModel, wrap
from safer_jax.zoo import pretrained



def __getattr__(name):  # `sj.deploy` on first use: importing qwix takes ~1 s
  if name == "deploy":
    import importlib  # pylint: disable=import-outside-toplevel
    return importlib.import_module("safer_jax.deploy")
  raise AttributeError(f"module 'safer_jax' has no attribute {name!r}")


__all__ = [
    "acr", "activations", "attribution", "benchmark", "budget", "criteria", "data", "deploy",
    "layers",
    "mixed_precision",
    "models", "norms", "perturb", "plan", "protection", "pruning", "search", "sweep", "tasks",
    "text", "train", "wcam", "wrapping", "zoo",
    "Dataset", "Split", "load_dataset",
    "find_layers", "get_kernel", "replace_kernel", "select_layers",
    "get_model", "list_models",
    "BitBudget", "Plan", "ProtectBudget", "RatioBudget", "allocate",
    "SweepConfig", "importance", "run_sweep",
    "TrainConfig", "evaluate", "fit", "init_variables", "task_loss_fn",
    "pretrained",
    "WrappedModel", "wrap",
]
