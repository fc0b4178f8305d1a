"""Reading results: figures and the per-workdir report.

* :mod:`~safer_jax.report.plots` -- figures of sensitivity tables (matplotlib, Agg
  backend; imported on first use, so ``import safer_jax`` leaves the backend alone);
* :mod:`~safer_jax.report.markdown` -- ``<workdir>/report.md`` and ``report.html``
  from the tables and figures the experiments wrote.

Imports :mod:`safer_jax.core` only.
"""

from safer_jax.report import markdown


def __getattr__(name):  # `report.plots` on first use: it switches matplotlib to Agg
  if name == "plots":
    import importlib  # pylint: disable=import-outside-toplevel
    return importlib.import_module("safer_jax.report.plots")
  raise AttributeError(f"module 'safer_jax.report' has no attribute {name!r}")


__all__ = ["markdown", "plots"]
