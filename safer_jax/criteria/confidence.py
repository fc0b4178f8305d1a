"""How sure a noisy estimate is of the layers' ranking: tie groups and a calibrated confidence.

A stochastic criterion (Hutchinson's trace) gives ``P`` per-probe estimates of
``L`` layers' scores, ``samples`` of shape ``(P, L)``; the score is their mean.
What a budget uses is the *ranking* of the layers, so the stopping rule asks
whether each pair of neighbours in that ranking is settled (:func:`verdict`):

* **ordered**: the posterior probability that the larger exceeds the other by
  more than ``tie_rtol`` (relative to the larger) reaches ``target``;
* **tied**: the posterior probability that they are within ``tie_rtol`` of each
  other (relative to the larger) reaches ``target``: their order is not claimed
  and no probes are spent on it;
* otherwise **unresolved**: reported as a tie (within the noise), and the rule
  draws more probes.

Neighbours not ordered share a **tie group**. The **confidence** is the
probability that every pair of layers in different groups (with ``top_k``:
every pair across the top-``k`` boundary) is ordered like the true scores. The
posterior is that of the means under a normal model of the probes with unknown
covariance and a flat prior, drawn by :func:`posterior_draws`; jointly over
pairs it accounts for their correlation (the probes of the all-layer estimator
are shared).

``experiments/trace_calibration.py`` checks the reported confidence against
how often the ranking is right, over many keys, against exact float64 traces.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np


class Verdict(NamedTuple):
  """What :func:`verdict` concludes from ``(P, L)`` samples.

  Attributes:
    groups: ``(L,)`` int tie group of each layer, 0 for the largest means.
    above, below: index arrays of the claimed pairs (``mean[above] > mean[below]``).
    confidence: probability that every claimed pair is ordered right.
    settled: whether every neighbour pair that matters is ordered or tied
      (each with probability ``>= target``) and ``confidence >= target``.
    unresolved: ``(a, b)`` index pairs of neighbours neither ordered nor tied.
  """
  groups: np.ndarray
  above: np.ndarray
  below: np.ndarray
  confidence: float
  settled: bool
  unresolved: list[tuple[int, int]]


def posterior_draws(samples: np.ndarray, n_draws: int = 400, seed: int = 0) -> np.ndarray:
  """``(n_draws, L)`` draws of the layer means from their posterior.

  ``mean + (1 / P) sum_p w_p (x_p - mean) * sqrt(P / (P - 1)) * sqrt((P - 1) / chi2_{P-1})``
  with ``w_p`` standard normal: each contrast of the means is then Student-t with
  ``P - 1`` degrees of freedom around the observed one with the sample standard
  error (its posterior under a normal model, flat prior), correlated as the
  probes make them, and it works with fewer probes than layers. (A plain
  bootstrap of the probes was overconfident with few probes: its tails are the
  sample's.) Requires ``P >= 2``.
  """
  p = samples.shape[0]
  rng = np.random.default_rng(seed)
  full = samples.mean(axis=0)
  w = rng.standard_normal((n_draws, p))
  scale = np.sqrt(p / rng.chisquare(p - 1, size=(n_draws, 1))) / p
  return full + scale * (w @ (samples - full))


def verdict(samples: np.ndarray, *, tie_rtol: float, target: float, top_k: int | None = None,
            n_draws: int = 400, seed: int = 0) -> Verdict:
  """Tie groups, claimed pairs and confidence of ``(P, L)`` per-probe estimates (see the module).

  With ``top_k``, only the neighbours at the top-``k`` boundary must be settled
  and only pairs across it are claimed (which layers of a tie group the
  boundary cuts through are in the set is not claimed).
  """
  p, l = samples.shape
  means = samples.mean(axis=0)
  order = np.argsort(-means, kind="stable")
  if p < 2:
    return Verdict(np.zeros(l, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64),
                   0.0 if l > 1 else 1.0, l < 2, [])
  draws = posterior_draws(samples, n_draws, seed)
  a, b = draws[:, order[:-1]], draws[:, order[1:]]  # neighbours, (B, L - 1)
  band = tie_rtol * np.maximum(np.abs(a), np.abs(b))
  # Ordered only when the gap is beyond the tie band with posterior probability `target`, not
  # merely positive: the rule looks again after every chunk of probes, and a "means more than
  # tie_rtol apart, order probable" claim was taken, by chance, on layers 0.35% apart (lenet's
  # dense1/head) in 20% of the keys at target 0.9 (reported confidence 0.96).
  ordered = np.mean(a - b > band, axis=0) >= target
  tied = np.mean(np.abs(a - b) <= band, axis=0) >= target
  groups = np.zeros(l, np.int64)
  groups[order] = np.concatenate([[0], np.cumsum(ordered)])
  above, below = np.nonzero(groups[:, None] < groups[None, :])
  matters = np.ones(l - 1, dtype=bool)
  if top_k is not None:
    top = np.zeros(l, dtype=bool)
    top[order[:top_k]] = True
    keep = top[above] & ~top[below]
    above, below = above[keep], below[keep]
    matters = np.arange(l - 1) == top_k - 1
  confidence = (1.0 if len(above) == 0
                else float(np.mean(np.all(draws[:, above] > draws[:, below], axis=1))))
  open_ = matters & ~ordered & ~tied
  unresolved = [(int(order[i]), int(order[i + 1])) for i in np.nonzero(open_)[0]]
  return Verdict(groups, above, below, confidence,
                 not unresolved and confidence >= target, unresolved)


def describe_unresolved(names: Sequence[str], v: Verdict, limit: int = 3) -> str:
  """The neighbours the verdict could neither order nor tie, as ``'a ? b'`` (at most ``limit``)."""
  pairs = [f"{names[i]} ? {names[j]}" for i, j in v.unresolved[:limit]]
  more = len(v.unresolved) - limit
  return ", ".join(pairs) + (f" and {more} more" if more > 0 else "") if pairs else "none"


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
