"""Tests of calibrated magnitude grids."""

import jax
import numpy as np
import pytest
from conftest import train_small

from safer_jax.core import layers, perturb
from safer_jax.measure import grids
from safer_jax.training import train


@pytest.fixture(scope="module")
def mlp(digits):
  model, variables = train_small(digits, "mlp", epochs=3)
  return model, variables, digits.eval.take(200)


@pytest.mark.parametrize("family,seeds", [("noise", (0, 1)), ("prune", (0,))])
def test_calibration_hits_its_target(mlp, family, seeds):
  """The most sensitive layer loses about target_drop at the harshest magnitude and about
  mild_drop at the mildest, checked by perturbing and evaluating by hand."""
  model, variables, split = mlp
  g = grids.calibrate_grid(model, variables, split, family, target_drop=0.4,
                           mild_drop=0.05, steps=4, seeds=seeds)
  assert g.reached and len(g.grid) == 4
  assert list(g.grid) == sorted(g.grid)  # mildest (smallest) first
  base = train.evaluate(model.apply, variables, split)["accuracy"]
  fam = perturb.get_family(family)

  def drop(magnitude):
    w = layers.get_kernel(variables, g.most_sensitive)
    accs = [train.evaluate(model.apply, layers.replace_kernel(
        variables, g.most_sensitive, fam.fn(w, magnitude, jax.random.key(s))), split)["accuracy"]
            for s in seeds]
    return base - float(np.mean(accs))

  harsh, mild = drop(g.grid[-1]), drop(g.grid[0])
  assert harsh == pytest.approx(g.drops["harsh"][g.most_sensitive])
  assert 0.4 <= harsh <= 0.4 + 0.1
  assert 0.05 <= mild <= 0.05 + 0.1
  # the least sensitive layer loses less at the harshest magnitude
  assert g.drops["harsh"][g.least_sensitive] <= harsh


def test_calibrated_bit_widths_are_consecutive_integers(mlp):
  model, variables, split = mlp
  g = grids.calibrate_grid(model, variables, split, "quantize", target_drop=0.3, steps=4)
  bits = [int(b) for b in g.grid]
  assert bits == list(range(bits[0], bits[-1] - 1, -1)) and len(bits) >= 4


def test_calibration_rejects_bad_input(mlp):
  model, variables, split = mlp
  with pytest.raises(ValueError, match="family='corrupt'.*allowed"):
    grids.calibrate_grid(model, variables, split, "corrupt")
  with pytest.raises(ValueError, match="mild_drop=0.5"):
    grids.calibrate_grid(model, variables, split, "noise", target_drop=0.3, mild_drop=0.5)
