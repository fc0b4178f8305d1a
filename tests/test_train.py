"""Tests of safer_jax.training.train: evaluate against NumPy, determinism."""

import dataclasses
import inspect

import jax
import numpy as np
import pytest
from compile_log import compile_log

from safer_jax.core import data
from safer_jax.training import train
from safer_jax.zoo import models


def _numpy_metrics(logits, labels):
  logits = np.asarray(logits, np.float64)
  z = logits - logits.max(1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(1, keepdims=True))
  return (logits.argmax(1) == labels).mean(), -logp[np.arange(labels.size), labels].mean()


def test_evaluate_matches_numpy_and_is_batch_size_independent(digits):
  model = models.get_model("lenet")
  variables = train.init_variables(model, digits.input_shape, 3)
  logits = model.apply(variables, digits.eval.images)
  acc, loss = _numpy_metrics(logits, digits.eval.labels)
  for bs in (1024, 100, 7):  # 359 examples: padded, masked last batch
    m = train.evaluate(model.apply, variables, digits.eval, batch_size=bs)
    assert m["num_examples"] == len(digits.eval)
    np.testing.assert_allclose(m["accuracy"], acc, atol=1e-9)
    np.testing.assert_allclose(m["loss"], loss, rtol=1e-5)


def test_init_variables_equals_flax_init_op_by_op():
  """The compiled init gives ``model.init``'s values bit for bit, and once per configuration."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  for name in ("lenet", "resnet8"):
    model = models.get_model(name, num_classes=5)  # a configuration no other test builds
    want = model.init(jax.random.key(4), np.zeros((1, 8, 8, 1), np.float32))  # op by op
    with compile_log() as log:
      got = train.init_variables(model, (8, 8, 1), 4)
      again = train.init_variables(models.get_model(name, num_classes=5), (8, 8, 1), 4)
    inits = sum(n for f, n in log.items() if f == "jit(_init)")  # train._init, jitted
    assert inits == 1, log  # one program, reused by an equal module
    paths = lambda tree: [jax.tree_util.keystr(p) for p, _ in
                          jax.tree_util.tree_leaves_with_path(tree)]
    assert paths(got) == paths(want) == paths(again)
    for a, b, c in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(again)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
      np.testing.assert_array_equal(np.asarray(c), np.asarray(b))

  class Listy(nn.Module):  # a list attribute: unhashable, initialised op by op instead
    widths: list

    @nn.compact
    def __call__(self, x):
      return nn.Dense(self.widths[0])(x.reshape(len(x), -1))

  variables = train.init_variables(Listy([3]), (2, 2, 1), 0)
  assert variables["params"]["Dense_0"]["kernel"].shape == (4, 3)


def test_same_seed_gives_identical_parameters(digits):
  small = dataclasses.replace(digits, train=digits.train.take(200))
  config = train.TrainConfig(epochs=2, batch_size=32, seed=5)
  model = models.get_model("resnet8")
  v1, _ = train.train(model, small, config, progress=False)
  v2, _ = train.train(model, small, config, progress=False)
  for a, b in zip(jax.tree.leaves(v1), jax.tree.leaves(v2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  v3, _ = train.train(model, small, dataclasses.replace(config, seed=6), progress=False)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(v1), jax.tree.leaves(v3)))


def test_batchnorm_statistics_are_updated(digits):
  small = dataclasses.replace(digits, train=digits.train.take(128))
  model = models.get_model("resnet8")
  init = train.init_variables(model, small.input_shape, 0)
  trained, _ = train.train(model, small, train.TrainConfig(epochs=1, batch_size=32),
                           progress=False, variables=init)
  mean0 = np.asarray(init["batch_stats"]["stem"]["bn"]["mean"])
  mean1 = np.asarray(trained["batch_stats"]["stem"]["bn"]["mean"])
  assert not np.allclose(mean0, mean1)


def test_recalibrate_bn_default_momentum_is_the_zoos():
  # train cannot import the zoo (the zoo trains with it): the default is a copy, kept equal here.
  default = inspect.signature(train.recalibrate_bn).parameters["momentum"].default
  assert default == models.common.BN_MOMENTUM


def test_fit_refuses_labels_out_of_range_before_training(digits):
  """Labels the logits cannot take, in the training or the eval split: an error, no step."""
  model = models.get_model("mlp")  # 10 logits
  small = dataclasses.replace(digits, train=digits.train.take(64), eval=digits.eval.take(32))
  bad_train = small.train.with_arrays(label=np.where(np.arange(64) == 5, 10, small.train.labels))
  bad_eval = small.eval.with_arrays(label=small.eval.labels + 7)
  steps_run = []

  def make_steps(net, tx):
    step = train.make_train_step(net, tx)
    return lambda epoch: steps_run.append(epoch) or step

  for ds in (dataclasses.replace(small, train=bad_train), dataclasses.replace(small, eval=bad_eval)):
    with pytest.raises(ValueError, match=r"labels range over \[\d+, \d+\] but the model gives 10 "
                                         r"logits.*\[0, 9\]"):
      train.train(model, ds, train.TrainConfig(epochs=1, batch_size=16), progress=False,
                  make_steps=make_steps)
    assert not steps_run


def test_split_take():
  s = data.Split(np.zeros((10, 2, 2, 1), np.float32), np.arange(10, dtype=np.int32))
  assert len(s.take(3)) == 3 and len(s.take(None)) == 10


def test_finetune_keeps_pruning_masks_fixed(digits):
  from safer_jax.core import layers, perturb
  model = models.get_model("lenet")
  variables = train.init_variables(model, digits.input_shape, 0)
  pruned = layers.replace_kernel(variables, "conv2/conv",
                                 perturb.prune(layers.get_kernel(variables, "conv2/conv"), 0.7))
  mask = np.asarray(layers.get_kernel(pruned, "conv2/conv")) != 0
  tuned = train.finetune(model, pruned, digits.train.take(256), 15, masks={"conv2/conv": mask})
  kernel = np.asarray(layers.get_kernel(tuned, "conv2/conv"))
  assert np.all(kernel[~mask] == 0.0)
  assert not np.allclose(kernel[mask], np.asarray(layers.get_kernel(pruned, "conv2/conv"))[mask])
  before = train.evaluate(model.apply, pruned, digits.train.take(256))["loss"]
  assert train.evaluate(model.apply, tuned, digits.train.take(256))["loss"] < before


def test_fit_inits_a_linen_module_whose_train_flag_has_no_default(digits):
  """``sj.fit(Net(), ds)`` with ``__call__(self, x, train)``: init in inference mode, train in
  training mode (BatchNorm statistics move), evaluation in inference mode."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      x = nn.BatchNorm(use_running_average=not train)(nn.Conv(4, (3, 3))(x))
      return nn.Dense(10)(nn.relu(x).reshape(len(x), -1))

  small = dataclasses.replace(digits, train=digits.train.take(256))
  init = train.init_variables(Net(), small.input_shape, 0)
  want = Net().init(jax.random.key(0), np.zeros((1, *small.input_shape), np.float32), train=False)
  np.testing.assert_array_equal(init["params"]["Conv_0"]["kernel"],
                                want["params"]["Conv_0"]["kernel"])
  variables, history = train.train(Net(), small, train.TrainConfig(epochs=8), progress=False)
  assert not np.allclose(variables["batch_stats"]["BatchNorm_0"]["mean"], 0)
  assert history["eval"]["accuracy"] > 0.3
