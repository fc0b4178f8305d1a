"""Tests of the zoo's tiny Vision Transformer (``vit_tiny``, safer_jax/zoo/models/vit.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from safer_jax.core import layers, perturb
from safer_jax.training import train
from safer_jax.zoo import models
from safer_jax.zoo.models import vit

# vit_tiny: 2x2 patches of 8x8x1 digits -> 16 tokens, dim 32, 2 blocks, 4 heads of 8, MLP 64.
EXPECTED_LAYERS = [
    "embed/patch",
    "block1/attn/query", "block1/attn/key", "block1/attn/value", "block1/attn/out",
    "block1/mlp/fc1", "block1/mlp/fc2",
    "block2/attn/query", "block2/attn/key", "block2/attn/value", "block2/attn/out",
    "block2/mlp/fc1", "block2/mlp/fc2",
    "head/fc",
]


@pytest.fixture(scope="module")
def vit_tiny():
  model = models.get_model("vit_tiny")
  # = train.init_variables(model, (8, 8, 1), 0), jitted: eager init takes seconds.
  return model, dict(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 1))))


def _leaf_paths(tree):
  return {"/".join(str(k.key) for k in path): leaf.shape
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_parameter_paths_and_shapes(vit_tiny):
  model, variables = vit_tiny
  assert set(variables) == {"params"}  # no BatchNorm state, no dropout.
  assert model.stage_names == ("embed", "block1", "block2", "head")
  block = {
      "attn/query/kernel": (32, 4, 8), "attn/query/bias": (4, 8),
      "attn/key/kernel": (32, 4, 8), "attn/key/bias": (4, 8),
      "attn/value/kernel": (32, 4, 8), "attn/value/bias": (4, 8),
      "attn/out/kernel": (4, 8, 32), "attn/out/bias": (32,),
      "ln1/scale": (32,), "ln1/bias": (32,), "ln2/scale": (32,), "ln2/bias": (32,),
      "mlp/fc1/kernel": (32, 64), "mlp/fc1/bias": (64,),
      "mlp/fc2/kernel": (64, 32), "mlp/fc2/bias": (32,),
  }
  expected = {"embed/patch/kernel": (4, 32), "embed/patch/bias": (32,),
              "embed/pos_embedding": (1, 16, 32),
              "head/ln/scale": (32,), "head/ln/bias": (32,),
              "head/fc/kernel": (32, 10), "head/fc/bias": (10,)}
  for b in ("block1", "block2"):
    expected.update({f"{b}/{k}": v for k, v in block.items()})
  assert _leaf_paths(variables["params"]) == expected
  assert sum(int(np.prod(s)) for s in expected.values()) == 18_154


def test_find_layers_sees_the_attention_projections(vit_tiny):
  model, variables = vit_tiny
  assert sorted(layers.find_layers(variables)) == sorted(EXPECTED_LAYERS)
  # The pos embedding is a parameter, not a layer; every layer belongs to a stage.
  assert not any("pos_embedding" in name for name in layers.find_layers(variables))
  order = layers.execution_order(model.apply, variables, jnp.zeros((1, 8, 8, 1)))
  assert order == EXPECTED_LAYERS
  assert layers.select_layers(variables, r".*/attn/(query|key|value|out)") == [
      n for n in layers.find_layers(variables) if "/attn/" in n]


def test_per_channel_perturbations_of_3d_kernels(vit_tiny):
  """Per-channel quantization / structured pruning use the last kernel axis of (dim, heads, hd)."""
  model, variables = vit_tiny
  w = layers.get_kernel(variables, "block1/attn/query")
  grid = perturb.quantize_grid(w, 4)
  assert grid.scale.shape == (1, 1, 8)
  # qwix's full signed grid (the default): scale max|w| / 7.5 per last-axis channel
  np.testing.assert_allclose(grid.scale.reshape(-1), np.abs(np.asarray(w)).max((0, 1)) / 7.5,
                             rtol=1e-6)
  # Structured pruning with include_bias: the (heads, head_dim) bias loses channel j of every
  # head. (flax inits biases to 0, so the bias is shifted first to see what is zeroed.)
  bias = np.asarray(layers.get_layer_params(variables, "block1/attn/query")["bias"]) + 1.0
  shifted = layers.replace_leaves(variables, "block1/attn/query", {"bias": bias})
  pruned = perturb.perturb_params(shifted, "block1/attn/query", "prune", 0.5, None,
                                  method="structured", include_bias=True)
  k = np.asarray(layers.get_kernel(pruned, "block1/attn/query"))
  gone = np.all(k == 0, axis=(0, 1))
  assert int(gone.sum()) == 4  # 4 of the 8 last-axis channels, in every head
  np.testing.assert_array_equal(
      layers.get_layer_params(pruned, "block1/attn/query")["bias"], np.where(gone, 0.0, bias))
  out = perturb.perturb_params(variables, "block1/attn/out", "quantize", 2, None)
  assert perturb.quantize_grid(layers.get_kernel(variables, "block1/attn/out"), 2).scale.shape \
      == (1, 1, 32)
  logits = model.apply(out, jnp.ones((2, 8, 8, 1)))
  assert logits.shape == (2, 10) and np.all(np.isfinite(logits))


def test_staged_forward_equals_full_forward(vit_tiny):
  model, variables = vit_tiny
  x = jax.random.uniform(jax.random.key(1), (5, 8, 8, 1))
  full = model.apply(variables, x)
  assert full.shape == (5, 10)
  np.testing.assert_array_equal(model.apply(variables, x, train=True), full)  # deterministic
  h = x
  for k in range(len(model.stage_names)):
    h = model.apply(variables, h, start=k, stop=k + 1)
  np.testing.assert_allclose(h, full, rtol=1e-5, atol=1e-6)
  for k in range(1, len(model.stage_names)):
    mid = model.apply(variables, x, stop=k)
    assert mid.shape == (5, 16, 32)  # tokens after embed and after each block
    np.testing.assert_allclose(model.apply(variables, mid, start=k), full, rtol=1e-5, atol=1e-6)


def test_other_image_sizes_and_bad_patch():
  model = models.get_model("vit_tiny", num_classes=3)
  v = jax.eval_shape(lambda: train.init_variables(model, (12, 8, 3), seed=0))  # shapes only
  assert v["params"]["embed"]["pos_embedding"].shape == (1, 24, 32)
  assert jax.eval_shape(model.apply, v, jnp.ones((2, 12, 8, 3))).shape == (2, 3)
  x = np.arange(2 * 4 * 6 * 3, dtype=np.float32).reshape(2, 4, 6, 3)
  p = np.asarray(vit.patchify(jnp.asarray(x), 2))
  assert p.shape == (2, 6, 12)
  np.testing.assert_array_equal(p[1, 4], x[1, 2:4, 2:4].reshape(-1))  # row 1, column 1
  with pytest.raises(ValueError, match="not divisible by the patch size 2"):
    jax.eval_shape(lambda: train.init_variables(models.get_model("vit_tiny"), (7, 8, 1), 0))


def _np_layer_norm(x, scale, bias, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * scale + bias


def _np_gelu(x):  # flax's nn.gelu default: the tanh approximation.
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _np_mha(x, p):
  """Multi-head self-attention written out with NumPy (float64), x: (B, T, D)."""
  d, heads, hd = p["query"]["kernel"].shape
  wq, wk, wv = (p[n]["kernel"].reshape(d, heads * hd) for n in ("query", "key", "value"))
  bq, bk, bv = (p[n]["bias"].reshape(heads * hd) for n in ("query", "key", "value"))
  b, t, _ = x.shape
  split = lambda a: a.reshape(b, t, heads, hd).transpose(0, 2, 1, 3)  # (B, H, T, hd)
  q, k, v = split(x @ wq + bq), split(x @ wk + bk), split(x @ wv + bv)
  logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)  # (B, H, T, T)
  att = np.exp(logits - logits.max(-1, keepdims=True))
  att /= att.sum(-1, keepdims=True)
  o = (att @ v).transpose(0, 2, 1, 3).reshape(b, t, heads * hd)
  return o @ p["out"]["kernel"].reshape(heads * hd, d) + p["out"]["bias"]


def test_block_matches_numpy_multi_head_attention(vit_tiny):
  """block1 = x + MHA(LN1(x)), then + fc2(gelu(fc1(LN2(.)))), on random weights (not init)."""
  model, variables = vit_tiny
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: rng.normal(0, 0.3, a.shape).astype(np.float32),
                        jax.device_get(variables["params"]))
  x = rng.normal(0, 1, (3, 16, 32)).astype(np.float32)
  got = model.apply({"params": params}, jnp.asarray(x), start=1, stop=2)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["block1"])
  x64 = x.astype(np.float64)
  h = x64 + _np_mha(_np_layer_norm(x64, p["ln1"]["scale"], p["ln1"]["bias"]), p["attn"])
  y = _np_layer_norm(h, p["ln2"]["scale"], p["ln2"]["bias"])
  want = h + _np_gelu(y @ p["mlp"]["fc1"]["kernel"] + p["mlp"]["fc1"]["bias"]) \
      @ p["mlp"]["fc2"]["kernel"] + p["mlp"]["fc2"]["bias"]
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
  # The attention alone differs from the identity by a lot (the check is not vacuous).
  assert np.abs(want - x64).mean() > 0.1
