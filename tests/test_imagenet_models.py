"""Tests of the torchvision-compatible ImageNet models, the weight converter and user checkpoints.

Numerics are checked against an independent NumPy implementation of PyTorch's
semantics (NCHW cross-correlation with explicit symmetric padding, eval-mode
BatchNorm, max-pool padded with -inf) fed a random torchvision-style state dict
built here without torch. Inputs are 32x32 so everything stays fast.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from safer_jax import zoo
from safer_jax.core import checkpoints, data, layers
from safer_jax.zoo import convert, models
from safer_jax.zoo.models import imagenet
from experiments import common as exp_common

EPS = 1e-5  # torchvision BatchNorm epsilon.
MOBILENET_CONFIG = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                    (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


# ---------------------------------------------------------------- torchvision-style state dicts.

def _conv_w(rng, out, cin, k):
  scale = np.sqrt(2.0 / (cin * k * k))
  return (rng.standard_normal((out, cin, k, k), dtype=np.float32) * scale).astype(np.float32)


def _bn(rng, prefix, c):
  return {f"{prefix}.weight": rng.uniform(0.5, 1.5, c).astype(np.float32),
          f"{prefix}.bias": rng.normal(0, 0.1, c).astype(np.float32),
          f"{prefix}.running_mean": rng.normal(0, 0.1, c).astype(np.float32),
          f"{prefix}.running_var": rng.uniform(0.5, 1.5, c).astype(np.float32),
          f"{prefix}.num_batches_tracked": np.array(7, np.int64)}


def resnet_state_dict(depth, num_classes, seed=0):
  """A random ``torchvision.models.resnet{depth}().state_dict()`` as NumPy arrays."""
  rng = np.random.default_rng(seed)
  blocks, bottleneck = {18: ((2, 2, 2, 2), False), 50: ((3, 4, 6, 3), True)}[depth]
  expansion = 4 if bottleneck else 1
  sd = {"conv1.weight": _conv_w(rng, 64, 3, 7), **_bn(rng, "bn1", 64)}
  inplanes = 64
  for i, n in enumerate(blocks):
    planes = 64 * 2**i
    for b in range(n):
      p = f"layer{i + 1}.{b}"
      stride = 2 if (i > 0 and b == 0) else 1
      if bottleneck:
        sd.update({f"{p}.conv1.weight": _conv_w(rng, planes, inplanes, 1),
                   **_bn(rng, f"{p}.bn1", planes),
                   f"{p}.conv2.weight": _conv_w(rng, planes, planes, 3),
                   **_bn(rng, f"{p}.bn2", planes),
                   f"{p}.conv3.weight": _conv_w(rng, planes * 4, planes, 1),
                   **_bn(rng, f"{p}.bn3", planes * 4)})
      else:
        sd.update({f"{p}.conv1.weight": _conv_w(rng, planes, inplanes, 3),
                   **_bn(rng, f"{p}.bn1", planes),
                   f"{p}.conv2.weight": _conv_w(rng, planes, planes, 3),
                   **_bn(rng, f"{p}.bn2", planes)})
      if stride != 1 or inplanes != planes * expansion:
        sd[f"{p}.downsample.0.weight"] = _conv_w(rng, planes * expansion, inplanes, 1)
        sd.update(_bn(rng, f"{p}.downsample.1", planes * expansion))
      inplanes = planes * expansion
  sd["fc.weight"] = rng.normal(0, 0.05, (num_classes, inplanes)).astype(np.float32)
  sd["fc.bias"] = rng.normal(0, 0.1, num_classes).astype(np.float32)
  return sd


def mobilenet_v2_state_dict(num_classes, seed=0):
  """A random ``torchvision.models.mobilenet_v2().state_dict()`` as NumPy arrays."""
  rng = np.random.default_rng(seed)
  sd = {"features.0.0.weight": _conv_w(rng, 32, 3, 3), **_bn(rng, "features.0.1", 32)}
  inp, i = 32, 0
  for t, c, n, _ in MOBILENET_CONFIG:
    for _ in range(n):
      i += 1
      p, hidden, k = f"features.{i}.conv", inp * t, 0
      if t != 1:
        sd.update({f"{p}.0.0.weight": _conv_w(rng, hidden, inp, 1), **_bn(rng, f"{p}.0.1", hidden)})
        k = 1
      sd[f"{p}.{k}.0.weight"] = _conv_w(rng, hidden, 1, 3)
      sd.update(_bn(rng, f"{p}.{k}.1", hidden))
      sd[f"{p}.{k + 1}.weight"] = _conv_w(rng, c, hidden, 1)
      sd.update(_bn(rng, f"{p}.{k + 2}", c))
      inp = c
  sd.update({"features.18.0.weight": _conv_w(rng, 1280, 320, 1), **_bn(rng, "features.18.1", 1280),
             "classifier.1.weight": rng.normal(0, 0.05, (num_classes, 1280)).astype(np.float32),
             "classifier.1.bias": rng.normal(0, 0.1, num_classes).astype(np.float32)})
  return sd


# ---------------------------------------------------------------- NumPy reference (PyTorch).

def np_conv(x, w, stride=1, groups=1):
  """``F.conv2d(x, w, stride=stride, padding=k // 2, groups=groups)``; x NCHW, w (O, C/g, k, k)."""
  o, cg, k, _ = w.shape
  p = k // 2
  x = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
  n, c, h, wd = x.shape
  ho, wo = (h - k) // stride + 1, (wd - k) // stride + 1
  xg = x.reshape(n, groups, cg, h, wd)
  wg = w.reshape(groups, o // groups, cg, k, k).astype(np.float64)
  out = np.zeros((n, groups, o // groups, ho, wo))
  for a in range(k):
    for b in range(k):
      patch = xg[:, :, :, a:a + stride * (ho - 1) + 1:stride, b:b + stride * (wo - 1) + 1:stride]
      out += np.einsum("ngchw,goc->ngohw", patch, wg[:, :, :, a, b])
  return out.reshape(n, o, ho, wo)


def np_bn(x, sd, prefix):
  """Eval-mode ``BatchNorm2d`` with running statistics."""
  shape = (1, -1, 1, 1)
  g, b = sd[f"{prefix}.weight"].reshape(shape), sd[f"{prefix}.bias"].reshape(shape)
  m, v = sd[f"{prefix}.running_mean"].reshape(shape), sd[f"{prefix}.running_var"].reshape(shape)
  return (x - m) / np.sqrt(v.astype(np.float64) + EPS) * g + b


def np_maxpool(x):
  """``F.max_pool2d(x, 3, stride=2, padding=1)`` (padding never wins: -inf)."""
  x = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
  h, w = (x.shape[2] - 3) // 2 + 1, (x.shape[3] - 3) // 2 + 1
  return np.max([x[:, :, a:a + 2 * (h - 1) + 1:2, b:b + 2 * (w - 1) + 1:2]
                 for a in range(3) for b in range(3)], axis=0)


relu = lambda x: np.maximum(x, 0)  # noqa: E731
relu6 = lambda x: np.clip(x, 0, 6)  # noqa: E731


def np_resnet_stem(x, sd):
  return np_maxpool(relu(np_bn(np_conv(x, sd["conv1.weight"], 2), sd, "bn1")))


def np_resnet_block(x, sd, p, stride, bottleneck):
  if bottleneck:
    y = relu(np_bn(np_conv(x, sd[f"{p}.conv1.weight"]), sd, f"{p}.bn1"))
    y = relu(np_bn(np_conv(y, sd[f"{p}.conv2.weight"], stride), sd, f"{p}.bn2"))
    y = np_bn(np_conv(y, sd[f"{p}.conv3.weight"]), sd, f"{p}.bn3")
  else:
    y = relu(np_bn(np_conv(x, sd[f"{p}.conv1.weight"], stride), sd, f"{p}.bn1"))
    y = np_bn(np_conv(y, sd[f"{p}.conv2.weight"]), sd, f"{p}.bn2")
  if f"{p}.downsample.0.weight" in sd:
    x = np_bn(np_conv(x, sd[f"{p}.downsample.0.weight"], stride), sd, f"{p}.downsample.1")
  return relu(x + y)


def np_resnet18(x, sd):
  """Full eval-mode torchvision ResNet-18 forward: NCHW images -> logits."""
  x = np_resnet_stem(x, sd)
  for i in range(4):
    for b in range(2):
      x = np_resnet_block(x, sd, f"layer{i + 1}.{b}", 2 if (i > 0 and b == 0) else 1, False)
  return x.mean(axis=(2, 3)) @ sd["fc.weight"].T + sd["fc.bias"]


def np_inverted_residual(x, sd, i, t, stride):
  p, k, y = f"features.{i}.conv", 0, x
  if t != 1:
    y = relu6(np_bn(np_conv(y, sd[f"{p}.0.0.weight"]), sd, f"{p}.0.1"))
    k = 1
  w = sd[f"{p}.{k}.0.weight"]
  y = relu6(np_bn(np_conv(y, w, stride, groups=w.shape[0]), sd, f"{p}.{k}.1"))
  y = np_bn(np_conv(y, sd[f"{p}.{k + 1}.weight"]), sd, f"{p}.{k + 2}")
  return x + y if stride == 1 and x.shape[1] == y.shape[1] else y


def nhwc(x):
  return np.asarray(x).transpose(0, 2, 3, 1)


def nchw(x):
  return np.asarray(x, np.float64).transpose(0, 3, 1, 2)


def assert_close(got, want, tol=1e-4):
  want = np.asarray(want)
  np.testing.assert_allclose(np.asarray(got), want, rtol=tol,
                             atol=tol * max(1.0, np.abs(want).max()))


@pytest.fixture(scope="module")
def resnet18_sd():
  return resnet_state_dict(18, num_classes=5)


@pytest.fixture(scope="module")
def images():
  return np.random.default_rng(1).standard_normal((2, 32, 32, 3)).astype(np.float32)


def _tiny_dataset(num_classes=5, input_shape=(32, 32, 3), name="tiny_rgb"):
  rng = np.random.default_rng(0)
  split = data.Split(rng.standard_normal((4, *input_shape)).astype(np.float32),
                     rng.integers(0, num_classes, 4).astype(np.int32))
  return data.Dataset(name=name, train=split, eval=split, num_classes=num_classes,
                      input_shape=input_shape)


# ---------------------------------------------------------------- architecture.

@pytest.mark.parametrize("name,count", [("resnet18", 11_689_512), ("resnet34", 21_797_672),
                                        ("resnet50", 25_557_032),
                                        ("mobilenet_v2_imagenet", 3_504_872)])
def test_param_counts_equal_torchvision(name, count):
  model = models.get_model(name, num_classes=1000)
  abstract = convert.abstract_variables(model, (224, 224, 3))  # eval_shape: nothing allocated.
  assert sum(x.size for x in jax.tree.leaves(abstract["params"])) == count


def test_reference_state_dicts_have_torchvision_counts():
  """The random state dicts used below have torchvision's parameter counts (buffers excluded)."""
  def count(sd):
    return sum(v.size for k, v in sd.items() if k.endswith(("weight", "bias")))
  assert count(resnet_state_dict(50, 1000)) == 25_557_032
  assert count(mobilenet_v2_state_dict(1000)) == 3_504_872


def test_stage_and_layer_names():
  r18 = models.get_model("resnet18")
  assert r18.stage_names == ("stem", *(f"layer{i}_block{b}" for i in (1, 2, 3, 4) for b in (1, 2)),
                             "head")
  v = convert.abstract_variables(models.get_model("resnet50"))
  found = layers.find_layers(v)
  assert len(found) == 54 and {"stem/conv", "head/fc", "layer2_block1/downsample"} <= set(found)
  assert [p for p in found if p.startswith("layer1_block1/")] == [
      "layer1_block1/conv1", "layer1_block1/conv2", "layer1_block1/conv3",
      "layer1_block1/downsample"]
  assert "layer2_block2/downsample" not in found
  mb = models.get_model("mobilenet_v2_imagenet")
  assert mb.stage_names == ("stem", *(f"block{i}" for i in range(1, 18)), "last", "head")
  mv = convert.abstract_variables(mb)
  assert "expand" not in mv["params"]["block1"] and "expand" in mv["params"]["block2"]
  assert mv["params"]["block2"]["depthwise"]["kernel"].shape == (3, 3, 1, 96)


def assert_stages_compose(model, variables, x, full, k):
  """Prefix ``stop=k`` then suffix ``start=k`` equals the full forward ``full``."""
  apply = jax.jit(model.apply, static_argnames=("start", "stop"))
  h = apply(variables, x, stop=k)
  assert_close(apply(variables, h, start=k), full, 1e-5)
  stages = set(model.stage_names)
  assert all(p.split("/")[0] in stages for p in layers.find_layers(variables))


def test_mobilenet_v2_stage_prefix_suffix_equals_full_forward():
  """(resnet18's composition is checked in test_from_checkpoint_npz_logits_match_numpy.)"""
  model = models.get_model("mobilenet_v2_imagenet", num_classes=7)
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  variables = convert.load_torchvision_npz(mobilenet_v2_state_dict(7), "mobilenet_v2_imagenet")
  full = jax.jit(model.apply)(variables, x)
  assert full.shape == (2, 7) and np.all(np.isfinite(full))
  assert_stages_compose(model, variables, x, full, k=10)


def test_blocks_init_like_torchvision_on_small_inputs():
  block = imagenet.BasicBlock(64, strides=2)
  variables = jax.jit(block.init)(jax.random.key(0), jnp.ones((1, 5, 5, 64)))
  assert set(variables) == {"params", "batch_stats"} and "downsample" in variables["params"]
  kernel = np.asarray(variables["params"]["conv1"]["kernel"])
  assert kernel.shape == (3, 3, 64, 64)
  assert np.std(kernel) == pytest.approx(np.sqrt(2 / (9 * 64)), rel=0.05)  # Kaiming, fan-out.
  assert block.apply(variables, jnp.ones((1, 5, 5, 64))).shape == (1, 3, 3, 64)


# ---------------------------------------------------------------- numerics vs the NumPy reference.

def test_resnet18_stem_and_first_block_match_numpy(resnet18_sd, images):
  model = models.get_model("resnet18", num_classes=5)
  variables = convert.load_torchvision_npz(resnet18_sd, "resnet18")
  stem = model.apply(variables, jnp.asarray(images), stop=1)
  ref_stem = np_resnet_stem(nchw(images), resnet18_sd)
  assert stem.shape == (2, 8, 8, 64)
  assert_close(stem, nhwc(ref_stem))
  block = model.apply(variables, stem, start=1, stop=2)
  assert_close(block, nhwc(np_resnet_block(ref_stem, resnet18_sd, "layer1.0", 1, False)))
  # A stride-2 block with downsample, on an even map (where 'SAME' padding would differ).
  k = model.stage_names.index("layer2_block1")
  h = np.random.default_rng(2).standard_normal((2, 8, 8, 64)).astype(np.float32)
  got = model.apply(variables, jnp.asarray(h), start=k, stop=k + 1)
  assert_close(got, nhwc(np_resnet_block(nchw(h), resnet18_sd, "layer2.0", 2, False)))


def test_resnet50_bottleneck_with_downsample_matches_numpy():
  sd = resnet_state_dict(50, num_classes=3)
  model = models.get_model("resnet50", num_classes=3)
  variables = convert.load_torchvision_npz(sd, "resnet50")
  rng = np.random.default_rng(3)
  for stage, p, stride, cin, hw in [("layer2_block1", "layer2.0", 2, 256, 8),
                                    ("layer1_block1", "layer1.0", 1, 64, 6)]:
    k = model.stage_names.index(stage)
    h = rng.standard_normal((2, hw, hw, cin)).astype(np.float32)
    got = model.apply(variables, jnp.asarray(h), start=k, stop=k + 1)
    assert_close(got, nhwc(np_resnet_block(nchw(h), sd, p, stride, True)))


def test_mobilenet_v2_stem_and_inverted_residuals_match_numpy(images):
  sd = mobilenet_v2_state_dict(num_classes=4)
  model = models.get_model("mobilenet_v2_imagenet", num_classes=4)
  variables = convert.load_torchvision_npz(sd, "mobilenet_v2_imagenet")
  ref = relu6(np_bn(np_conv(nchw(images), sd["features.0.0.weight"], 2), sd, "features.0.1"))
  ours = model.apply(variables, jnp.asarray(images), stop=1)
  assert_close(ours, nhwc(ref))
  # block1: t=1 (no expand); block2: stride-2 depthwise; block3: residual.
  for k, (t, stride) in enumerate([(1, 1), (6, 2), (6, 1)], start=1):
    ref = np_inverted_residual(ref, sd, k, t, stride)
    ours = model.apply(variables, ours, start=k, stop=k + 1)
    assert_close(ours, nhwc(ref))
  assert ours.shape == (2, 8, 8, 24)


# ---------------------------------------------------------------- converter errors.

def test_converter_reports_missing_extra_and_misshaped_keys(resnet18_sd):
  sd = dict(resnet18_sd)
  del sd["layer1.0.conv1.weight"]
  with pytest.raises(ValueError, match=r"missing keys: layer1\.0\.conv1\.weight"):
    convert.load_torchvision_npz(sd, "resnet18")
  sd = dict(resnet18_sd, **{"extra.weight": np.zeros(3, np.float32)})
  with pytest.raises(ValueError, match=r"unexpected keys: extra\.weight"):
    convert.load_torchvision_npz(sd, "resnet18")
  sd = dict(resnet18_sd, **{"conv1.weight": np.zeros((64, 3, 5, 5), np.float32)})
  with pytest.raises(ValueError, match=r"conv1\.weight has shape \(64, 3, 5, 5\), "
                                       r"expected \(64, 3, 7, 7\)"):
    convert.load_torchvision_npz(sd, "resnet18")
  with pytest.raises(ValueError, match=r"fc\.weight has shape \(5, 512\), expected \(10, 512\)"):
    convert.load_torchvision_npz(resnet18_sd, "resnet18", num_classes=10)
  with pytest.raises(ValueError, match=r"No torchvision converter for model 'resnet8'.*resnet18"):
    convert.load_torchvision_npz(resnet18_sd, "resnet8")
  with pytest.raises(ValueError, match=r"unexpected keys: .*layer1\.0\.conv3"):
    convert.load_torchvision_npz(resnet_state_dict(50, 5), "resnet18")


# ---------------------------------------------------------------- orbax and user checkpoints.

def test_orbax_round_trip_both_formats(tmp_path):
  model = models.get_model("mobilenet_v2_imagenet", num_classes=4)
  variables = convert.load_torchvision_npz(mobilenet_v2_state_dict(num_classes=4),
                                           "mobilenet_v2_imagenet")
  plain = str(tmp_path / "plain")
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(plain, variables)
  zoo_format = str(tmp_path / "zoo")
  checkpoints.save_checkpoint(zoo_format, variables, {"model": "mobilenet_v2_imagenet"})
  for path in (plain, zoo_format):
    restored = convert.load_orbax(path, model, (32, 32, 3))
    assert jax.tree.structure(restored) == jax.tree.structure(variables)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(variables)):
      np.testing.assert_array_equal(np.asarray(a), b)
  other = models.get_model("mobilenet_v2_imagenet", num_classes=9)
  with pytest.raises(ValueError, match=r"params/head/fc/kernel has shape \(1280, 4\), "
                                       r"expected \(1280, 9\)"):
    convert.load_orbax(plain, other, (32, 32, 3))
  with pytest.raises(ValueError, match=r"missing: params/layer1_block1/bn1/bias.*"
                                       r"unexpected: params/block1/depthwise/kernel.*"
                                       r"shape mismatches: params/head/fc/kernel has shape "
                                       r"\(1280, 4\), expected \(512, 4\)"):
    convert.load_orbax(zoo_format, models.get_model("resnet18", num_classes=4), (32, 32, 3))
  with pytest.raises(FileNotFoundError):
    convert.load_orbax(str(tmp_path / "nothing"), model, (32, 32, 3))
  entry = zoo.from_checkpoint("mobilenet_v2_imagenet", plain, _tiny_dataset(4))
  assert entry.restored and entry.path == plain and entry.name == "mobilenet_v2_imagenet"
  with pytest.raises(ValueError, match=r"head/fc/kernel.*num_classes=9"):
    zoo.from_checkpoint("mobilenet_v2_imagenet", plain, _tiny_dataset(9))


def test_from_checkpoint_npz_logits_match_numpy(tmp_path, resnet18_sd, images):
  path = str(tmp_path / "resnet18.npz")
  np.savez(path, **resnet18_sd)
  entry = zoo.from_checkpoint("resnet18", path, _tiny_dataset(5))
  assert isinstance(entry, zoo.ZooEntry) and entry.restored and entry.dataset.num_classes == 5
  logits = jax.jit(entry.model.apply)(entry.variables, jnp.asarray(images))
  assert_close(logits, np_resnet18(nchw(images), resnet18_sd))
  assert_stages_compose(entry.model, entry.variables, jnp.asarray(images), logits, k=5)
  with pytest.raises(ValueError, match=r"5 classes but dataset 'tiny_rgb' has 7"):
    zoo.from_checkpoint("resnet18", path, _tiny_dataset(7))
  with pytest.raises(ValueError, match=r"does not accept 'gray' images of shape \(32, 32, 1\)"):
    zoo.from_checkpoint("resnet18", path, _tiny_dataset(5, (32, 32, 1), "gray"))
  bad = dict(resnet18_sd)
  bad["layer3.1.bn2.running_var"] = bad["layer3.1.bn2.running_var"].copy()
  bad["layer3.1.bn2.running_var"][3] = np.nan
  np.savez(str(tmp_path / "nan.npz"), **bad)
  with pytest.raises(ValueError, match=r"'batch_stats'\]\['layer3_block2'\]\['bn2'\]\['var'\] holds NaN "
                                       r"or inf values \(1 of 256"):
    zoo.from_checkpoint("resnet18", str(tmp_path / "nan.npz"), _tiny_dataset(5))
  with pytest.raises(FileNotFoundError):
    zoo.from_checkpoint("resnet18", str(tmp_path / "absent.npz"), _tiny_dataset(5))
  (tmp_path / "weights.pt").write_bytes(b"x")
  with pytest.raises(ValueError, match=r"must be a \.npz file .* or an orbax checkpoint directory"):
    zoo.from_checkpoint("resnet18", str(tmp_path / "weights.pt"), _tiny_dataset(5))


def test_experiment_config_checkpoint_loads_user_weights(tmp_path, digits):
  """``--config.checkpoint=PATH`` makes experiments.common.pretrained load PATH (no training)."""
  model = models.get_model("mlp", num_classes=digits.num_classes)
  variables = model.init(jax.random.key(3), jnp.zeros((1, *digits.input_shape)))
  path = str(tmp_path / "mlp_ckpt")
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, variables)
  config = exp_common.base_config(model="mlp", dataset="digits")
  assert config.checkpoint is None
  exp_common.apply_overrides(config, [f"checkpoint={path}", f"cache_dir={tmp_path / 'cache'}"])
  entry = exp_common.pretrained(config)
  assert entry.restored and entry.path == path and entry.dataset.name == "digits"
  for a, b in zip(jax.tree.leaves(entry.variables), jax.tree.leaves(variables)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not os.path.exists(tmp_path / "cache")  # nothing trained or cached.
