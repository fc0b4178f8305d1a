"""Calibrated magnitude grids: a sweep grid that spans mild to harsh for *this* model.

A fixed grid (int8 bit flips at rates 1e-4 ... 1e-2, say) can leave a robust
model untouched, and a benchmark built on near-ties ranks noise. Here the grid is
chosen per family and model: the harshest magnitude makes the most sensitive
layer lose ``target_drop`` of accuracy (e.g. 0.45: 45 points), the mildest makes
it lose ``mild_drop``, and the steps between are geometric (integers for bit
widths). Both ends are found by bisection on that one layer, perturbed alone;
the most and the least sensitive candidate layers come from one probe of every
layer at the family's harshest default magnitude (ranked by loss increase,
which ties less than accuracy). The result records both layers' drops at both
ends, so a run can be reproduced and judged.

>>> g = calibrate_grid(model, variables, split, "bitflip")
>>> g.grid          # mildest first, e.g. (2e-05, 6e-05, ..., 0.004)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from safer_jax.core import data as data_lib
from safer_jax.core import layers as layers_lib
from safer_jax.core import perturb
from safer_jax.core import wrapping
from safer_jax.measure import sweep
from safer_jax.training import train

# Where each family's harshness is searched: (scale, mildest, harshest). 'int': bit widths,
# harsher = fewer; 'log' / 'linear': the magnitude itself, harsher = larger.
SEARCH_RANGES = {
    "quantize": ("int", 16, 1),
    "prune": ("linear", 0.0, 0.999),
    "bitflip": ("log", 1e-7, 0.5),
    "noise": ("log", 1e-4, 10.0),
}


@dataclasses.dataclass(frozen=True)
class CalibratedGrid:
  """A family's grid for one model, and the evidence for it.

  Attributes:
    family: the perturbation family.
    grid: magnitudes, mildest first.
    most_sensitive, least_sensitive: the candidate layers with the largest and
      smallest loss increase at the probe magnitude.
    probe: the probe magnitude (the family's harshest default).
    target_drop, mild_drop: the accuracy drops (fractions) aimed at.
    drops: ``{'mild' | 'harsh': {layer: accuracy drop}}`` of the two layers at
      the grid's ends (seed-averaged).
    reached: whether the harshest magnitude searched reached ``target_drop``
      (if not, the grid ends at the range's harshest end).
    evaluations: model evaluations spent.
    baseline_accuracy: the unperturbed accuracy on the split.
  """
  family: str
  grid: tuple
  most_sensitive: str
  least_sensitive: str
  probe: float
  target_drop: float
  mild_drop: float
  drops: dict
  reached: bool
  evaluations: int
  baseline_accuracy: float

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def _magnitude(scale: str, lo: float, hi: float, t: float) -> float:
  """The magnitude at harshness ``t`` in [0, 1] of a search range."""
  if scale == "log":
    return float(lo * (hi / lo) ** t)
  if scale == "linear":
    return float(lo + (hi - lo) * t)
  return float(round(lo + (hi - lo) * t))  # int: bits from lo (mild) to hi (harsh)


def calibrate_grid(model: Any, variables: Mapping[str, Any] | None, split: data_lib.Split,
                   family: str, *, layers: Sequence[str] | None = None,
                   target_drop: float = 0.45, mild_drop: float = 0.05, steps: int = 5,
                   seeds: Sequence[int] = (0,), options: Mapping[str, Any] | None = None,
                   iters: int = 12) -> CalibratedGrid:
  """A grid of ``family`` magnitudes from mild to harsh for this model (module docstring).

  Args:
    model, variables: as :func:`safer_jax.measure.sweep.run_sweep` takes them.
    split: the data the sweep will use (e.g. the eval split).
    family: one of :data:`SEARCH_RANGES` (``'quantize'``, ``'prune'``,
      ``'bitflip'``, ``'noise'``).
    layers: regex patterns of the candidate layers (None: all).
    target_drop: accuracy drop (fraction, e.g. 0.45) of the most sensitive
      layer at the harshest magnitude; in (0, 1].
    mild_drop: its drop at the mildest; in (0, target_drop).
    steps: grid length (>= 2). Bit widths: every integer from the mild end down
      to the harsh one, the mild end at least ``steps - 1`` bits above it.
    seeds: the drop of a stochastic family is averaged over these keys.
    options: keyword options of the family (e.g. ``{'representation':
      'float32'}`` for bit flips).
    iters: bisection steps per end (continuous families).

  Returns:
    A :class:`CalibratedGrid`.

  Raises:
    ValueError: a family without a search range, a bad target, drop or steps.
  """
  if family not in SEARCH_RANGES:
    raise ValueError(f"family={family!r} cannot be calibrated; allowed: "
                     f"{sorted(SEARCH_RANGES)}.")
  if not 0 < target_drop <= 1:
    raise ValueError(f"target_drop={target_drop} must be in (0, 1] (an accuracy fraction).")
  if not 0 < mild_drop < target_drop:
    raise ValueError(f"mild_drop={mild_drop} must be in (0, target_drop={target_drop}).")
  if int(steps) != steps or steps < 2:
    raise ValueError(f"steps={steps!r} must be an integer >= 2.")
  model, variables = wrapping.as_model(model, variables)
  fam = perturb.get_family(family)
  options = dict(options or {})
  names = layers_lib.select_layers(variables, layers)
  apply = sweep.apply_fn(model)
  base = train.evaluate(apply, variables, split)
  count = [1]
  seeds = tuple(seeds) if fam.stochastic else (0,)

  def scores(layer: str, magnitude: float) -> tuple[float, float]:
    """Seed-averaged (accuracy drop, loss increase) of ``layer`` alone at ``magnitude``."""
    w = jnp.asarray(layers_lib.get_kernel(variables, layer))
    drops, losses = [], []
    for seed in seeds:
      m_arg = int(magnitude) if scale == "int" else magnitude
      new = fam.fn(w, m_arg, jax.random.key(seed), **options)
      m = train.evaluate(apply, layers_lib.replace_kernel(variables, layer, new), split)
      drops.append(base["accuracy"] - m["accuracy"])
      losses.append(m["loss"] - base["loss"])
      count[0] += 1
    return float(np.mean(drops)), float(np.mean(losses))

  scale, lo, hi = SEARCH_RANGES[family]
  probe = float(fam.default_grid[-1])
  probed = {n: scores(n, probe) for n in names}
  order = sorted(names, key=lambda n: (probed[n][1], probed[n][0]))
  most, least = order[-1], order[0]

  def harshness_for(drop: float) -> tuple[float, bool]:
    """Smallest harshness t in [0, 1] where ``most`` loses at least ``drop`` (bisection)."""
    if scores(most, _magnitude(scale, lo, hi, 1.0))[0] < drop:
      return 1.0, False
    a, b = 0.0, 1.0  # drop(a) < target <= drop(b) (assumed at a = 0)
    rounds = int(abs(hi - lo)).bit_length() + 1 if scale == "int" else iters
    for _ in range(rounds):
      mid = (a + b) / 2
      if scores(most, _magnitude(scale, lo, hi, mid))[0] >= drop:
        b = mid
      else:
        a = mid
    return b, True

  t_harsh, reached = harshness_for(target_drop)
  t_mild, _ = harshness_for(mild_drop)
  t_mild = min(t_mild, t_harsh)
  harsh, mild = _magnitude(scale, lo, hi, t_harsh), _magnitude(scale, lo, hi, t_mild)
  if scale == "int":  # every bit width from the mild end (at least steps - 1 above) to harsh
    top = min(max(int(mild), int(harsh) + steps - 1), int(lo))
    grid = tuple(float(b) for b in range(top, int(harsh) - 1, -1))  # mildest (most bits) first
  elif scale == "linear" or mild <= 0:
    grid = tuple(float(x) for x in np.linspace(mild, harsh, steps))
  else:
    grid = tuple(float(x) for x in np.geomspace(mild, harsh, steps))
  grid = tuple(dict.fromkeys(grid))
  drops = {"mild": {n: scores(n, grid[0])[0] for n in (most, least)},
           "harsh": {n: scores(n, grid[-1])[0] for n in (most, least)}}
  return CalibratedGrid(family=family, grid=grid, most_sensitive=most, least_sensitive=least,
                        probe=probe, target_drop=float(target_drop),
                        mild_drop=float(mild_drop), drops=drops, reached=reached,
                        evaluations=count[0], baseline_accuracy=float(base["accuracy"]))
