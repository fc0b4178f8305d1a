"""Tests of the qwix deployment path: rules round trip, qwix's convention, qwix-quantized models."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from flax import nnx

import safer_jax as sj
from safer_jax.budgeting import deploy, mixed_precision
from safer_jax.core import layers, perturb
from safer_jax.core.errors import ConfigError
from safer_jax.zoo import models


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
  """int4: the same logits bit for bit; int8: within 1e-2 (XLA:CPU fuses qwix's int8 dequantization
  into the convolution and computes it with less precision; see safer_jax.budgeting.deploy)."""
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


# -- nnx deployment, embeddings, channel axes, verify (issue #29) -----------------------------


class _NnxMlp(nnx.Module):
  """Three ``nnx.Linear`` layers (``layers/0`` .. ``layers/2``); ``mask`` optional."""

  def __init__(self, rngs):
    self.layers = nnx.List([nnx.Linear(12, 16, rngs=rngs), nnx.Linear(16, 16, rngs=rngs),
                            nnx.Linear(16, 5, rngs=rngs)])

  def __call__(self, x, mask=None):
    for i, layer in enumerate(self.layers):
      x = layer(x)
      x = x if i == len(self.layers) - 1 else jax.nn.relu(x)
    return x if mask is None else x * mask


def _simulated(forward, variables, bits, *inputs, **kwargs):
  """The float forward of ``variables`` quantized by simulation (qwix's grid)."""
  return forward(mixed_precision.quantize_model(variables, bits, full_range=True, **kwargs),
                 *inputs)


def _close(a, b):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def test_nnx_deployment_equals_simulation():
  net = _NnxMlp(nnx.Rngs(0))
  wrapped = sj.wrap(net)
  names = layers.find_layers(wrapped.variables)
  assert names == ["layers/0", "layers/1", "layers/2"]
  x = jax.random.normal(jax.random.key(1), (8, 12))
  other = sj.wrap(_NnxMlp(nnx.Rngs(7))).variables  # not the module's own weights
  forward = jax.jit(wrapped.apply)
  for i, alloc in enumerate(({n: 2 for n in names}, {n: 4 for n in names},
                             {n: 8 for n in names}, dict(zip(names, (3, 8, 5))))):
    model = (net, wrapped)[i % 2]  # a raw nnx module or a wrapped one
    apply = deploy.quantized_apply(model, deploy.to_qwix_rules(alloc, variables=wrapped.variables))
    for variables in (wrapped.variables, other):  # apply runs the variables it is given
      ours = _simulated(forward, variables, alloc, x)
      _close(apply(variables, x), ours)
      assert np.abs(np.asarray(ours - forward(variables, x))).max() > 1e-3  # really quantized
  # several inputs, positional or keyword; and a wrapped model's output picker.
  mask = (jnp.arange(5) % 2).astype(jnp.float32)
  alloc = {n: 4 for n in names}
  ours = _simulated(wrapped.apply, wrapped.variables, alloc, x)
  apply = deploy.quantized_apply(wrapped, deploy.to_qwix_rules(alloc))
  _close(apply(wrapped.variables, x, mask), ours * mask)
  _close(apply(wrapped.variables, x, mask=mask), ours * mask)
  picked = sj.wrap(net, output=lambda out: out[:, :2])
  _close(deploy.quantized_apply(picked, deploy.to_qwix_rules(alloc))(picked.variables, x),
         ours[:, :2])
  assert deploy.channel_axes(net, None, x) == {n: 1 for n in names}
  assert deploy.verify(net, None, dict(zip(names, (3, 8, 5))), x).ok
  assert deploy.verify(picked, None, dict(zip(names, (3, 8, 5))), x).ok
  with pytest.raises(ConfigError, match="plain apply function"):
    deploy.quantized_apply(sj.wrap(lambda v, x: x, {"fc": {"kernel": jnp.ones((2, 2))}}), [])


class _LinenEmbed(nn.Module):
  @nn.compact
  def __call__(self, ids):
    return nn.Dense(4, name="fc")(nn.Embed(10, 8, name="embed")(ids))


class _NnxEmbed(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Embed(10, 8, rngs=rngs)
    self.fc = nnx.Linear(8, 4, rngs=rngs)

  def __call__(self, ids):
    return self.fc(self.embed(ids))


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_embed_layers_are_refused(kind):
  ids = jnp.array([[1, 2, 3], [4, 5, 9]])
  if kind == "linen":
    model = sj.wrap(_LinenEmbed(), _LinenEmbed().init(jax.random.key(0), ids))
  else:
    model = sj.wrap(_NnxEmbed(nnx.Rngs(0)))
  variables = model.variables
  assert layers.find_layers(variables) == ["embed", "fc"]
  assert deploy.deployable_layers(variables) == ["fc"]
  with pytest.raises(ConfigError, match=r"embedding layer\(s\) \['embed'\].*deployable_layers"):
    deploy.to_qwix_rules({"embed": 4, "fc": 4}, variables=variables)
  with pytest.raises(ConfigError, match=r"\['head'\] of the allocation are not layers"):
    deploy.to_qwix_rules({"head": 4}, variables=variables)
  assert len(deploy.to_qwix_rules({"fc": 4}, variables=variables)) == 1
  # why: qwix leaves the lookup float while the simulation quantizes it.
  rule = [qwix.QtRule(module_path="embed", weight_qtype="int4")]
  deployed = deploy.quantized_apply(model, rule)(variables, ids)
  np.testing.assert_array_equal(np.asarray(deployed), np.asarray(model.apply(variables, ids)))
  assert np.abs(np.asarray(_simulated(model.apply, variables, {"embed": 4}, ids)
                           - deployed)).max() > 1e-3


class _OutIn(nn.Module):
  """A kernel stored ``(out, in)`` (GPT-2 Conv1D / hand-written style), used as ``x @ k.T``."""
  features: int

  @nn.compact
  def __call__(self, x):
    k = self.param("kernel", nn.initializers.lecun_normal(), (self.features, x.shape[-1]))
    return x @ k.T


class _OutInNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name="head")(jax.nn.relu(_OutIn(6, name="proj")(x)))


def test_out_in_kernel_axis_is_detected_and_simulated():
  model = _OutInNet()
  x = jax.random.normal(jax.random.key(1), (16, 8))
  variables = model.init(jax.random.key(0), x)
  assert layers.get_kernel(variables, "proj").shape == (6, 8)
  axes = deploy.channel_axes(model, variables, x)
  assert axes == {"proj": 0, "head": 1}
  float_before = model.apply(variables, x)  # jnp.matmul traced (and cached) at these shapes
  for bits, group_size in ((4, None), (3, None), (4, 4)):
    alloc = {"proj": bits}
    rules = deploy.to_qwix_rules(alloc, group_size=group_size, variables=variables)
    theirs = deploy.quantized_apply(model, rules)(variables, x)
    ours = _simulated(model.apply, variables, alloc, x, group_size=group_size, axes={"proj": 0})
    _close(theirs, ours)
    if group_size is None:  # (the default axis would group the 6 output rows by 4: refused)
      default = _simulated(model.apply, variables, alloc, x)
      assert np.abs(np.asarray(default - theirs)).max() > 1e-2  # axis -1: a real mismatch
  # qwix leaves no trace in the float model (no cached quantized jnp.matmul).
  np.testing.assert_array_equal(np.asarray(model.apply(variables, x)), np.asarray(float_before))
  # verify sees it; with the detected axes everything agrees.
  report = deploy.verify(model, variables, {"proj": 4, "head": 4}, x)
  assert report.mismatched == ["proj"] and "axes={'proj': 0}" in str(report)
  assert deploy.verify(model, variables, {"proj": 4, "head": 4}, x, axes=axes).ok
  # axes are checked.
  with pytest.raises(ValueError, match="'nope'"):
    mixed_precision.quantize_model(variables, {"proj": 4}, axes={"nope": 0})
  with pytest.raises(ValueError, match=r"axes\['proj'\]=2 .*shape \(6, 8\)"):
    mixed_precision.quantize_model(variables, {"proj": 4}, axes={"proj": 2})
  with pytest.raises(ValueError, match=r"axes\['proj'\]=\(0, -2\)"):
    mixed_precision.quantize_model(variables, {"proj": 4}, axes={"proj": (0, -2)})


def test_dense_general_scales_per_output_pair():
  """qwix: one scale per (head, head_dim) of a DenseGeneral ``(in, heads, head_dim)`` kernel."""

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      y = nn.DenseGeneral((3, 4), name="qkv")(x)          # kernel (8, 3, 4)
      return nn.DenseGeneral(5, axis=(-2, -1), name="out")(y)  # kernel (3, 4, 5)

  model = Net()
  x = jax.random.normal(jax.random.key(1), (6, 8))
  variables = model.init(jax.random.key(0), x)
  axes = deploy.channel_axes(model, variables, x)
  assert axes == {"qkv": (1, 2), "out": 2}
  alloc = {"qkv": 4, "out": 4}
  theirs = deploy.quantized_apply(model, deploy.to_qwix_rules(alloc))(variables, x)
  _close(theirs, _simulated(model.apply, variables, alloc, x, axes=axes))
  assert np.abs(np.asarray(_simulated(model.apply, variables, alloc, x) - theirs)).max() > 1e-2
  # (1, 2) = the kernel flattened to (in, heads * head_dim), per column.
  k = layers.get_kernel(variables, "qkv")
  flat = perturb.quantize(k.reshape(8, 12), 4).reshape(k.shape)
  q = mixed_precision.quantize_model(variables, {"qkv": 4}, axes={"qkv": (1, 2)})
  np.testing.assert_array_equal(np.asarray(layers.get_kernel(q, "qkv")), np.asarray(flat))


def test_verify_plain_mlp_and_a_layer_qwix_skips():
  class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(4, name="fc2")(nn.relu(nn.Dense(16, name="fc1")(x)))

  x = jax.random.normal(jax.random.key(1), (8, 10))
  variables = Mlp().init(jax.random.key(0), x)
  report = deploy.verify(Mlp(), variables, {"fc1": 3, "fc2": 8}, x)
  assert report.ok and report.mismatched == [] and report.allocation.ok, str(report)
  assert all(0 < row.sim_effect and row.diff <= 1e-4 for row in report.layers)
  assert "deploys as simulated" in str(report)

  class Scale(nn.Module):
    """A per-channel scale written as a multiply (as the zoo's depthwise convolutions are)."""

    @nn.compact
    def __call__(self, x):
      return x * self.param("kernel", nn.initializers.normal(1.0), (x.shape[-1],))

  class Net(nn.Module):
    @nn.compact
    def __call__(self, ids):
      return nn.Dense(4, name="fc")(Scale(name="scale")(nn.Embed(10, 8, name="embed")(ids)))

  ids = jnp.array([[1, 2, 3], [4, 5, 9]])
  variables = Net().init(jax.random.key(0), ids)
  report = deploy.verify(Net(), variables, {"embed": 4, "scale": 4, "fc": 4}, ids)
  assert report.mismatched == ["embed", "scale"] and not report.ok
  text = str(report)
  assert "2 of 3 layers differ" in text and text.count("qwix leaves it float") == 2, text
  assert all(row.qwix_effect == 0 for row in report.layers[:2])  # qwix: exactly the float model
  assert report.layers[2].ok and report.layers[2].qwix_effect > 1e-3
  with pytest.raises(deploy.DeploymentMismatch, match="embed"):
    deploy.verify(Net(), variables, {"embed": 4}, ids, raise_on_mismatch=True)
