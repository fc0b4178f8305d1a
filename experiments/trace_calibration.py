"""Calibration: is the Hutchinson trace's reported ranking confidence the rate it is right?

:func:`safer_jax.criteria.hutchinson_trace` reports a ``confidence``: the
probability that every pair of layers in different tie groups (with ``top_k``:
every pair across the top-k boundary) is ordered like the true traces
tr(H_ll). This experiment checks that number against the truth, per model
(default: the zoo ``lenet`` and ``mlp`` on the digits):

1. **Exact traces** in float64 by brute force on the calibration batches (the
   first ``calib_batches`` x ``calib_batch_size`` training images): tr(H_ll) =
   sum_i e_i^T H_ll e_i over the kernel's basis vectors, each a forward-over-
   reverse Hessian-vector product, ``exact_chunk`` basis vectors per vmapped
   call (:func:`exact_layer_trace`; independent of the library's estimator).
   Cached in ``<workdir>/exact_traces_<model>.json`` (keyed by the batches and a
   checksum of the weights), so reruns skip them.
2. **Runs**: for every setting — ``stop='ranking'`` at each of ``targets``,
   ``stop=None`` at each of ``fixed_probes`` probes; each estimator of
   ``estimators``; each ``top_k`` of ``top_ks`` — ``keys`` calls with the keys
   ``jax.random.key(0 .. keys-1)``. Each run records the reported confidence,
   probes, ``converged``, the tie groups, and whether the reported ranking is
   right: every claimed pair (different groups; with ``top_k`` also across the
   boundary of the top-k means) ordered like the exact traces. Also the
   reported tie pairs (same group) and how many are truly within ``tie_rtol``.
3. **Tables**: runs binned by reported confidence (``bins``: the inner edges),
   per model and pooled: runs, mean reported, actual fraction right with a
   Wilson 95% interval; per setting: mean reported vs actual, probes,
   converged. A bin or setting whose interval lies wholly below its mean
   reported confidence is marked *overconfident*.

Writes ``trace_calibration.json`` (``exact``, ``runs``, ``bins``, ``settings``,
``config``, ``seconds``) and ``trace_calibration.md`` in
``<workdir>/trace_calibration/``. Runs sharing a key across settings are
correlated; the Wilson intervals treat runs as independent (exact within one
setting, where the keys differ).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import os
import time
import warnings

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from ml_collections import config_dict

from experiments import common
from safer_jax import criteria
from safer_jax.core import data, io, layers
from safer_jax.core.progress import Progress
from safer_jax.training import train

EXTRA_MODELS = (None,)  # None: config.models
RESULTS_PER_MODEL = False  # one folder for every model: workdir/trace_calibration/
ESTIMATORS = ("all_layers", "per_layer")
Z95 = 1.959963984540054


def get_config(tiny: bool = False) -> ml_collections.ConfigDict:
  """The calibration setting; ``tiny``: the MLP, 16 images, 4 keys, two settings (seconds).

  Fields (besides :func:`experiments.common.base_config`):
    models: zoo models (trained on the digits, cached); ``model`` (a name) overrides them.
    calib_batches, calib_batch_size: the calibration batches (training split),
      the same for the exact traces and the estimator.
    num_keys: runs (probe keys) per setting (not ``keys``: a ConfigDict method).
    targets: confidence targets of the ``stop='ranking'`` settings.
    fixed_probes: probe counts of the ``stop=None`` settings.
    top_ks: ``top_k`` values (None: the whole ranking).
    estimators: ``hutchinson_trace`` estimators.
    tie_rtol: the estimator's tie tolerance (relative).
    max_probes: probe cap of the ``stop='ranking'`` settings.
    chunk_size: probes between checks of the stopping rule (``stop=None`` runs
      use ``min(chunk_size, probes)`` so they draw exactly that many).
    n_boot: posterior draws of the confidence (None: the library's default).
    exact_chunk: basis vectors per vmapped Hessian-vector product of the exact traces.
    bins: inner edges of the reported-confidence bins, increasing, in (0, 1).
  """
  config = common.base_config(model=config_dict.placeholder(str), dataset="digits")
  config.models = ("mlp",) if tiny else ("lenet", "mlp")
  config.calib_batches = 1 if tiny else 2
  config.calib_batch_size = 16 if tiny else 64
  config.num_keys = 4 if tiny else 40
  config.targets = (0.8,) if tiny else (0.5, 0.8, 0.9, 0.95)
  config.fixed_probes = (8,) if tiny else (8, 16, 32, 64)
  config.top_ks = (None, 2)
  config.estimators = ("all_layers",) if tiny else ESTIMATORS
  config.tie_rtol = 0.05
  config.max_probes = 64 if tiny else 1024
  config.chunk_size = 16
  config.n_boot = config_dict.placeholder(int)
  config.exact_chunk = 128
  config.bins = (0.5, 0.8, 0.9, 0.95)
  return config


def validate(config, check: common.Checker) -> None:
  """Models, settings and bins (see :func:`common.validate_config`)."""
  check.rule("models", common.sequence(common.choice(common.model_names()), unique=True))
  check.rule("num_keys", common.integer(1, note="runs per setting"))
  check.rule("targets", common.sequence(common.number(0, 1, lo_open=True, hi_open=True),
                                        nonempty=False, unique=True,
                                        note="confidence targets of stop='ranking'"))
  check.rule("fixed_probes", common.sequence(common.integer(2), nonempty=False, unique=True,
                                             note="probes of stop=None"))
  check.require(bool(config.targets) or bool(config.fixed_probes), "targets",
                "a non-empty tuple (or a non-empty fixed_probes): no setting to run")
  check.rule("top_ks", common.sequence(common.optional(common.integer(1)), unique=True,
                                       note="None: the whole ranking"))
  check.rule("estimators", common.sequence(common.choice(ESTIMATORS), unique=True))
  check.rule("tie_rtol", common.number(0, note="relative"))
  check.rule("max_probes", common.integer(2, note="probe cap of stop='ranking'"))
  check.rule("chunk_size", common.COUNT)
  check.rule("n_boot", common.optional(common.COUNT))
  check.rule("exact_chunk", common.COUNT)
  check.rule("bins", common.sequence(common.number(0, 1, lo_open=True, hi_open=True),
                                     nonempty=False, note="inner bin edges"))
  check.require(list(config.bins) == sorted(set(config.bins)), "bins",
                "strictly increasing edges in (0, 1)", problem="not strictly increasing")
  for model in model_list(config):
    names = common.layer_names(config, model)
    largest = max((k for k in config.top_ks if k is not None), default=None)
    if names is not None and largest is not None:
      check.require(largest < len(names), "top_ks",
                    f"None or integers from 1 to {len(names) - 1} ({model} has {len(names)} "
                    f"layers)", problem=f"top_k={largest} leaves no layer of {model} outside the top set")


def model_list(config) -> list[str]:
  """``[config.model]`` when set, else ``config.models``."""
  return [config.model] if config.model else list(config.models)


# ---------------------------------------------------------------------------
# Exact traces (float64, brute force).
# ---------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(0, 1))
def _diag_sum(loss_fn, name: str, params, batches, idx: jax.Array, weight: jax.Array):
  """sum_j weight[j] * (H_ll)[idx[j], idx[j]]: ``idx``, ``weight`` of shape (c,).

  H_ll: the Hessian block of the kernel of ``name`` (flattened, n x n) of the
  loss averaged over ``batches``; each diagonal entry is e_i^T (H e_i), the
  HVP forward-over-reverse, ``c`` basis vectors at once (vmap).
  """
  kernel = layers.get_kernel(params, name)

  def loss(k):
    p = layers.replace_kernel(params, name, k)
    return sum(loss_fn(p, b) for b in batches) / len(batches)

  grad = jax.grad(loss)
  basis = jax.nn.one_hot(idx, kernel.size, dtype=kernel.dtype)  # (c, n)
  hvps = jax.vmap(lambda e: jax.jvp(grad, (kernel,), (e.reshape(kernel.shape),))[1].ravel())(
      basis)  # (c, n)
  return jnp.sum(weight * jnp.take_along_axis(hvps, idx[:, None], axis=1)[:, 0])


def exact_layer_trace(loss_fn, params, batches, name: str, chunk: int = 128) -> float:
  """tr(H_ll) of layer ``name`` exactly: the sum of its n diagonal entries, ``chunk`` at a time.

  Runs in the precision of ``params`` (float64 under ``jax.enable_x64``).
  ``loss_fn(params, batch) -> scalar``; units loss / weight^2. Cost: n HVPs
  per batch (n: the kernel's size).
  """
  n = layers.get_kernel(params, name).size
  dtype = layers.get_kernel(params, name).dtype
  total = 0.0
  for start in range(0, n, chunk):
    idx = np.arange(start, start + chunk)
    weight = (idx < n).astype(dtype)
    total += float(_diag_sum(loss_fn, name, params, batches, jnp.asarray(np.minimum(idx, n - 1)),
                             jnp.asarray(weight)))
  return total


def _to_float64(tree):
  """Every floating leaf of ``tree`` as float64 (call under ``jax.enable_x64``)."""
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float64)
                      if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) else jnp.asarray(x),
                      tree)


def exact_traces(entry, batches, chunk: int, progress: bool = True) -> dict[str, float]:
  """``{layer: tr(H_ll)}`` of a zoo entry's classifier loss on ``batches``, float64."""
  with jax.enable_x64(True):
    variables = _to_float64(dict(entry.variables))
    loss_fn = train.task_loss_fn(entry.model, variables)
    batches64 = [_to_float64(b) for b in batches]
    out = {}
    for name in layers.find_layers(variables["params"]):
      t0 = time.perf_counter()
      out[name] = exact_layer_trace(loss_fn, variables["params"], batches64, name, chunk)
      if progress:
        print(f"  exact trace {entry.name} {name}: {out[name]:.6g} "
              f"({layers.get_kernel(variables['params'], name).size} HVPs, "
              f"{time.perf_counter() - t0:.1f} s)", flush=True)
  return out


def _fingerprint(entry, batches) -> str:
  """sha256 of the weights and the batches (the exact traces' cache key)."""
  h = hashlib.sha256()
  for leaf in jax.tree.leaves((entry.variables, batches)):
    h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return h.hexdigest()


def cached_exact_traces(workdir: str, entry, batches, config) -> dict[str, float]:
  """:func:`exact_traces`, read from ``exact_traces_<model>.json`` when its fingerprint matches."""
  path = os.path.join(workdir, f"exact_traces_{entry.name}.json")
  key = _fingerprint(entry, batches)
  if os.path.exists(path):
    cached = io.read_json(path)
    if cached.get("fingerprint") == key:
      if config.progress:
        print(f"  exact traces of {entry.name}: cached in {path}", flush=True)
      return cached["traces"]
  t0 = time.perf_counter()
  traces = exact_traces(entry, batches, config.exact_chunk, config.progress)
  io.write_json(path, {"model": entry.name, "fingerprint": key, "traces": traces,
                       "seconds": time.perf_counter() - t0,
                       "images": sum(len(b["label"]) for b in batches)})
  return traces


# ---------------------------------------------------------------------------
# Runs and their scoring.
# ---------------------------------------------------------------------------


def settings(config) -> list[dict]:
  """Every setting: ``{estimator, stop, target, probes, top_k}`` (target/probes None when n/a)."""
  stops = ([("ranking", t, None) for t in config.targets]
           + [(None, None, p) for p in config.fixed_probes])
  return [{"estimator": e, "stop": s, "target": t, "probes": p, "top_k": k}
          for e, k, (s, t, p) in itertools.product(config.estimators, config.top_ks, stops)]


def setting_label(s: dict) -> str:
  """A setting as one line, e.g. ``all_layers ranking@0.9 top2``."""
  rule = f"ranking@{s['target']:g}" if s["stop"] == "ranking" else f"fixed {s['probes']}"
  return f"{s['estimator']} {rule} " + ("all" if s["top_k"] is None else f"top{s['top_k']}")


def _options(s: dict, config) -> dict:
  """``hutchinson_trace`` keyword arguments of setting ``s``."""
  opts = dict(estimator=s["estimator"], stop=s["stop"], tie_rtol=config.tie_rtol,
              top_k=s["top_k"])
  if config.n_boot is not None:
    opts["n_boot"] = config.n_boot
  if s["stop"] == "ranking":
    return {**opts, "target": s["target"], "max_probes": config.max_probes,
            "chunk_size": config.chunk_size}
  return {**opts, "max_probes": s["probes"], "chunk_size": min(config.chunk_size, s["probes"])}


def score_run(estimates: dict, exact: dict[str, float], tie_rtol: float,
              top_k: int | None) -> dict:
  """Whether one call's reported ranking is right, against the exact traces.

  Claimed pairs: layers ``a``, ``b`` in different groups, ``a`` in the group of
  larger traces (lower index); with ``top_k``, only those with ``a`` among the
  ``top_k`` largest means and ``b`` not. Right: every claimed pair has
  ``exact[a] > exact[b]``. Tie pairs: same group; truly tied when the exact
  traces differ by at most ``tie_rtol * max(|a|, |b|)``.

  Returns:
    ``{confidence, num_probes, converged, groups (list of lists of layers, most
    sensitive first), claimed, wrong, right, tie_pairs, true_ties, top_set_exact}``;
    ``top_set_exact``: the top-k means are the true top k (None without top_k).
  """
  names = list(estimates)
  by_mean = sorted(names, key=lambda n: -estimates[n].mean)
  top = set(by_mean[:top_k]) if top_k is not None else None
  claimed = wrong = ties = true_ties = 0
  for a, b in itertools.permutations(names, 2):
    ga, gb = estimates[a].group, estimates[b].group
    if ga == gb and a < b:
      ties += 1
      true_ties += abs(exact[a] - exact[b]) <= tie_rtol * max(abs(exact[a]), abs(exact[b]))
    if ga < gb and (top is None or (a in top and b not in top)):
      claimed += 1
      wrong += not exact[a] > exact[b]
  first = next(iter(estimates.values()))
  true_top = set(sorted(names, key=lambda n: -exact[n])[:top_k]) if top_k is not None else None
  return {"confidence": float(first.confidence), "num_probes": int(first.num_probes),
          "converged": first.converged,
          "groups": [list(g) for g in criteria.trace_ranking(estimates)],
          "means": {n: float(e.mean) for n, e in estimates.items()},
          "claimed": claimed, "wrong": wrong, "right": wrong == 0, "tie_pairs": ties,
          "true_ties": int(true_ties), "top_set_exact": None if top is None else top == true_top}


def run_setting(loss_fn, params, batches, exact, s: dict, config) -> list[dict]:
  """``config.num_keys`` runs of setting ``s`` (keys 0..num_keys-1); each :func:`score_run` + seconds."""
  out = []
  for i in range(config.num_keys):
    t0 = time.perf_counter()
    with warnings.catch_warnings():  # max_probes hit: recorded as converged=False
      warnings.filterwarnings("ignore", message="hutchinson_trace stopped",
                              category=RuntimeWarning)
      estimates = criteria.hutchinson_trace(loss_fn, params, batches, key=jax.random.key(i),
                                            **_options(s, config))
    record = score_run(estimates, exact, config.tie_rtol, s["top_k"])
    out.append({**s, "key": i, **record, "seconds": time.perf_counter() - t0})
  return out


# ---------------------------------------------------------------------------
# Tables.
# ---------------------------------------------------------------------------


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
  """Wilson score interval of a binomial proportion ``k / n`` (NaNs when ``n == 0``)."""
  if n == 0:
    return float("nan"), float("nan")
  p = k / n
  denom = 1 + z * z / n
  centre = (p + z * z / (2 * n)) / denom
  half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
  return max(0.0, centre - half), min(1.0, centre + half)


def summarise(runs: list[dict]) -> dict:
  """runs, mean reported confidence, actual fraction right [Wilson 95%], and the verdict.

  ``verdict``: 'overconfident' when the interval's upper end is below the mean
  reported confidence, 'underconfident' when its lower end is above, else 'ok'.
  """
  n = len(runs)
  k = sum(r["right"] for r in runs)
  reported = float(np.mean([r["confidence"] for r in runs])) if n else float("nan")
  lo, hi = wilson(k, n)
  verdict = ("n/a" if n == 0 else "overconfident" if hi < reported
             else "underconfident" if lo > reported else "ok")
  return {"runs": n, "right": k, "reported": reported, "actual": k / n if n else float("nan"),
          "lo": lo, "hi": hi, "verdict": verdict}


def bin_edges(config) -> list[tuple[float, float]]:
  """``[(lo, hi), ...]``: [0, e1), [e1, e2), ..., [e_last, 1] (the last bin includes 1)."""
  edges = [0.0, *config.bins, 1.0]
  return list(zip(edges[:-1], edges[1:]))


def calibration_table(runs: list[dict], edges) -> list[dict]:
  """One :func:`summarise` row per confidence bin (``bin``: its label)."""
  rows = []
  for lo, hi in edges:
    last = hi == 1.0
    inside = [r for r in runs if lo <= r["confidence"] < hi or (last and r["confidence"] == 1.0)]
    rows.append({"bin": f"[{lo:g}, {hi:g}{']' if last else ')'}", **summarise(inside)})
  return rows


def setting_table(runs: list[dict], config) -> list[dict]:
  """One row per (model, setting): :func:`summarise`, mean probes, converged and tie counts."""
  rows = []
  for model in dict.fromkeys(r["model"] for r in runs):
    for s in settings(config):
      mine = [r for r in runs if r["model"] == model and all(r[k] == v for k, v in s.items())]
      if not mine:
        continue
      conv = [r["converged"] for r in mine if r["converged"] is not None]
      tops = [r["top_set_exact"] for r in mine if r["top_set_exact"] is not None]
      rows.append({"model": model, "setting": setting_label(s), **s, **summarise(mine),
                   "mean_probes": float(np.mean([r["num_probes"] for r in mine])),
                   "converged": float(np.mean(conv)) if conv else None,
                   "tie_pairs": sum(r["tie_pairs"] for r in mine),
                   "true_ties": sum(r["true_ties"] for r in mine),
                   "claimed": float(np.mean([r["claimed"] for r in mine])),
                   "top_set_exact": float(np.mean(tops)) if tops else None,
                   "seconds": float(np.sum([r["seconds"] for r in mine]))})
  return rows


def _pct(x) -> str:
  return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.0f}%"


def _fmt(x, spec=".3f") -> str:
  return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _bin_lines(title: str, rows: list[dict]) -> list[str]:
  lines = [f"**{title}**", "", "| reported confidence | runs | mean reported | actual right "
           "| Wilson 95% | verdict |", "|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['bin']} | {r['runs']} | {_fmt(r['reported'])} | {_fmt(r['actual'])} | "
                 f"[{_fmt(r['lo'], '.2f')}, {_fmt(r['hi'], '.2f')}] | {r['verdict']} |")
  return lines + [""]


def markdown(result: dict) -> str:
  """The Markdown report of :func:`run`'s result."""
  c = result["config"]
  md = ["# Hutchinson trace: is the reported ranking confidence calibrated?", "",
        f"Models {', '.join(result['models'])} (digits); {c['calib_batches']} x "
        f"{c['calib_batch_size']} training images; {c['num_keys']} keys per setting; tie_rtol "
        f"{c['tie_rtol']}; stop='ranking' capped at {c['max_probes']} probes. Truth: exact "
        f"float64 traces (brute force over basis vectors). Right: every claimed pair (different "
        f"groups; with top_k, across the top-k boundary) ordered like the exact traces. "
        f"Wall time {result['seconds']:.0f} s.", "", "## Exact traces", "",
        "| model | layer | exact tr(H) | mean of the fixed-probe runs' means | "
        "its stderr (over runs) |", "|---|---|---|---|---|"]
  for model, traces in result["exact"].items():
    for layer, value in traces.items():
      est = result["estimate_check"][model][layer]
      md.append(f"| {model} | `{layer}` | {value:.4f} | {_fmt(est['mean'], '.4f')} | "
                f"{_fmt(est['stderr'], '.4f')} |")
  md += ["", "## Calibration by reported confidence", ""]
  for model, rows in result["bins"].items():
    md += _bin_lines(model, rows)
  md += ["## Per setting", "",
         "| model | setting | runs | mean probes | converged | claimed pairs | mean reported | "
         "actual right | Wilson 95% | verdict | tie pairs (truly tied) | top-k set exact |",
         "|---" * 12 + "|"]
  for r in result["settings"]:
    md.append(f"| {r['model']} | {r['setting']} | {r['runs']} | {r['mean_probes']:.0f} | "
              f"{_pct(r['converged'])} | {r['claimed']:.1f} | {_fmt(r['reported'])} | "
              f"{_fmt(r['actual'])} | [{_fmt(r['lo'], '.2f')}, {_fmt(r['hi'], '.2f')}] | "
              f"{r['verdict']} | {r['tie_pairs']} ({r['true_ties']}) | "
              f"{_pct(r['top_set_exact'])} |")
  short = [r for r in result["settings"] if r["stop"] == "ranking" and r["hi"] < r["target"]]
  md += ["", "stop='ranking' settings whose Wilson interval lies below their target: "
         + ("; ".join(f"{r['model']} {r['setting']} ({r['right']}/{r['runs']} right, "
                      f"[{r['lo']:.2f}, {r['hi']:.2f}])" for r in short) or "none") + "."]
  return "\n".join(md) + "\n"


def _estimate_check(runs: list[dict], exact: dict[str, float]) -> dict:
  """Per layer: the mean of the largest fixed-probe setting's means over keys, and its stderr."""
  fixed = [r for r in runs if r["stop"] is None]
  if not fixed:
    return {n: {"mean": None, "stderr": None} for n in exact}
  most = max(r["probes"] for r in fixed)
  seen = {}
  for r in fixed:  # one run per (estimator, key): top_k does not change the probes
    if r["probes"] == most:
      seen.setdefault((r["estimator"], r["key"]), r["means"])
  out = {}
  for n in exact:
    xs = np.array([m[n] for m in seen.values()])
    out[n] = {"mean": float(xs.mean()),
              "stderr": float(xs.std(ddof=1) / math.sqrt(len(xs))) if len(xs) > 1 else None}
  return out


def run(config, workdir: str) -> dict:
  t_start = time.perf_counter()
  all_runs, exact, checks = [], {}, {}
  for model in model_list(config):
    entry = common.pretrained(config, model=model)
    batches = data.batches_from_split(entry.dataset.train, config.calib_batch_size,
                                           config.calib_batches)
    exact[model] = cached_exact_traces(workdir, entry, batches, config)
    loss_fn = train.task_loss_fn(entry.model, entry.variables)
    params = entry.variables["params"]
    todo = settings(config)
    bar = Progress(len(todo) * config.num_keys, f"trace_calibration {model}",
                   enabled=config.progress, unit="run")
    runs = []
    for s in todo:
      runs += [{"model": model, **r}
               for r in run_setting(loss_fn, params, batches, exact[model], s, config)]
      bar.update(config.num_keys, postfix=setting_label(s))
    bar.close()
    checks[model] = _estimate_check(runs, exact[model])
    all_runs += runs
  edges = bin_edges(config)
  bins = {m: calibration_table([r for r in all_runs if r["model"] == m], edges)
          for m in exact}
  if len(exact) > 1:
    bins["pooled"] = calibration_table(all_runs, edges)
  result = {"models": list(exact), "config": config.to_dict(), "exact": exact,
            "estimate_check": checks, "bins": bins,
            "settings": setting_table(all_runs, config), "runs": all_runs,
            "overall": summarise(all_runs), "seconds": time.perf_counter() - t_start,
            "versions": io.versions()}
  text = markdown(result)
  paths = {"json": io.write_json(os.path.join(workdir, "trace_calibration.json"), result),
           "md": io.write_text(os.path.join(workdir, "trace_calibration.md"), text)}
  print(text)
  return {"paths": paths, "overall": result["overall"], "seconds": result["seconds"]}
