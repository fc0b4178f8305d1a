"""Tests of the qwix deployment path: rules round trip, qwix's convention, qwix-quantized models."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix

from safer_jax import deploy, layers, models, perturb
from safer_jax.errors import ConfigError


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_full_range_is_qwix_convention(bits):
  w = jax.random.normal(jax.random.key(bits), (3, 3, 8, 16))
  w = w.at[..., 3].set(0.0)  # an all-zero channel
  w = w.at[..., 5].set(0.0).at[0, 0, 0, 5].set(-(2 ** (bits - 1) - 0.5))  # scale 1: code -2^(b-1)
  ours = np.asarray(perturb.quantize(w, bits, full_range=True))
  # qwix itself, bit for bit.
  theirs = qwix.dequantize(qwix.quantize(w, f"int{bits}", channelwise_axes=(3,)))
  np.testing.assert_array_equal(ours, np.asarray(theirs))
  # independent NumPy reference (float64): scale max|w| / (2^(b-1) - 0.5), every signed code.
  grid = perturb.quantize_grid(w, bits, full_range=True)
  x = np.asarray(w, np.float64)
  amax = np.max(np.abs(x), axis=(0, 1, 2), keepdims=True)
  scale = np.where(amax > 0, amax / (2 ** (bits - 1) - 0.5), 1.0)
  np.testing.assert_allclose(np.asarray(grid.scale), scale, rtol=3e-7)
  exact = x / np.asarray(grid.scale, np.float64)
  codes = np.clip(np.round(exact), -2 ** (bits - 1), 2 ** (bits - 1) - 1)
  near_tie = np.abs(np.abs(exact - np.floor(exact)) - 0.5) < 1e-5  # float32 rounding may flip
  np.testing.assert_array_equal(np.asarray(grid.codes)[~near_tie], codes[~near_tie])
  assert codes.min() == -2 ** (bits - 1) and codes.max() == 2 ** (bits - 1) - 1  # full range
  np.testing.assert_array_equal(ours, np.asarray(perturb.dequantize(grid)))
  np.testing.assert_array_equal(np.asarray(perturb.quantize(w, bits)), ours)  # the default
  assert not np.array_equal(np.asarray(perturb.quantize(w, bits, full_range=False)), ours)


def test_rules_round_trip_and_first_match():
  bits = {"conv1/conv": 8, "conv2/conv": 3, "dense1/fc": 2, "head/fc": 4}
  rules = deploy.to_qwix_rules(bits)
  assert [r.module_path for r in rules] == [re.escape(n) for n in bits]
  names = list(bits) + ["other/fc"]
  assert deploy.from_qwix_rules(rules, names) == bits
  assert deploy.from_qwix_rules(deploy.rules_to_json(rules), names) == bits  # via JSON
  # qwix applies the first rule that matches: a later catch-all only covers the rest.
  rules = [*deploy.to_qwix_rules({"head/fc": 8}), qwix.QtRule(module_path=".*",
                                                               weight_qtype=jnp.int4)]
  assert deploy.from_qwix_rules(rules, names) == {n: (8 if n == "head/fc" else 4) for n in names}
  with pytest.raises(ConfigError, match="bits=9"):
    deploy.to_qwix_rules({"head/fc": 9})
  with pytest.raises(ConfigError, match="weight_qtype='nf4'"):
    deploy.from_qwix_rules([{"module_path": ".*", "weight_qtype": "nf4"}], names)


def test_qwix_quantized_lenet_equals_ours(digits):
  """int4: the same logits bit for bit; int8: within 1e-2 (qwix computes in another order)."""
  model = models.get_model("lenet")
  images = jnp.asarray(digits.eval.images[:128])
  variables = model.init(jax.random.key(0), images[:1])
  names = layers.find_layers(variables)
  for b, atol in ((4, 0.0), (8, 1e-2)):
    alloc = {n: b for n in names}
    theirs = deploy.quantized_apply(model, deploy.to_qwix_rules(alloc))(variables, images)
    ours_vars = variables
    for n in names:
      ours_vars = layers.replace_kernel(
          ours_vars, n, perturb.quantize(layers.get_kernel(variables, n), b, full_range=True))
    ours = model.apply(ours_vars, images)
    np.testing.assert_allclose(np.asarray(theirs), np.asarray(ours), atol=atol, rtol=0)
  # mixed widths: the rules of an allocation quantize each layer at its own width.
  alloc = dict(zip(names, (8, 2, 3, 4)))
  theirs = deploy.quantized_apply(model, deploy.to_qwix_rules(alloc))(variables, images)
  ours_vars = variables
  for n, b in alloc.items():
    ours_vars = layers.replace_kernel(
        ours_vars, n, perturb.quantize(layers.get_kernel(variables, n), b, full_range=True))
  np.testing.assert_allclose(np.asarray(theirs), np.asarray(model.apply(ours_vars, images)),
                             atol=1e-2, rtol=0)


def test_group_wise_is_qwix_tile_size(digits):
  """Group-wise scales on Dense kernels equal qwix's sub-channel tiles; convolutions keep channels."""
  w = jax.random.normal(jax.random.key(0), (64, 10))
  for b in (3, 4, 8):
    theirs = qwix.dequantize(qwix.quantize(w, f"int{b}", channelwise_axes=(1,),
                                           tiled_axes={0: 16}))
    np.testing.assert_array_equal(perturb.quantize(w, b, full_range=True, group_size=16), theirs)
  # NumPy: a scale per (group of 16 rows, channel).
  ref = np.asarray(w).reshape(4, 16, 10)
  scale = np.asarray(perturb.quantize_grid(w, 4, full_range=True, group_size=16).scale)
  np.testing.assert_allclose(scale, np.abs(ref).max(axis=1, keepdims=True) / 7.5, rtol=3e-7)
  conv = jax.random.normal(jax.random.key(1), (3, 3, 4, 8))
  np.testing.assert_array_equal(perturb.quantize(conv, 4, group_size=16), perturb.quantize(conv, 4))
  with pytest.raises(ValueError, match="group_size=12 does not divide"):
    perturb.quantize(w, 4, group_size=12)
  # the model: lenet's Dense layers tiled by qwix, its convolutions per channel.
  model = models.get_model("lenet")
  images = jnp.asarray(digits.eval.images[:128])
  variables = model.init(jax.random.key(0), images[:1])
  alloc = {n: 4 for n in layers.find_layers(variables)}
  rules = deploy.to_qwix_rules(alloc, group_size=32, variables=variables)
  assert [r.tile_size for r in rules] == [None, None, 32, 32]  # conv1, conv2, dense1, head
  theirs = deploy.quantized_apply(model, rules)(variables, images)
  ours_vars = variables
  for n in alloc:
    ours_vars = layers.replace_kernel(ours_vars, n, perturb.quantize(
        layers.get_kernel(variables, n), 4, full_range=True, group_size=32))
  np.testing.assert_array_equal(np.asarray(theirs), np.asarray(model.apply(ours_vars, images)))
  with pytest.raises(ConfigError, match="needs variables"):
    deploy.to_qwix_rules(alloc, group_size=32)
