"""One model contract: linen (with a train flag), nnx and a plain apply function give the same numbers.

The three models below compute the same function with the same weights (same layer paths);
the plain apply function is written by hand with ``jax.lax``, so it is an independent
reference for the linen and nnx paths through every entry point.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn
from flax import nnx

import safer_jax as sj
from safer_jax import criteria
from safer_jax.budgeting import budget, mixed_precision
from safer_jax.core import layers as layers_lib
from safer_jax.core import wrapping
from safer_jax.core import data
from safer_jax.training import train

ALL_CRITERIA = sorted(criteria.CRITERIA)
LINEN_CRITERIA = ("fisher", "hessian_trace", "integrated_gradients")


class LinenNet(nn.Module):
  """conv -> BN -> relu -> fc -> relu -> out; ``train`` has no default."""

  @nn.compact
  def __call__(self, x, train):
    x = nn.Conv(4, (3, 3), padding="SAME", name="conv")(x)
    x = nn.BatchNorm(use_running_average=not train, epsilon=1e-5, name="bn")(x)
    x = nn.relu(x).reshape((x.shape[0], -1))
    x = nn.Dropout(0.5, deterministic=not train)(x)
    x = nn.relu(nn.Dense(16, name="fc")(x))
    return nn.Dense(10, name="out")(x)


class NnxNet(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(1, 4, (3, 3), padding="SAME", rngs=rngs)
    self.bn = nnx.BatchNorm(4, epsilon=1e-5, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.fc = nnx.Linear(256, 16, rngs=rngs)
    self.out = nnx.Linear(16, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn(self.conv(x))).reshape((x.shape[0], -1))
    return self.out(nnx.relu(self.fc(self.drop(x))))


def plain_apply(variables, x):
  p, s = variables["params"], variables["batch_stats"]
  y = jax.lax.conv_general_dilated(x, p["conv"]["kernel"], (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  y = y + p["conv"]["bias"]
  y = (y - s["bn"]["mean"]) / jnp.sqrt(s["bn"]["var"] + 1e-5) * p["bn"]["scale"] + p["bn"]["bias"]
  y = jax.nn.relu(y).reshape((x.shape[0], -1))
  y = jax.nn.relu(y @ p["fc"]["kernel"] + p["fc"]["bias"])
  return y @ p["out"]["kernel"] + p["out"]["bias"]


@pytest.fixture(scope="module")
def models(digits):
  """Trained linen variables; the nnx net and the plain function hold the same weights."""
  net = LinenNet()
  v0 = net.init(jax.random.key(0), digits.train.images[:1], train=False)
  linen = sj.wrap(net, v0)
  variables, _ = sj.fit(linen, digits, sj.TrainConfig(epochs=3, seed=0), progress=False)
  variables = jax.device_get(variables)
  nnx_net = NnxNet(nnx.Rngs(0))
  state = nnx.state(nnx_net)
  nnx.replace_by_pure_dict(state, {**variables["params"], "bn": {
      **variables["params"]["bn"], **variables["batch_stats"]["bn"]}})
  nnx.update(nnx_net, state)
  return {"linen": sj.wrap(net, variables), "nnx": nnx_net,
          "apply_fn": sj.wrap(plain_apply, variables), "variables": variables}


def _state_snapshot(module):
  def copy(x):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      return np.array(jax.random.key_data(x))
    return np.array(x)
  return jax.tree.map(copy, nnx.to_pure_dict(nnx.state(module)))


def _assert_unchanged(module, snapshot):
  now = _state_snapshot(module)
  jax.tree.map(np.testing.assert_array_equal, now, snapshot)
  assert module.bn.use_running_average is False and module.drop.deterministic is False


def test_layers_are_the_users_paths(models):
  for kind in ("linen", "nnx", "apply_fn"):
    wrapped = sj.wrap(models[kind]) if kind == "nnx" else models[kind]
    assert sj.find_layers(wrapped.variables) == ["conv", "fc", "out"], kind
    assert set(wrapped.variables) == {"params", "batch_stats"}


def test_evaluate_is_equal_and_in_inference_mode(models, digits):
  snap = _state_snapshot(models["nnx"])
  ref = sj.evaluate(models["apply_fn"], None, digits.eval)
  assert ref["accuracy"] > 0.5
  for kind in ("linen", "nnx"):
    got = sj.evaluate(models[kind], None, digits.eval)
    assert got["accuracy"] == ref["accuracy"], kind
    np.testing.assert_allclose(got["loss"], ref["loss"], rtol=1e-5)
  _assert_unchanged(models["nnx"], snap)


def test_sweep_tables_are_equal(models, digits):
  snap = _state_snapshot(models["nnx"])
  config = sj.SweepConfig(families={"quantize": (4, 2), "noise": (0.1, 0.5)}, seeds=(0, 1))
  split = digits.eval.take(128)
  ref = sj.run_sweep(models["apply_fn"], None, split, config, progress=False)
  for kind in ("linen", "nnx"):
    got = sj.run_sweep(models[kind], None, split, config, progress=False)
    assert sorted(got.layer.unique()) == ["conv", "fc", "out"]
    got = got.sort_values(["layer", "family", "magnitude_index", "seed"]).reset_index(drop=True)
    want = ref.sort_values(["layer", "family", "magnitude_index", "seed"]).reset_index(drop=True)
    np.testing.assert_array_equal(got.accuracy, want.accuracy)
    np.testing.assert_allclose(got.loss, want.loss, rtol=1e-5)
  _assert_unchanged(models["nnx"], snap)


def test_unwrapped_linen_with_required_train_flag_is_wrapped(models, digits):
  net, variables = models["linen"].module, models["variables"]
  config = sj.SweepConfig(families={"quantize": (2,)}, seeds=(0,))
  table = sj.run_sweep(net, variables, digits.eval.take(64), config, progress=False)
  ref = sj.run_sweep(models["apply_fn"], None, digits.eval.take(64), config, progress=False)
  np.testing.assert_array_equal(np.sort(table.accuracy), np.sort(ref.accuracy))


def test_criteria_equal_on_nnx_state_linen_and_plain(models, digits):
  """All criteria take an nnx.State and a loss over it; same numbers as the pure-dict path."""
  net = models["nnx"]
  snap = _state_snapshot(net)
  batches = data.batches_from_split(digits.train, 32, 2)
  graphdef, params, rest = nnx.split(net, nnx.Param, ...)

  def state_loss(p, batch):  # what an nnx user writes
    module = nnx.merge(graphdef, p, rest)
    module.eval()
    logits = module(batch["image"])
    return jnp.mean(sj.training.train.cross_entropy(logits, batch["label"]))

  opts = {"hessian_trace": {"max_probes": 8}, "hawq_v2": {"max_probes": 8},
          "top_eigenvalue": {"max_iter": 10}, "corruption_pga": {"steps": 2},
          "integrated_gradients": {"steps": 4}}
  key = jax.random.key(3)
  ref, _ = criteria.compute_all(
      ALL_CRITERIA, train.task_loss_fn(models["apply_fn"], None),
      models["variables"]["params"], batches, key=key, options=opts)
  paths = {
      "nnx_state": criteria.compute_all(ALL_CRITERIA, state_loss, params, batches, key=key,
                                        options=opts)[0],
      # The linen path differs from the plain one only in the forward (covered by the sweep
      # and evaluate tests): a gradient, a curvature and a path-integral criterion suffice.
      "linen": criteria.compute_all(LINEN_CRITERIA,
                                    train.task_loss_fn(models["linen"], None),
                                    models["variables"]["params"], batches, key=key,
                                    options={k: v for k, v in opts.items()
                                             if k in LINEN_CRITERIA})[0]}
  for path, got in paths.items():
    for name in got:
      assert sorted(got[name]) == ["conv", "fc", "out"], (path, name)
      for layer in got[name]:
        a = np.asarray(getattr(got[name][layer], "mean", got[name][layer]), np.float64)
        b = np.asarray(getattr(ref[name][layer], "mean", ref[name][layer]), np.float64)
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-6, err_msg=f"{path} {name} {layer}")
  _assert_unchanged(net, snap)


def test_allocation_and_quantized_accuracy_equal(models, digits):
  calib = digits.train.take(256)
  allocs = {kind: mixed_precision.allocate(models[kind], None, calib, 3.0, source="oracle",
                                           candidates=(2, 3, 4, 8), max_batches=1,
                                           batch_size=128)
            for kind in ("apply_fn", "linen", "nnx")}
  assert allocs["linen"].bits == allocs["apply_fn"].bits == allocs["nnx"].bits
  assert allocs["linen"].avg_bits <= 3.0
  quantized = mixed_precision.quantize_model(models["variables"], allocs["linen"].bits)
  accs = {kind: sj.evaluate(models[kind], quantized, digits.eval)["accuracy"]
          for kind in ("apply_fn", "linen", "nnx")}
  assert len(set(accs.values())) == 1, accs


def test_plain_apply_on_params_only():
  params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
  wrapped = sj.wrap(lambda p, x: x @ p["dense"]["kernel"] + p["dense"]["bias"], params)
  assert wrapped.variables == {"params": params}
  np.testing.assert_allclose(wrapped.apply(wrapped.variables, jnp.ones((1, 3))), [[3.0, 3.0]])


def test_nnx_train_mode_updates_batch_stats_only_in_the_copy(models, digits):
  wrapped = sj.wrap(models["nnx"])
  snap = _state_snapshot(models["nnx"])
  _, state = wrapped.apply_train(wrapped.variables, digits.train.images[:32])
  assert set(state) == {"batch_stats"}
  assert not np.allclose(state["batch_stats"]["bn"]["mean"],
                         wrapped.variables["batch_stats"]["bn"]["mean"])
  _assert_unchanged(models["nnx"], snap)


def test_gradcam_on_nnx_equals_linen(models, digits):
  x = digits.eval.images[:4]
  linen = sj.measure.attribution.gradcam(models["linen"], models["variables"], x, "conv")
  wrapped = sj.wrap(models["nnx"])
  got = sj.measure.attribution.gradcam(wrapped, wrapped.variables, x, "conv")
  np.testing.assert_allclose(got, linen, rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match="plain apply function"):
    sj.measure.attribution.gradcam(models["apply_fn"], models["variables"], x, "conv")


def test_bad_models_are_refused_with_what_is_accepted(models):
  net, variables = models["linen"].module, models["variables"]
  with pytest.raises(ValueError, match=r"Cannot wrap a builtins.str.*linen Module.*nnx Module"):
    sj.wrap("resnet8")
  with pytest.raises(ValueError, match=r"keyword 'trian' is not accepted by LinenNet.__call__; "
                                       r"it accepts \['train'\]"):
    sj.wrap(net, variables, trian=False)
  with pytest.raises(ValueError, match="holds no weights"):
    sj.wrap(net)
  with pytest.raises(ValueError, match=r"no layer.*'kernel', 'embedding'.*\['w'\]"):
    sj.wrap(lambda p, x: x * p["w"], {"w": jnp.ones(3)})
  with pytest.raises(ValueError, match="needs its variables"):
    sj.wrap(plain_apply)

  class NeedsMask(nnx.Module):
    def __init__(self):
      self.fc = nnx.Linear(2, 2, rngs=nnx.Rngs(0))

    def __call__(self, x, mask):
      return self.fc(x) * mask

  # A required argument not given to wrap is a second model input, passed per batch
  # (a task's inputs=("x", "mask")), never frozen at one batch size.
  wrapped = sj.wrap(NeedsMask())
  x, mask = jnp.ones((3, 2)), jnp.asarray([[1.0, 0.0]] * 3)
  np.testing.assert_array_equal(wrapped.apply(wrapped.variables, x, mask),
                                wrapped.apply(wrapped.variables, x, 1.0) * mask)
  assert sj.wrap(NeedsMask(), mask=1.0).apply_kwargs == {"mask": 1.0}


class SmallNnx(nnx.Module):
  def __init__(self, rngs):
    self.fc1 = nnx.Linear(3, 8, rngs=rngs)
    self.fc2 = nnx.Linear(8, 4, rngs=rngs)

  def __call__(self, x):
    return self.fc2(nnx.relu(self.fc1(x)))


def test_nnx_state_inside_a_dict_is_refused_before_any_work():
  """``{'params': nnx.State}``: a ValueError saying to pass the state itself, at every entry."""
  net = SmallNnx(nnx.Rngs(0))
  graphdef, state = nnx.split(net)
  params = nnx.state(net, nnx.Param)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(16, 3)).astype(np.float32)
  split = sj.Split(x, rng.integers(0, 4, 16).astype(np.int32))
  config = sj.SweepConfig(families={"quantize": (2,)}, seeds=(0,))
  message = (r"variables\['params'\] is an nnx.State inside a dict; pass the nnx.State itself "
             r"instead .*nnx.split\(model\)")
  with pytest.raises(ValueError, match=message):  # (a TypeError deep in staged.py before)
    sj.run_sweep(net, {"params": params}, split, config, progress=False)
  with pytest.raises(ValueError, match=message):
    sj.evaluate(net, {"params": params}, split)
  with pytest.raises(ValueError, match=message):
    sj.wrap(net, {"params": params})

  def loss_fn(p, batch):
    logits = nnx.merge(graphdef, p["params"])(batch["image"])
    return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[:, 0])

  with pytest.raises(ValueError, match=r"params\['params'\] is an nnx.State inside a dict"):
    criteria.hessian_trace(loss_fn, {"params": state}, [split.as_batch()])
  # what the message offers works: the state itself, or nothing (the module's own weights)
  want = sj.evaluate(net, None, split)
  assert sj.evaluate(net, params, split) == want
  assert sj.evaluate(net, {"params": nnx.to_pure_dict(params)}, split) == want


def test_layer_discovery_covers_linen_and_nnx_layer_types():
  x = jnp.ones((1, 4, 6))
  tokens = jnp.ones((1, 4), jnp.int32)

  class Linen(nn.Module):
    @nn.compact
    def __call__(self, x, tokens):
      e = nn.Embed(11, 6, name="embed")(tokens)
      y = nn.Conv(5, (3,), name="conv1d")(x + e)
      y = nn.ConvTranspose(5, (3,), name="deconv")(y)
      y = nn.DenseGeneral((2, 3), name="dg")(y)
      y = nn.Einsum((2, 3, 4), "btnh,nhf->btf", name="einsum")(y)
      return nn.Dense(3, name="dense")(y)

  v = Linen().init(jax.random.key(0), x, tokens)
  assert sorted(sj.find_layers(v)) == ["conv1d", "deconv", "dense", "dg", "einsum", "embed"]
  assert layers_lib.get_kernel(v, "embed").shape == (11, 6)
  assert layers_lib.get_kernel(v, "dg").shape == (5, 2, 3)
  q = mixed_precision.quantize_model(v, {"embed": 4, "dg": 4, "einsum": 4})
  for name in ("embed", "dg", "einsum"):  # 4-bit codes per channel of the last axis
    k, qk = layers_lib.get_kernel(v, name), layers_lib.get_kernel(q, name)
    levels = [len(np.unique(np.asarray(qk)[..., c])) for c in range(k.shape[-1])]
    assert max(levels) <= 15 and qk.shape == k.shape

  class Nnx(nnx.Module):
    def __init__(self, rngs):
      self.embed = nnx.Embed(11, 6, rngs=rngs)
      self.lg = nnx.LinearGeneral(6, (2, 3), rngs=rngs)
      self.einsum = nnx.Einsum("btnh,nhf->btf", (2, 3, 4), rngs=rngs)
      self.convs = nnx.List([nnx.Conv(4, 4, (3,), rngs=rngs),
                             nnx.ConvTranspose(4, 4, (3,), rngs=rngs)])

    def __call__(self, tokens):
      return self.einsum(self.lg(self.embed(tokens)))

  net = Nnx(nnx.Rngs(0))
  assert sorted(sj.find_layers(nnx.state(net, nnx.Param))) == [
      "convs/0", "convs/1", "einsum", "embed", "lg"]
  wrapped = sj.wrap(net)
  assert wrapped.apply(wrapped.variables, tokens).shape == (1, 4, 4)
