"""The two settings of each expensive criterion: ``'cheap'`` (the default) and ``'full'``.

A criterion stands in for the ground-truth sweep only if it costs a small
part of it. Each expensive criterion therefore defaults to the cheapest
setting tried whose Spearman rho against the sweep stays inside the 95%
bootstrap interval of its full setting, on every model ``bench_criteria`` was
run on (``python launch.py --experiment=bench_criteria``; each run writes the
check). The full setting is one keyword away: ``setting='full'``. Options
passed explicitly override either setting.

``examples``: the criterion sees only the first ``examples`` examples of the
batches it is given (pooled into one batch; all of them if there are fewer).
A setting's ``probe_examples`` (Hutchinson) likewise applies only where the
batches hold more examples than it.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

SETTINGS = ("cheap", "full")

# Hutchinson: a fixed 20 probes, each on 12 examples drawn from all the batches.
_HUTCHINSON = {"cheap": {"stop": None, "max_probes": 20, "chunk_size": 4, "probe_examples": 12},
               "full": {"max_probes": 64}}

OPTIONS: dict[str, dict[str, dict[str, Any]]] = {
    "fisher": {"cheap": {"examples": 64}, "full": {}},
    "hessian_trace": _HUTCHINSON,
    "hawq_v2": _HUTCHINSON,
    # (Each of their calls differentiates the whole network, one program for every layer:
    # few examples and nodes keep the warm cost small. Top eigenvalue, warm % of the warm sweep
    # on mobilenet_v2 / resnet20 / vit_tiny, one idle run: 2 Lanczos steps on 8 examples 6.9 /
    # 4.7 / 3.6, 3 steps 9.0 / 7.2 / 7.3, 3 steps on 4 examples 10.4 / 4.6 / 5.4; every rho
    # inside the full setting's interval with each.)
    "top_eigenvalue": {"cheap": {"examples": 8, "max_iter": 2}, "full": {"max_iter": 20}},
    "corruption_pga": {"cheap": {"examples": 16, "steps": 1}, "full": {"steps": 5}},
    "integrated_gradients": {"cheap": {"examples": 16, "steps": 2}, "full": {"steps": 16}},
}

# A setting's option is left out when the caller passes one it would contradict: a stopping
# target asks for a stopping rule, which the cheap Hutchinson setting's stop=None has not.
_YIELDS_TO = {"stop": ("target", "rel_tol", "min_probes")}


def resolve(name: str, setting: str, options: Mapping[str, Any]) -> dict[str, Any]:
  """The options criterion ``name`` runs with: its ``setting``'s, overridden by ``options``.

  Raises:
    ValueError: unknown ``setting`` (names the allowed ones).
  """
  if setting not in SETTINGS:
    raise ValueError(f"Unknown setting={setting!r} for criterion {name!r}; allowed: "
                     f"{list(SETTINGS)}.")
  base = {k: v for k, v in OPTIONS[name][setting].items()
          if not any(o in options for o in _YIELDS_TO.get(k, ()))}
  return {**base, **options}


def first_examples(batches: Any, count: int) -> list[Any]:
  """The first ``count`` examples of ``batches`` (a batch or a sequence of them), as one batch.

  Pooled and cut on the host, then put back: ``jnp.concatenate``, slicing a device
  array and ``jnp.asarray`` each compile a program per leaf shape on a first run.
  """
  batches = [batches] if isinstance(batches, Mapping) else list(batches)
  if not batches:
    return batches
  size = sum(jax.tree.leaves(b)[0].shape[0] for b in batches)
  if size <= count and len(batches) == 1:
    return batches
  pooled = jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs])[:count],
                        *batches)
  return [jax.tree.map(jax.device_put, pooled)]


def _probes_within(options: dict[str, Any], batches: Any) -> dict[str, Any]:
  """A setting's ``probe_examples`` dropped where the batches hold no more examples than it.

  Each probe then sees every example (no subsampling: the same or less noise).
  """
  if batches is None:
    return options
  batches = [batches] if isinstance(batches, Mapping) else list(batches)
  count = sum(jax.tree.leaves(b)[0].shape[0] for b in batches)
  if count <= options["probe_examples"]:
    options = {k: v for k, v in options.items() if k != "probe_examples"}
  return options


def _describe(name: str) -> str:
  def listed(options):
    shown = [f"{k}={v!r}" for k, v in options.items()]
    return ", ".join(shown) if shown else "the function's own defaults, every example"
  cheap, full = OPTIONS[name]["cheap"], OPTIONS[name]["full"]
  return (f"\n\n  Settings (:mod:`safer_jax.criteria.settings`): ``setting='cheap'`` (default): "
          f"{listed(cheap)}; ``setting='full'``: {listed(full)}. ``examples``: use only the "
          f"first that many examples of ``batches`` (None: all). Options passed explicitly "
          f"override the setting's.\n")


def tiered(name: str) -> Callable[[Callable], Callable]:
  """Gives criterion ``name`` the keywords ``setting`` and ``examples`` (see the module)."""

  def decorate(criterion: Callable) -> Callable:
    @functools.wraps(criterion)
    def wrapper(loss_fn, params, batches, *, setting: str = "cheap", **options):
      given = set(options)
      options = resolve(name, setting, options)
      if batches is not None and not isinstance(batches, Mapping):
        batches = list(batches)  # read more than once below: an iterator is consumed once
      if "probe_examples" not in given and options.get("probe_examples") is not None:
        options = _probes_within(options, batches)
      examples = options.pop("examples", None)
      if examples is not None:
        if isinstance(examples, bool) or not isinstance(examples, int) or examples < 1:
          raise ValueError(f"examples={examples!r} for criterion {name!r}; allowed: a "
                           f"positive integer (the first that many examples) or None (all).")
        if batches is not None:
          batches = first_examples(batches, examples)
      return criterion(loss_fn, params, batches, **options)

    # The signature shows the defaults a call gets: the cheap setting's.
    cheap = OPTIONS[name]["cheap"]
    signature = inspect.signature(criterion)
    extra = [inspect.Parameter("setting", inspect.Parameter.KEYWORD_ONLY, default="cheap"),
             inspect.Parameter("examples", inspect.Parameter.KEYWORD_ONLY,
                               default=cheap.get("examples"))]
    params = [p.replace(default=cheap[p.name]) if p.name in cheap else p
              for p in signature.parameters.values()]
    tail = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
    head = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]
    wrapper.__signature__ = signature.replace(parameters=head + extra + tail)
    wrapper.__doc__ = (criterion.__doc__ or "").rstrip() + "\n" + _describe(name)
    return wrapper

  return decorate
