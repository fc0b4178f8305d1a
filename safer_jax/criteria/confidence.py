"""How sure a noisy estimate is of the layers' ranking: tie groups and a calibrated confidence.

A stochastic criterion (Hutchinson's trace) gives ``P`` per-probe estimates of
``L`` layers' scores, ``samples`` of shape ``(P, L)``; the score is their mean.
What a budget uses is the *ranking* of the layers, so the stopping rule asks
how likely that ranking is to be the true one:

* Layers whose means are within ``tie_rtol`` of each other (relative to the
  larger, chained over the sorted means) form one **tie group**: their order
  is not claimed, and no amount of probes is spent on it.
* The **confidence** is the probability that every pair of layers in different
  groups (with ``top_k``: every pair across the top-``k`` boundary) is ordered
  like the true scores: the posterior probability of the observed order under
  a normal model of the probes (for one pair, the Student-t probability of the
  difference's sign), estimated by drawing the means from that posterior
  (:func:`ranking_confidence`); jointly over pairs it accounts for their
  correlation (the probes of the all-layer estimator are shared).

``experiments/trace_calibration.py`` checks the reported confidence against
how often the ranking is right, over many keys, against exact float64 traces.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def tie_groups(means: np.ndarray, tie_rtol: float) -> np.ndarray:
  """Tie group of every layer, 0 for the group with the largest means.

  Args:
    means: ``(L,)`` layer scores.
    tie_rtol: consecutive layers (in descending order of ``means``) whose
      means differ by at most ``tie_rtol * max(|a|, |b|)`` share a group
      (0: only equal means tie).

  Returns:
    ``(L,)`` int group indices, non-decreasing along the descending order.
  """
  means = np.asarray(means, dtype=np.float64)
  order = np.argsort(-means, kind="stable")
  groups = np.zeros(len(means), dtype=np.int64)
  group = 0
  for previous, current in zip(order[:-1], order[1:]):
    a, b = means[previous], means[current]
    if abs(a - b) > tie_rtol * max(abs(a), abs(b)):
      group += 1
    groups[current] = group
  return groups


def ordered_pairs(means: np.ndarray, groups: np.ndarray,
                  top_k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """The pairs whose order the ranking claims: ``(above, below)`` index arrays.

  Every pair of layers in different groups, ``above`` the one with the larger
  mean; with ``top_k``, only the pairs across the boundary of the ``top_k``
  largest means (the set a budget keeps; where the boundary cuts through a tie
  group, which of its layers are in the set is not claimed).
  """
  means = np.asarray(means, dtype=np.float64)
  groups = np.asarray(groups)
  above, below = np.nonzero(groups[:, None] < groups[None, :])
  if top_k is not None:
    order = np.argsort(-means, kind="stable")
    top = np.zeros(len(means), dtype=bool)
    top[order[:top_k]] = True
    keep = top[above] & ~top[below]
    above, below = above[keep], below[keep]
  return above, below


def ranking_confidence(samples: np.ndarray, above: np.ndarray, below: np.ndarray,
                       n_boot: int = 400, seed: int = 0) -> float:
  """Probability that every pair ``(above[i], below[i])`` is ordered right.

  Draws of the layer means from their posterior under a normal model of the
  probes with unknown covariance (flat prior): ``mean + (1 / P) sum_p w_p
  (x_p - mean) * sqrt(P / (P - 1)) * sqrt((P - 1) / chi2_{P-1})`` with ``w_p``
  standard normal. Each pair's difference is then Student-t with ``P - 1``
  degrees of freedom around the observed one with the sample standard error
  (its posterior), the pairs correlated as the probes make them, and it works
  with fewer probes than layers. (A plain bootstrap of the probes was
  overconfident with few probes: its tails are the sample's.)

  Args:
    samples: ``(P, L)`` per-probe estimates.
    above, below: index arrays of the claimed pairs (``mean[above] > mean[below]``).
    n_boot: posterior draws.
    seed: NumPy seed (fixed: the rule is deterministic).

  Returns:
    The fraction of draws in which every claimed pair keeps its order; 1.0
    when nothing is claimed, 0.0 with fewer than two probes.
  """
  if len(above) == 0:
    return 1.0
  p = samples.shape[0]
  if p < 2:
    return 0.0
  rng = np.random.default_rng(seed)
  full = samples.mean(axis=0)
  w = rng.standard_normal((n_boot, p))
  scale = np.sqrt(p / (p - 1) * (p - 1) / rng.chisquare(p - 1, size=(n_boot, 1))) / p
  draws = full + scale * (w @ (samples - full))  # (B, L)
  kept = np.all(draws[:, above] > draws[:, below], axis=1)
  return float(np.mean(kept))


def unresolved(names: Sequence[str], samples: np.ndarray, above: np.ndarray,
               below: np.ndarray, limit: int = 3) -> list[str]:
  """The claimed pairs least sure of their order, as ``'a > b'`` strings (at most ``limit``)."""
  if len(above) == 0:
    return []
  p = samples.shape[0]
  diff = samples[:, above] - samples[:, below]
  z = diff.mean(axis=0) / (diff.std(axis=0, ddof=1) / np.sqrt(p) + 1e-300) if p > 1 else diff[0]
  worst = np.argsort(z)[:limit]
  return [f"{names[above[i]]} > {names[below[i]]}" for i in worst]


def trace_ranking(estimates: Mapping[str, Any]) -> list[tuple[str, ...]]:
  """The tie groups of :func:`safer_jax.criteria.hutchinson_trace`'s result, most sensitive first.

  Args:
    estimates: ``{layer: TraceEstimate}`` (anything with ``group`` and ``mean``).

  Returns:
    A list of tuples of layer names; layers within one tuple are tied (their
    order is not claimed), listed by decreasing mean.
  """
  by_group: dict[int, list[str]] = {}
  for name in sorted(estimates, key=lambda n: -estimates[n].mean):
    by_group.setdefault(int(estimates[name].group), []).append(name)
  return [tuple(by_group[g]) for g in sorted(by_group)]
