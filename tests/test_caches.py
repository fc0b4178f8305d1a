"""Tests of the one registry of compiled-program caches: ``safer_jax.clear_caches()``."""

from compile_log import compile_log

import safer_jax as sj
from safer_jax import criteria
from safer_jax.core import data
from safer_jax.measure import memory, sweep
from safer_jax.training import train
from safer_jax.zoo import models


def test_clear_caches_empties_the_criteria_evaluation_memory_and_sweep_caches(digits):
  model = models.get_model("mlp")
  variables = train.init_variables(model, digits.input_shape, 0)
  split = digits.eval.take(64)
  loss_fn = train.task_loss_fn(model, variables)
  batches = data.batches_from_split(digits.train, 32, 1)
  layer = sj.find_layers(variables)[0]
  programs = sweep.programs_for(model)
  assert sweep.programs_for(model) is programs  # kept between sweeps of one model

  def fisher():
    return criteria.fisher(loss_fn, variables["params"], batches)

  def evaluate():
    return train.evaluate(model.apply, variables, split)

  def analysis():
    return memory.program_memory(model, variables, digits.input_shape, layer, 2, 8)

  runs = (fisher, evaluate, analysis)
  with compile_log() as counts:
    first = [run() for run in runs]
    cold = sum(counts.values())
    assert [run() for run in runs] == first
    assert sum(counts.values()) == cold  # every one cached: nothing compiled
    sj.clear_caches()
    for run in runs:  # each compiles again: its cache was emptied
      before = sum(counts.values())
      run()
      assert sum(counts.values()) > before, run.__name__
  assert cold >= 3
  assert sweep.programs_for(model) is not programs

