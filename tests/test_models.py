"""Tests of the model zoo: shapes, names, stages, and that training lowers the loss."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from safer_jax.core import layers
from safer_jax.training import train
from safer_jax.zoo import models

# The ImageNet architectures have their own tests (tests/test_imagenet_models.py): init and
# training them here on digits would take minutes on 2 CPU cores.
ALL = [m for m in models.list_models() if m not in models.IMAGENET_MODELS + models.TEXT_MODELS]


@pytest.mark.parametrize("name", ALL)
def test_output_shape_on_another_input_and_class_count(name):
  """(16, 16, 3) images and 7 classes, traced only (shapes; no compilation).

  (8, 8, 1) and 10 classes run for real, finite outputs included: the stage test below.
  """
  model = models.get_model(name, num_classes=7)
  variables = layers.abstract_variables(model, (16, 16, 3), 0)
  logits = jax.eval_shape(model.apply, variables, jax.ShapeDtypeStruct((3, 16, 16, 3),
                                                                        jnp.float32))
  assert logits.shape == (3, 7) and logits.dtype == jnp.float32


# vit_tiny's stages: tests/test_vit.py (names, every parameter path, stage by stage and
# prefix + suffix against the full forward).
@pytest.mark.parametrize("name", [m for m in ALL if m != "vit_tiny"])
def test_stage_prefix_suffix_equals_full_forward(name):
  """``apply(apply(x, stop=k), start=k) == apply(x)`` at every stage boundary ``k``.

  Init and all the splits run jitted, as the sweep runs them (one program each: run
  op by op, mobilenet_v2's took 17 s of the suite's time on 2 cores, jitted 5 s).
  """
  model = models.get_model(name)
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
  variables = train.init_variables(model, (8, 8, 1), seed=0)  # one compiled program
  num_stages = len(model.stage_names)

  @jax.jit
  def forwards(variables, x):
    return model.apply(variables, x), [
        model.apply(variables, model.apply(variables, x, stop=k), start=k)
        for k in range(1, num_stages)]

  full, splits = forwards(variables, x)
  assert full.shape == (4, 10) and np.all(np.isfinite(full))
  assert len(splits) == num_stages - 1
  for split in splits:
    np.testing.assert_allclose(split, full, rtol=1e-5, atol=1e-5)
  # every layer belongs to a named stage.
  stages = set(model.stage_names)
  assert all(path.split("/")[0] in stages for path in layers.find_layers(variables))


def test_layer_paths_are_stable_names():
  v = train.init_variables(models.get_model("resnet8"), (8, 8, 1), 0)
  # Pytree (sorted) order, the same after init, training and a restore.
  assert layers.find_layers(v) == [
      "head/fc", "stage1_block1/conv1", "stage1_block1/conv2", "stage2_block1/conv1",
      "stage2_block1/conv2", "stage2_block1/shortcut", "stage3_block1/conv1",
      "stage3_block1/conv2", "stage3_block1/shortcut", "stem/conv"]
  mb = layers.abstract_variables(models.get_model("mobilenet_v2"), (8, 8, 1), 0)  # shapes only
  dw = layers.get_kernel(mb, "block2/depthwise")
  assert dw.shape[:3] == (3, 3, 1)  # one input channel per group: depthwise.


def test_unknown_model_lists_valid_names():
  with pytest.raises(ValueError, match=r"Unknown model 'vgg'.*mlp"):
    models.get_model("vgg")


def test_resnet_bad_depth():
  with pytest.raises(ValueError, match="depth=9"):
    train.init_variables(models.ResNet(depth=9), (8, 8, 1), 0)


@pytest.mark.parametrize("name", ALL)
def test_short_training_lowers_loss(name, digits):
  small = dataclasses.replace(digits, train=digits.train.take(256), eval=digits.eval.take(128))
  model = models.get_model(name)
  init = train.init_variables(model, small.input_shape, seed=0)
  before = train.evaluate(model.apply, init, small.train)["loss"]
  # 3 epochs at 1e-2 end at 0.05x (resnet8) to 0.51x (vit_tiny) of the initial loss; 6 at
  # 3e-3 took mobilenet_v2 23 s of the suite's time.
  config = train.TrainConfig(epochs=3, batch_size=32, learning_rate=1e-2)
  variables, history = train.train(model, small, config, progress=False, variables=init)
  after = train.evaluate(model.apply, variables, small.train)["loss"]
  assert after < 0.8 * before, (before, after, history["train_loss"])


@pytest.mark.parametrize("hw,cin,cout,k,stride,padding", [
    (2, 64, 64, 3, 1, "SAME"), (4, 32, 64, 3, 2, "SAME"), (3, 8, 5, 3, 1, "VALID"),
    (2, 16, 8, 1, 1, "SAME"), (8, 4, 6, 3, 1, "SAME"), (5, 3, 7, 3, 2, ((1, 0), (0, 1)))])
def test_zoo_convolution_matches_lax(hw, cin, cout, k, stride, padding):
  from safer_jax.zoo.models import common
  x = jax.random.normal(jax.random.key(0), (7, hw, hw, cin))
  w = jax.random.normal(jax.random.key(1), (k, k, cin, cout))
  dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
  ref = jax.lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=dn)
  got = jax.jit(lambda a, b: common.conv_general_dilated(a, b, (stride, stride), padding,
                                                         dimension_numbers=dn))(x, w)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strides,padding", [((1, 1), "SAME"), ((2, 2), "SAME"), ((1, 1), "VALID"),
                                             ((2, 2), ((1, 0), (0, 1)))])
def test_depthwise_conv_equals_lax_also_under_vmap(strides, padding):
  """Zoo depthwise convs (shifted multiply-adds) equal XLA's grouped conv, also vmapped over kernels."""
  from safer_jax.zoo.models import common
  x = jax.random.normal(jax.random.key(0), (3, 7, 8, 6))
  kernels = jax.random.normal(jax.random.key(1), (4, 3, 3, 1, 6))
  dn = jax.lax.conv_dimension_numbers(x.shape, kernels.shape[1:], ("NHWC", "HWIO", "NHWC"))

  def ref(k):
    return jax.lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=dn,
                                        feature_group_count=6)

  def ours(k):
    return common.conv_general_dilated(x, k, strides, padding, dimension_numbers=dn,
                                       feature_group_count=6)

  # jitted (as the zoo runs them): op by op, the shifted multiply-adds compiled one by one.
  np.testing.assert_allclose(jax.jit(jax.vmap(ours))(kernels), jax.vmap(ref)(kernels), atol=1e-5)
  np.testing.assert_allclose(jax.jit(ours)(kernels[0]), ref(kernels[0]), atol=1e-5)


def test_macs_per_layer_by_hand():
  """MACs per example counted from the model's shapes, checked against the architectures."""
  x = np.zeros((2, 8, 8, 1), np.float32)
  mlp = models.get_model("mlp")  # 64 -> 128 -> 64 -> 10
  assert layers.macs_per_layer(mlp.apply, mlp.init(jax.random.key(0), x), x) == {
      "dense1/fc": 64 * 128, "dense2/fc": 128 * 64, "head/fc": 64 * 10}
  lenet = models.get_model("lenet")  # conv 3x3 1->16 on 8x8, pool, conv 3x3 16->32 on 4x4, pool
  assert layers.macs_per_layer(lenet.apply, lenet.init(jax.random.key(0), x), x) == {
      "conv1/conv": 8 * 8 * 3 * 3 * 1 * 16, "conv2/conv": 4 * 4 * 3 * 3 * 16 * 32,
      "dense1/fc": 2 * 2 * 32 * 64, "head/fc": 64 * 10}
