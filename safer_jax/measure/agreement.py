"""Rank agreement between layer-sensitivity criteria and the sweep's ground truth.

A criterion is useful if it *orders* layers like the ground truth does (the
SAfER benchmark): for each criterion and perturbation family we report

* Spearman's rho (Pearson correlation of the average ranks; ties allowed),
* Kendall's tau-b (``scipy.stats.kendalltau``; tie-corrected),
* top-k overlap: ``|topk(score) ∩ topk(truth)| / k`` with
  ``k = max(1, round(k_frac * L))`` over ``L`` layers. Ties at the k-th place
  are resolved by expectation over random tie-breaking (a layer tied with
  ``t`` others for ``s`` remaining slots counts as ``s / t`` of a member), so
  the overlap is deterministic and a constant score gets the chance level
  ``k / L``,
* percentile bootstrap 95% confidence intervals of rho and tau over layers
  (layers resampled with replacement; resamples in which either side is
  constant are skipped; the interval is NaN when fewer than half of the
  resamples, or fewer than 3 layers, remain).

A constant criterion or truth has no rank correlation: rho and tau are NaN,
never an exception. Higher score = more sensitive, on both sides.

The ``loss_fn(params, batch)`` and the calibration batches the criteria take:
:func:`safer_jax.training.train.task_loss_fn` and
:func:`safer_jax.core.data.batches_from_split`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

AGREEMENT_COLUMNS = ["criterion", "family", "num_layers", "spearman", "spearman_lo", "spearman_hi",
                     "spearman_p", "kendall", "kendall_lo", "kendall_hi", "kendall_p", "topk", "k",
                     "n_boot_valid"]

_MIN_BOOT_LAYERS = 3
_MIN_VALID_FRACTION = 0.5


def _paired(scores: Mapping[str, float], truth: Mapping[str, float]) -> tuple[
    list[str], np.ndarray, np.ndarray]:
  """Layers of ``truth`` (in its order) with both values finite, and the two vectors."""
  missing = [layer for layer in truth if layer not in scores]
  if missing:
    raise ValueError(f"`scores` lack {len(missing)} layer(s) of `truth`: {missing[:5]}.")
  layers = [layer for layer in truth
            if math.isfinite(float(scores[layer])) and math.isfinite(float(truth[layer]))]
  x = np.asarray([float(scores[layer]) for layer in layers], np.float64)
  y = np.asarray([float(truth[layer]) for layer in layers], np.float64)
  return layers, x, y


def _is_constant(x: np.ndarray) -> bool:
  return x.size == 0 or bool(np.all(x == x[0]))


def _membership(x: np.ndarray, k: int) -> np.ndarray:
  """Expected membership of each entry in the top ``k`` under random tie-breaking."""
  order = np.sort(x)[::-1]
  threshold = order[k - 1]
  above = x > threshold
  tied = x == threshold
  slots = k - int(above.sum())
  return above.astype(np.float64) + tied * (slots / tied.sum())


def topk_overlap(scores: np.ndarray, truth: np.ndarray, k: int) -> float:
  """``|topk(scores) ∩ topk(truth)| / k``, ties resolved by expectation.

  Args:
    scores: ``(L,)`` criterion values (higher = more sensitive).
    truth: ``(L,)`` ground-truth importances.
    k: number of top layers, ``1 <= k <= L``.

  Returns:
    The overlap fraction in [0, 1]; 1 when the top-k sets agree.
  """
  scores, truth = np.asarray(scores, np.float64), np.asarray(truth, np.float64)
  if not 1 <= k <= scores.size:
    raise ValueError(f"k={k} must be in [1, {scores.size}].")
  return float(np.sum(_membership(scores, k) * _membership(truth, k)) / k)


# scipy.stats is imported where it is used: at the top it was 0.6 s of the 3.3 s that
# `import safer_jax` took (every notebook, every launch), for three functions.


def _row_ranks(x: np.ndarray) -> np.ndarray:
  import scipy.stats  # pylint: disable=import-outside-toplevel
  return scipy.stats.rankdata(x, method="average", axis=1)


def _row_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Row-wise Pearson correlation; NaN for rows where either side is constant."""
  a = a - a.mean(axis=1, keepdims=True)
  b = b - b.mean(axis=1, keepdims=True)
  den = np.sqrt(np.sum(a * a, axis=1) * np.sum(b * b, axis=1))
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(den > 0, np.sum(a * b, axis=1) / np.where(den > 0, den, 1.0), np.nan)


