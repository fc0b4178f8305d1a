"""Registry of layer-sensitivity criteria, selected by name."""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from safer_jax.core.progress import Progress
from safer_jax.criteria import _common
from safer_jax.criteria import corruption, curvature, data_free, gradient, integrated
from safer_jax.criteria import settings

Criterion = Callable[..., _common.Scores]

_RAW: dict[str, Criterion] = {
    # Data-free (no forward pass).
    "random": data_free.random,
    "param_count": data_free.param_count,
    "weight_norm": data_free.weight_norm,
    "quant_error": data_free.quant_error,
    "spectral_norm": data_free.spectral_norm,
    # Gradient (1 forward + 1 backward pass per batch).
    "grad_norm": gradient.grad_norm,
    "taylor": gradient.taylor,
    "taylor_abs": gradient.taylor_abs,
    "fisher": gradient.fisher,
    # Curvature (Hessian-vector products).
    "hessian_trace": curvature.hessian_trace,
    "top_eigenvalue": curvature.top_eigenvalue,
    "hawq_v2": curvature.hawq_v2,
    # Worst-case parameter corruption.
    "corruption_first_order": corruption.corruption_first_order,
    "corruption_pga": corruption.corruption_pga,
    # Integrated gradients over the weights.
    "integrated_gradients": integrated.integrated_gradients,
}

# The public criteria: the expensive ones take ``setting='cheap'|'full'`` and ``examples``
# (:mod:`safer_jax.criteria.settings`), the cheap setting by default.
CRITERIA: dict[str, Criterion] = {
    name: settings.tiered(name)(fn) if name in settings.OPTIONS else fn
    for name, fn in _RAW.items()}


# Public estimators that are not criteria of their own but give one, by name: ``hutchinson_trace``
# returns a TraceEstimate per layer; as a criterion its score is the estimate's mean — what
# ``hessian_trace`` returns — computed with hutchinson_trace's own defaults (the ranking rule;
# options as hutchinson_trace takes them). Not in CRITERIA: benchmarks and sweeps over every
# criterion run hessian_trace once.
ALIASES: dict[str, Criterion] = {"hutchinson_trace": curvature.hessian_trace}


def get_criterion(name: str) -> Criterion:
  """Returns the criterion registered as ``name`` (a key of ``CRITERIA`` or ``ALIASES``).

  Raises:
    ValueError: unknown name (the message lists the valid ones).
  """
  try:
    return CRITERIA[name] if name in CRITERIA else ALIASES[name]
  except (KeyError, TypeError):
    raise ValueError(f"Unknown criterion {name!r}; valid names: "
                     f"{sorted([*CRITERIA, *ALIASES])}.") from None


def compute_all(names: str | Sequence[str], loss_fn: _common.LossFn | None, params: _common.Params,
                batches: Any, *, layers: Any = None, key: jax.Array | None = None,
                options: Mapping[str, Mapping[str, Any]] | None = None,
                progress: bool = False) -> tuple[dict[str, _common.Scores], dict[str, float]]:
  """Runs several criteria on the same model and data.

  Args:
    names: criterion names (keys of ``CRITERIA``, or ``'hutchinson_trace'``:
      each layer's estimate's mean, see ``ALIASES``), or one name.
    loss_fn: ``loss_fn(params, batch) -> scalar`` (may be ``None`` if only
      data-free criteria are requested).
    params: Flax params pytree.
    batches: sequence of batches (materialised once as a list, so an iterator
      is consumed once and reused by every criterion).
    layers: ``None`` or regex pattern(s), shared by all criteria.
    key: ``jax.random`` key passed unchanged to every criterion.
    options: optional ``{name: {option: value}}`` extra keyword arguments.
    progress: show criteria done with an ETA, and the inner progress (probes,
      iterations, layers) of the criteria that take a ``progress`` flag (stderr).

  Returns:
    ``(scores, seconds)``: ``scores[name] = {layer: score}`` and
    ``seconds[name]`` the wall time of that criterion (its results are Python
    floats, so all device work has finished; includes compilation).

  Raises:
    ValueError: an unknown name or option key, or any criterion's error.
  """
  if isinstance(names, str):
    names = [names]
  fns = {name: get_criterion(name) for name in names}
  options = dict(options or {})
  unknown = sorted(set(options) - set(fns))
  if unknown:
    raise ValueError(f"`options` names criteria that were not requested: {unknown}.")
  if batches is not None and not isinstance(batches, Mapping):
    batches = list(batches)
  scores, seconds = {}, {}
  bar = Progress(len(fns), "criteria", enabled=progress and len(fns) > 1, unit="criterion")
  for name, fn in fns.items():
    start = time.perf_counter()
    extra = dict(options.get(name, {}))
    if progress and "progress" in inspect.signature(fn).parameters:
      extra.setdefault("progress", True)
    result = fn(loss_fn, params, batches, layers=layers, key=key, **extra)
    jax.block_until_ready(list(result.values()))
    seconds[name] = time.perf_counter() - start
    scores[name] = result
    bar.update(1, postfix=f"{name} {seconds[name]:.1f}s")
  bar.close()
  return scores, seconds
