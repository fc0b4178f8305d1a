"""From sensitivities to a compressed model: per-layer budgets, and applying them.

* :mod:`~safer_jax.budgeting.plan` -- ``safer_jax.allocate(model, variables, data,
  budget)`` -> a :class:`~safer_jax.budgeting.plan.Plan`; a
  :class:`~safer_jax.budgeting.plan.Planner` for many budgets (each cost table once);
* :mod:`~safer_jax.budgeting.budget` -- bit widths / pruning ratios under a budget
  (exact knapsack);
* :mod:`~safer_jax.budgeting.mixed_precision`, :mod:`~safer_jax.budgeting.pruning` --
  cost tables and the quantized / pruned model;
* :mod:`~safer_jax.budgeting.search` -- a batched local search that measures
  candidate allocations;
* :mod:`~safer_jax.budgeting.protection` -- protecting layers against bit flips;
* :mod:`~safer_jax.budgeting.wcam` -- compressing, then fine-tuning to keep the
  attributions;
* :mod:`~safer_jax.budgeting.deploy` -- qwix rules and real quantized execution
  (imported on first use: importing qwix takes about a second).

Imports :mod:`safer_jax.core`, :mod:`safer_jax.training`, :mod:`safer_jax.measure` and
:mod:`safer_jax.criteria`.
"""

from safer_jax.budgeting import budget, mixed_precision, plan, protection, pruning, search, wcam


def __getattr__(name):  # `budgeting.deploy` on first use: importing qwix takes ~1 s
  if name == "deploy":
    import importlib  # pylint: disable=import-outside-toplevel
    return importlib.import_module("safer_jax.budgeting.deploy")
  raise AttributeError(f"module 'safer_jax.budgeting' has no attribute {name!r}")


__all__ = ["budget", "deploy", "mixed_precision", "plan", "protection", "pruning", "search",
           "wcam"]