def _row_kendall_b(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Row-wise Kendall tau-b of ``(B, n)`` samples; NaN where a row is constant."""
  sx = np.sign(x[:, :, None] - x[:, None, :])
  sy = np.sign(y[:, :, None] - y[:, None, :])
  num = np.sum(sx * sy, axis=(1, 2))
  den = np.sqrt(np.sum(sx * sx, axis=(1, 2)) * np.sum(sy * sy, axis=(1, 2)))
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def bootstrap_correlations(x: np.ndarray, y: np.ndarray, n_boot: int = 1000,
                           seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Spearman rho and Kendall tau-b of ``n_boot`` resamples of the pairs ``(x_i, y_i)``.

  Args:
    x: ``(L,)`` criterion values.
    y: ``(L,)`` ground-truth values.
    n_boot: number of resamples (layers drawn with replacement, ``L`` each).
    seed: NumPy seed of the resampling.

  Returns:
    ``(rho, tau)``, each ``(n_boot,)`` float64, NaN for degenerate resamples
    (either side constant). Equal to ``scipy.stats.spearmanr`` /
    ``kendalltau`` applied to each resample.
  """
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  n = x.size
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, n, size=(n_boot, n))
  rho = np.empty(n_boot)
  tau = np.empty(n_boot)
  chunk = max(1, 4_000_000 // max(n * n, 1))  # bound the (chunk, n, n) pair tensors
  for lo in range(0, n_boot, chunk):
    xs, ys = x[idx[lo:lo + chunk]], y[idx[lo:lo + chunk]]
    rho[lo:lo + chunk] = _row_pearson(_row_ranks(xs), _row_ranks(ys))
    tau[lo:lo + chunk] = _row_kendall_b(xs, ys)
  return rho, tau


def _interval(samples: np.ndarray, n_boot: int) -> tuple[float, float]:
  valid = samples[np.isfinite(samples)]
  if valid.size == 0 or valid.size < _MIN_VALID_FRACTION * n_boot:
    return math.nan, math.nan
  lo, hi = np.percentile(valid, [2.5, 97.5])
  return float(lo), float(hi)


def rank_agreement(scores: Mapping[str, float], truth: Mapping[str, float], *,
                   k_frac: float = 0.25, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
  """How well a criterion ranks layers like the ground truth.

  Layers are those of ``truth``; a layer whose score or truth is NaN/inf is
  left out (``num_layers`` counts the rest).

  Args:
    scores: ``{layer: criterion value}`` (higher = more sensitive); must hold
      every layer of ``truth`` (extra layers are ignored).
    truth: ``{layer: ground-truth importance}``, e.g. one column of
      :func:`safer_jax.measure.sweep.importance`.
    k_frac: fraction of layers in the top-k set, ``k = max(1, round(k_frac * L))``.
    n_boot: bootstrap resamples for the 95% intervals (0: no intervals).
    seed: seed of the bootstrap.

  Returns:
    ``{'num_layers', 'spearman', 'spearman_lo', 'spearman_hi', 'spearman_p',
    'kendall', 'kendall_lo', 'kendall_hi', 'kendall_p', 'topk', 'k',
    'n_boot_valid'}``: correlations in [-1, 1] (NaN when either side is
    constant or fewer than 2 layers), two-sided p-values, top-k overlap in
    [0, 1] (NaN for no layers), interval bounds NaN when they cannot be
    estimated (see module docstring), ``n_boot_valid`` the number of
    non-degenerate resamples.

  Raises:
    ValueError: ``scores`` lacks a layer of ``truth``, or ``k_frac`` not in (0, 1].
  """
  if not 0 < k_frac <= 1:
    raise ValueError(f"k_frac={k_frac} must be in (0, 1].")
  _, x, y = _paired(scores, truth)
  n = x.size
  out: dict[str, Any] = {"num_layers": n}
  degenerate = n < 2 or _is_constant(x) or _is_constant(y)
  if degenerate:
    out.update(spearman=math.nan, spearman_p=math.nan, kendall=math.nan, kendall_p=math.nan)
  else:
    import scipy.stats  # pylint: disable=import-outside-toplevel
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # scipy warns on tiny samples; the values are still right.
      rho = scipy.stats.spearmanr(x, y)
      tau = scipy.stats.kendalltau(x, y)
    out.update(spearman=float(rho.statistic), spearman_p=float(rho.pvalue),
               kendall=float(tau.statistic), kendall_p=float(tau.pvalue))
  k = max(1, int(round(k_frac * n)))
  out["k"] = min(k, n) if n else k
  out["topk"] = topk_overlap(x, y, out["k"]) if n else math.nan
  lo_hi = {"spearman": (math.nan, math.nan), "kendall": (math.nan, math.nan)}
  valid = 0
  if n_boot > 0 and n >= _MIN_BOOT_LAYERS and not degenerate:
    rhos, taus = bootstrap_correlations(x, y, n_boot, seed)
    valid = int(np.sum(np.isfinite(rhos)))
    lo_hi = {"spearman": _interval(rhos, n_boot), "kendall": _interval(taus, n_boot)}
  for name, (lo, hi) in lo_hi.items():
    out[f"{name}_lo"], out[f"{name}_hi"] = lo, hi
  out["n_boot_valid"] = valid
  return out


def compare_criteria(criteria_scores: Mapping[str, Mapping[str, float]],
                     truth_by_family: Mapping[str, Mapping[str, float]] | pd.DataFrame, *,
                     k_frac: float = 0.25, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
  """:func:`rank_agreement` of every criterion against every family's ground truth.

  Args:
    criteria_scores: ``{criterion: {layer: score}}`` (e.g. from
      :func:`safer_jax.criteria.compute_all`).
    truth_by_family: ``{family: {layer: importance}}``, or the ``layer x
      family`` DataFrame of :func:`safer_jax.measure.sweep.importance`.
    k_frac, n_boot, seed: see :func:`rank_agreement`.

  Returns:
    Long DataFrame, one row per (criterion, family), columns
    :data:`AGREEMENT_COLUMNS`, criteria and families in input order.
  """
  if isinstance(truth_by_family, pd.DataFrame):
    truth_by_family = {family: truth_by_family[family].to_dict()
                       for family in truth_by_family.columns}
  rows = []
  for criterion, scores in criteria_scores.items():
    for family, truth in truth_by_family.items():
      rows.append({"criterion": criterion, "family": family,
                   **rank_agreement(scores, truth, k_frac=k_frac, n_boot=n_boot, seed=seed)})
  return pd.DataFrame(rows, columns=AGREEMENT_COLUMNS)


# ---------------------------------------------------------------------------
# Pooled and paired comparisons (layers stratified by model).
# ---------------------------------------------------------------------------


def tie_fraction(values: Any) -> float:
  """Fraction of pairs of ``values`` (L,) that are equal (to 1e-12 relative): tie noise.

  NaN for fewer than 2 values.
  """
  v = np.asarray(values, np.float64)
  v = v[np.isfinite(v)]
  if v.size < 2:
    return math.nan
  tol = 1e-12 * max(float(np.max(np.abs(v))), 1e-300)
  same = np.abs(v[:, None] - v[None, :]) <= tol
  n = v.size
  return float((same.sum() - n) / (n * (n - 1)))


def pooled_bootstrap(scores: Mapping[str, Mapping[str, Mapping[str, float]]],
                     truth: Mapping[str, Mapping[str, float]], *, n_boot: int = 1000,
                     seed: int = 0) -> tuple[dict[str, float], dict[str, np.ndarray]]:
  """Pooled Spearman rho of every criterion over several models, with paired resamples.

  The pooled rho is the mean of the per-model Spearman rhos weighted by each
  model's number of layers (models where either side is constant drop out of
  that mean). Resamples draw layers with replacement *within* each model
  (stratified), with the same draws for every criterion, so the difference of
  two criteria's samples is a paired bootstrap of the difference in rho.

  Args:
    scores: ``{criterion: {model: {layer: score}}}`` (higher = more sensitive).
    truth: ``{model: {layer: importance}}``. Per model, the layers used are those
      with a finite truth and a finite score from every criterion.
    n_boot: resamples (0: no samples).
    seed: NumPy seed of the resampling.

  Returns:
    ``(point, samples)``: ``{criterion: pooled rho}`` and ``{criterion: (n_boot,)
    pooled rho of each resample}`` (NaN where no model is non-degenerate).

  Raises:
    ValueError: a criterion without scores for a model of ``truth``.
  """
  names = list(scores)
  rng = np.random.default_rng(seed)
  sums = {c: np.zeros(n_boot) for c in names}
  weights = {c: np.zeros(n_boot) for c in names}
  point_sum = dict.fromkeys(names, 0.0)
  point_w = dict.fromkeys(names, 0.0)
  for model, t in truth.items():
    missing = [c for c in names if model not in scores[c]]
    if missing:
      raise ValueError(f"criteria {missing} have no scores for model {model!r}.")
    layer_names = [l for l, v in t.items() if np.isfinite(v) and all(
        np.isfinite(scores[c][model].get(l, np.nan)) for c in names)]
    n = len(layer_names)
    if n < 2:
      continue
    y = np.asarray([t[l] for l in layer_names], np.float64)
    idx = rng.integers(0, n, size=(n_boot, n))
    ys = _row_ranks(y[idx]) if n_boot else None
    for c in names:
      x = np.asarray([scores[c][model][l] for l in layer_names], np.float64)
      if not (_is_constant(x) or _is_constant(y)):
        rho = float(_row_pearson(_row_ranks(x[None]), _row_ranks(y[None]))[0])
        point_sum[c] += n * rho
        point_w[c] += n
      if n_boot:
        r = _row_pearson(_row_ranks(x[idx]), ys)
        ok = np.isfinite(r)
        sums[c][ok] += n * r[ok]
        weights[c][ok] += n
  point = {c: point_sum[c] / point_w[c] if point_w[c] else math.nan for c in names}
  with np.errstate(invalid="ignore", divide="ignore"):
    samples = {c: np.where(weights[c] > 0, sums[c] / np.where(weights[c] > 0, weights[c], 1),
                           np.nan) for c in names}
  return point, samples


def paired_comparison(point: Mapping[str, float],
                      samples: Mapping[str, np.ndarray]) -> pd.DataFrame:
  """Winner or tie group from paired bootstrap samples (e.g. :func:`pooled_bootstrap`).

  The best criterion is the one with the highest point rho. For every other
  criterion the 95% interval of ``rho_best - rho_other`` over the paired
  resamples says whether it is tied with the best (the interval includes 0).
  The best is the *winner* only when no other criterion is tied with it.

  Returns:
    One row per criterion, best first then by rho: ``criterion``, ``rho``,
    ``lo``, ``hi`` (95% interval of its own rho), ``diff`` (best minus it),
    ``diff_lo``, ``diff_hi``, ``tied`` (in the best's tie group, the best
    included), ``winner`` (True for the best when it is alone in its group).
  """
  names = [c for c in point if np.isfinite(point[c])]
  if not names:
    return pd.DataFrame(columns=["criterion", "rho", "lo", "hi", "diff", "diff_lo", "diff_hi",
                                 "tied", "winner"])
  best = max(names, key=lambda c: point[c])
  rows = []
  for c in sorted(names, key=lambda c: (c != best, -point[c])):
    s = np.asarray(samples[c])
    lo, hi = _interval(s, s.size) if s.size else (math.nan, math.nan)
    d = np.asarray(samples[best]) - s
    if c == best:
      dlo = dhi = 0.0
    elif d.size:
      dlo, dhi = _interval(d, d.size)
    else:
      dlo = dhi = math.nan
    tied = c == best or not (np.isfinite(dlo) and dlo > 0)
    rows.append({"criterion": c, "rho": point[c], "lo": lo, "hi": hi,
                 "diff": point[best] - point[c], "diff_lo": dlo, "diff_hi": dhi, "tied": tied,
                 "winner": False})
  table = pd.DataFrame(rows)
  table.loc[0, "winner"] = int(table["tied"].sum()) == 1
  return table
