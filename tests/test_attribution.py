"""Attribution maps, deformation metrics, WCAM loss and compressed fine-tuning."""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
import scipy.stats

from safer_jax import zoo
from safer_jax.budgeting import budget, wcam
from safer_jax.core import layers
from safer_jax.measure import attribution


@pytest.fixture(scope="module")
def lenet(zoo_cache):
  """The zoo's trained LeNet (trained here, in-process, so the launch test only restores it)."""
  entry = zoo.pretrained("lenet", "digits", cache_dir=zoo_cache, progress=False)
  return entry.model, entry.variables, entry.dataset


class TinyConv(nn.Module):
  """conv (3x3, 3 channels) -> ReLU -> global mean pool -> dense head."""

  @nn.compact
  def __call__(self, x, train=False):
    del train
    f = nn.Conv(3, (3, 3), padding="SAME", name="conv")(x)
    return nn.Dense(4, name="head")(jnp.mean(nn.relu(f), axis=(1, 2)))


def test_gradcam_matches_hand_computed_map():
  model = TinyConv()
  x = jax.random.normal(jax.random.key(1), (5, 6, 6, 2))
  variables = model.init(jax.random.key(0), x)
  p = variables["params"]
  # Part 1 by hand: F = conv(x, W) + b.
  F = jax.lax.conv_general_dilated(x, p["conv"]["kernel"], (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["conv"]["bias"]
  # Part 2 by hand: y = mean_hw relu(F) @ Wd + bd, so dy_k/dF_hwc = Wd[c, k] 1[F > 0] / (h w).
  h, w = F.shape[1:3]
  y = jnp.mean(nn.relu(F), axis=(1, 2)) @ p["head"]["kernel"] + p["head"]["bias"]
  given = np.array([0, 1, 2, 3, 1])
  mask = np.array([1.0, 0.0, 1.0])

  @jax.jit
  def maps(v, x):
    return (attribution.gradcam(model, v, x, "conv"), attribution.gradcam(model, v, x, "conv", given),
            attribution.gradcam(model, v, x, "conv", channel_mask=mask),
            attribution.layer_gradient(model, v, x, "conv", given))

  predicted, with_classes, masked, (F2, dF2, _) = maps(variables, x)
  for k, got, m in ((jnp.argmax(y, -1), predicted, 1.0), (given, with_classes, 1.0),
                    (jnp.argmax(y, -1), masked, mask)):
    dF = p["head"]["kernel"][:, k].T[:, None, None, :] * (F > 0) / (h * w)
    wc = dF.sum(axis=(1, 2)) * m
    np.testing.assert_allclose(got, np.maximum(np.einsum("bc,bhwc->bhw", wc, F), 0),
                               rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(F2, F, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(dF2, p["head"]["kernel"][:, given].T[:, None, None, :] * (F > 0)
                             / (h * w), rtol=1e-5, atol=1e-7)


def test_unknown_layer_lists_layers(lenet):
  model, variables, ds = lenet
  with pytest.raises(ValueError, match="conv2/conv"):
    attribution.gradcam(model, variables, ds.eval.images[:2], "nope")


def test_integrated_gradients_completeness(lenet):
  model, variables, ds = lenet
  x = ds.eval.images[:8]
  ig = jax.jit(lambda v, x: attribution.integrated_gradients(model, v, x, steps=64))(variables, x)
  assert ig.attributions.shape == x.shape
  assert float(jnp.max(ig.relative_error)) < 0.01, ig.relative_error
  np.testing.assert_allclose(jnp.sum(ig.attributions, (1, 2, 3)), ig.delta_output,
                             rtol=0.01, atol=1e-4)


def test_input_attributions_are_per_example(lenet):
  model, variables, ds = lenet
  x = jnp.asarray(ds.eval.images[:4])
  classes = np.array([3, 1, 4, 1])

  @jax.jit
  def all_maps(v, x):
    one = jax.vmap(jax.grad(lambda z, k: model.apply(v, z[None], train=False)[0, k]))
    return (attribution.input_gradient(model, v, x, classes), one(x, classes),
            attribution.saliency(model, v, x, classes),
            attribution.gradient_times_input(model, v, x, classes),
            attribution.smoothgrad(model, v, x, jax.random.key(0), classes, samples=4,
                                   noise_level=0.0))

  g, per_example, sal, gxi, sg = all_maps(variables, x)
  np.testing.assert_allclose(g, per_example, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(sal, jnp.abs(g))
  np.testing.assert_allclose(gxi, x * g)
  np.testing.assert_allclose(sg, g, rtol=1e-5, atol=1e-7)
  assert attribution.collapse_channels(g).shape == (4, 8, 8)


def test_deformation_metrics_against_references():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(6, 4, 4)), rng.normal(size=(6, 4, 4))
  b[0] = np.round(b[0])  # ties
  same = attribution.deformation_metrics(a, a)
  for name in attribution.METRICS:
    np.testing.assert_allclose(same[name], 1.0)
  m = attribution.deformation_metrics(a, b, top_k=0.25)
  ref = [scipy.stats.spearmanr(a[i].ravel(), b[i].ravel()).statistic for i in range(6)]
  np.testing.assert_allclose(m["spearman"], ref, rtol=1e-10)
  cos = [a[i].ravel() @ b[i].ravel() / np.linalg.norm(a[i]) / np.linalg.norm(b[i])
         for i in range(6)]
  np.testing.assert_allclose(m["cosine"], cos, rtol=1e-10)
  # IoU by hand: top 2 of 4 pixels.
  x = np.array([[[4.0, 3.0], [2.0, 1.0]]])
  y = np.array([[[4.0, 1.0], [3.0, 2.0]]])
  assert attribution.top_k_iou(x, y, 0.5)[0] == pytest.approx(1 / 3)
  s = attribution.summarize({"spearman": np.array([1.0, np.nan, 0.0])})
  assert s["spearman_mean"] == 0.5 and s["spearman_nan"] == 1


def test_wcam_loss_zero_for_identical_models_and_teacher_gets_no_gradient(lenet):
  model, variables, ds = lenet
  x = jnp.asarray(ds.train.images[:16])
  student = wcam.compress(variables, "prune", 0.7)

  def f(s, t):
    return wcam.attribution_loss(model, s, t, x, "conv2/conv", key=jax.random.key(0),
                                 channel_drop=0.3)[0]

  @jax.jit
  def check(s, t):
    same = wcam.attribution_loss(model, t, t, x, "conv2/conv")[0]
    return same, jax.value_and_grad(f, argnums=(0, 1))(s, t)

  same, (value, (gs, gt)) = check(student, variables)
  assert float(same) == pytest.approx(0.0, abs=1e-12)
  assert float(value) > 0
  assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(gt))
  assert sum(float(jnp.sum(jnp.abs(g))) for g in jax.tree.leaves(gs["params"])) > 0
  # double backprop reaches layers before conv2 (the map's gradient part depends on them).
  assert float(jnp.sum(jnp.abs(gs["params"]["conv1"]["conv"]["kernel"]))) > 0


def test_channel_drop_mask_and_schedule():
  mask = wcam.channel_drop_mask(jax.random.key(0), 5, 10, 0.3)
  np.testing.assert_array_equal(mask.sum(1), 7.0)
  s = wcam.sparsity_schedule(0.9)
  assert s[-1] == 0.9 and s[0] == pytest.approx(0.2) and all(np.diff(s) > 0)
  assert wcam.sparsity_schedule(0.1) == [0.1]


def test_pruning_masks_stay_fixed_through_finetuning(lenet):
  model, variables, ds = lenet
  config = wcam.FinetuneConfig(steps=6, batch_size=32, beta=100.0, learning_rate=1e-2)
  out, history = wcam.finetune(model, variables, ds, "prune", 0.5, config)
  assert history["sparsities"] == [pytest.approx(0.2), pytest.approx(0.36), pytest.approx(0.488),
                                   0.5]
  ks = wcam.kernels(out)
  n = sum(int(w.size) for w in ks.values())
  zeros = sum(int(np.sum(np.asarray(w) == 0)) for w in ks.values())
  assert zeros == budget.prune_count(0.5, n)
  for name, mask in history["masks"].items():
    np.testing.assert_array_equal(np.asarray(ks[name]) == 0, np.asarray(mask) == 0)
    assert not np.array_equal(ks[name], layers.get_kernel(variables, name) * mask)  # trained
  assert np.all(np.isfinite(history["loss"]))


def test_quantization_aware_finetuning_returns_quantized_kernels(lenet):
  model, variables, ds = lenet
  config = wcam.FinetuneConfig(steps=3, batch_size=32, beta=0.0, learning_rate=1e-2)
  out, history = wcam.finetune(model, variables, ds, "quantize", 3, config)
  for w in wcam.kernels(out).values():
    w = np.asarray(w).reshape(-1, w.shape[-1])
    assert max(len(np.unique(w[:, c])) for c in range(w.shape[1])) <= 8  # 2^3 levels (qwix's full signed grid)
  assert history["att"] == [0.0] * 3 and np.all(np.isfinite(history["task"]))


def test_experiment_tiny_writes_files(tiny_experiment):
  work = tiny_experiment("attribution_preservation",
                         files=("results.csv", "per_image.csv", "summary.md", "example_maps.png",
                                "metrics.png"))
  results = pd.read_csv(work / "results.csv")
  assert list(results.variant) == ["compressed", "plain_ft", "wcam_ft"]
  assert results["spearman_mean"].between(-1, 1).all()
