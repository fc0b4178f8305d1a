"""Tests of safer_jax.core.tasks: each preset against NumPy, tasks through the sweep, LMs, errors.

References are written here, independently of the library: float64 NumPy losses,
a plain Python loop over layers for the sweeps.
"""

import dataclasses
import itertools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import safer_jax as sj
from safer_jax.budgeting import mixed_precision, search
from safer_jax.core import data, layers, perturb, tasks
from safer_jax.measure import sweep
from safer_jax.training import train
from safer_jax.zoo import text
from safer_jax.zoo.models.lm import TransformerLM

QUANT = sweep.SweepConfig(families={"quantize": (2, 4, 8)}, seeds=(0,))


# ---------------------------------------------------------------------------------------------
# NumPy references.
# ---------------------------------------------------------------------------------------------


def np_log_softmax(logits):
  z = np.asarray(logits, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_cross_entropy(logits, labels):
  """Per-position cross-entropy (nats) in float64, ``logits (..., K)``, ``labels (...)``."""
  return -np.take_along_axis(np_log_softmax(logits), np.asarray(labels)[..., None], -1)[..., 0]


def np_kl(ref_logits, logits):
  """KL(softmax(ref) || softmax(logits)) over the last axis, float64."""
  log_p, log_q = np_log_softmax(ref_logits), np_log_softmax(logits)
  return np.sum(np.exp(log_p) * (log_p - log_q), -1)


def linear_model(w):
  """A plain apply function ``(params, x) -> x @ kernel`` with one layer, ``dense``."""
  return sj.wrap(lambda p, x: x @ p["dense"]["kernel"], {"dense": {"kernel": w}})


# ---------------------------------------------------------------------------------------------
# 1. Each preset against NumPy.
# ---------------------------------------------------------------------------------------------


def test_classification_preset_equals_numpy():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(37, 6)).astype(np.float32)
  w = (2 * rng.normal(size=(6, 4))).astype(np.float32)
  labels = rng.integers(0, 4, 37).astype(np.int32)
  logits = x.astype(np.float64) @ w.astype(np.float64)
  want_loss = np_cross_entropy(logits, labels).mean()
  want_acc = np.mean(logits.argmax(1) == labels)
  model = linear_model(w)
  for split, task in [(data.Split(x, labels), tasks.classification()),  # image / label
                      (data.Split(feats=x, y=labels), tasks.classification("feats", "y"))]:
    for bs in (8, 37, 1000):  # a padded last batch, one batch, more than the split
      got = sj.evaluate(model, None, split, batch_size=bs, task=task)
      np.testing.assert_allclose(got["loss"], want_loss, rtol=1e-5)
      assert got["accuracy"] == pytest.approx(want_acc, abs=1e-12)
      assert got["num_examples"] == 37
  # the default task is classification, and the preset is cached (one object per arguments)
  assert sj.evaluate(model, None, data.Split(x, labels))["loss"] == pytest.approx(want_loss,
                                                                                  rel=1e-5)
  assert tasks.classification() is tasks.get(None) is tasks.get("classification")
  assert tasks.classification("feats", "y") is tasks.classification("feats", "y")


def _token_problem(seed=1, n=9, t=7, d=5, v=11):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, t, d)).astype(np.float32)
  w = (1.5 * rng.normal(size=(d, v))).astype(np.float32)
  targets = rng.integers(0, v, (n, t)).astype(np.int32)
  lengths = rng.integers(1, t + 1, n)
  lengths[3] = 0  # an all-padding row
  mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float32)
  return x, w, targets, mask


def test_token_cross_entropy_equals_numpy():
  x, w, targets, mask = _token_problem()
  task = tasks.token_cross_entropy(inputs="x")
  logits = x.astype(np.float64) @ w.astype(np.float64)
  ce = np_cross_entropy(logits, targets)  # (N, T)
  counts = mask.sum(1)

  # per example: the mean over its real tokens, weight = its token count, 0 for all padding
  batch = {"x": x, "targets": targets, "mask": mask}
  per_example = np.asarray(task.loss(jnp.asarray(logits, jnp.float32), batch))
  want = np.where(counts > 0, (ce * mask).sum(1) / np.maximum(counts, 1), 0.0)
  np.testing.assert_allclose(per_example, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(task.weight(batch)), counts)
  assert counts[3] == 0 and per_example[3] == 0

  # the split: total CE / total tokens, perplexity = exp(loss), token accuracy over real tokens
  total = (ce * mask).sum() / mask.sum()
  right = ((logits.argmax(-1) == targets) * mask).sum() / mask.sum()
  model = linear_model(w)
  split = data.Split(x=x, targets=targets, mask=mask)
  for bs in (4, 9):
    got = sj.evaluate(model, None, split, batch_size=bs, task=task)
    np.testing.assert_allclose(got["loss"], total, rtol=1e-5)
    np.testing.assert_allclose(got["perplexity"], np.exp(total), rtol=1e-5)
    assert got["token_accuracy"] == pytest.approx(right, abs=1e-6)
    assert got["num_examples"] == 9
  # not the mean of the per-example means (rows of different lengths)
  assert abs(total - want[counts > 0].mean()) > 1e-3

  # all-padding rows change nothing, whatever their targets
  junk = data.Split(x=np.concatenate([x, x[:4]]),
                    targets=np.concatenate([targets, (targets[:4] + 3) % 11]),
                    mask=np.concatenate([mask, np.zeros_like(mask[:4])]))
  got = sj.evaluate(model, None, junk, batch_size=4, task=task)
  np.testing.assert_allclose(got["loss"], total, rtol=1e-5)

  # without a mask every token counts
  plain = sj.evaluate(model, None, split, task=tasks.token_cross_entropy(inputs="x", mask=None))
  np.testing.assert_allclose(plain["loss"], ce.mean(), rtol=1e-5)


def test_mse_equals_numpy():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(23, 4)).astype(np.float32)
  w = rng.normal(size=(4, 3)).astype(np.float32)
  y = rng.normal(size=(23, 3)).astype(np.float32)
  out = x.astype(np.float64) @ w.astype(np.float64)
  want = np.mean((out - y) ** 2)
  model = linear_model(w)
  got = sj.evaluate(model, None, data.Split(x=x, y=y), batch_size=5, task=tasks.mse())
  np.testing.assert_allclose(got["loss"], want, rtol=1e-5)
  np.testing.assert_allclose(got["rmse"], np.sqrt(want), rtol=1e-5)
  assert set(got) == {"loss", "rmse", "num_examples"}
  # per example: the mean over the output's axes; targets (N,) for outputs (N, 1)
  per = np.asarray(tasks.mse().loss(jnp.asarray(out, jnp.float32), {"y": y}))
  np.testing.assert_allclose(per, ((out - y) ** 2).mean(1), rtol=1e-5)
  model1 = linear_model(w[:, :1])
  got1 = sj.evaluate(model1, None, data.Split(a=x, b=y[:, 0]), task=tasks.mse("a", "b"))
  np.testing.assert_allclose(got1["loss"], np.mean((out[:, 0] - y[:, 0]) ** 2), rtol=1e-5)


def test_kl_to_reference_equals_numpy():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(21, 5)).astype(np.float32)
  w = rng.normal(size=(5, 6)).astype(np.float32)
  ref = (2 * rng.normal(size=(21, 6))).astype(np.float32)
  logits = x.astype(np.float64) @ w.astype(np.float64)
  model = linear_model(w)
  task = tasks.kl_to_reference(inputs="x")
  got = sj.evaluate(model, None, data.Split(x=x, reference=ref), batch_size=8, task=task)
  np.testing.assert_allclose(got["loss"], np_kl(ref, logits).mean(), rtol=1e-5)
  assert got["agreement"] == pytest.approx(np.mean(ref.argmax(1) == logits.argmax(1)), abs=1e-12)
  assert got["loss"] > 0.1  # (not trivially 0)

  # masked (sequence) variant: mean over kept positions, each example weighs its count
  x, w, _, mask = _token_problem(seed=4)
  logits = x.astype(np.float64) @ w.astype(np.float64)
  ref = (logits + rng.normal(size=logits.shape)).astype(np.float32)
  kl = np_kl(ref, logits)
  task = tasks.kl_to_reference(inputs="x", mask="mask")
  split = data.Split(x=x, reference=ref, mask=mask)
  got = sj.evaluate(linear_model(w), None, split, batch_size=4, task=task)
  np.testing.assert_allclose(got["loss"], (kl * mask).sum() / mask.sum(), rtol=1e-5)
  same = (ref.argmax(-1) == logits.argmax(-1))
  assert got["agreement"] == pytest.approx((same * mask).sum() / mask.sum(), abs=1e-6)


# ---------------------------------------------------------------------------------------------
# 2. A model taking two arrays (a dict batch) through the sweep.
# ---------------------------------------------------------------------------------------------


class PooledClassifier(nn.Module):
  """Token ids and a mask -> embedding, masked mean pool, hidden Dense, class head."""
  mask_default: bool = True  # (False: ``mask`` is a required argument)

  def setup(self):
    self.embed = nn.Embed(40, 8)
    self.hidden = nn.Dense(16, bias_init=nn.initializers.normal(0.5))
    self.head = nn.Dense(5, kernel_init=nn.initializers.normal(1.0),
                         bias_init=nn.initializers.normal(0.5))

  def pool(self, ids, mask):
    e = self.embed(ids)
    m = mask[..., None].astype(e.dtype)
    pooled = (e * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
    return self.head(jnp.tanh(self.hidden(pooled)))


class PooledDefaultMask(PooledClassifier):

  def __call__(self, ids, mask=None):
    return self.pool(ids, mask)


class PooledRequiredMask(PooledClassifier):

  def __call__(self, ids, mask):
    return self.pool(ids, mask)


@pytest.fixture(scope="module")
def pooled():
  rng = np.random.default_rng(5)
  n, t = 359, 12
  ids = rng.integers(0, 40, (n, t)).astype(np.int32)
  lengths = rng.integers(1, t + 1, n)
  mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float32)
  split = data.Split(ids=ids, mask=mask, label=rng.integers(0, 5, n).astype(np.int32))
  model = PooledDefaultMask()
  variables = jax.jit(model.init)(jax.random.key(0), ids[:1], mask[:1])
  return model, variables, split


def _right_answers(table, n):
  counts = table["accuracy"].to_numpy(np.float64) * n
  np.testing.assert_allclose(counts, np.round(counts), atol=1e-3)
  return np.round(counts).astype(int)


def test_two_input_model_sweep_equal_at_every_batch_size(pooled):
  model, variables, split = pooled
  task = tasks.classification(inputs=("ids", "mask"), label="label")
  # the reference: plain NumPy on the model's logits
  logits = np.asarray(jax.jit(model.apply)(variables, split.arrays["ids"], split.arrays["mask"]))
  got = sj.evaluate(model, variables, split, batch_size=50, task=task)
  np.testing.assert_allclose(got["loss"], np_cross_entropy(logits, split.arrays["label"]).mean(),
                             rtol=1e-5)
  assert got["accuracy"] == pytest.approx(np.mean(logits.argmax(1) == split.arrays["label"]))

  tables = [sweep.run_sweep(model, variables, split, dataclasses.replace(QUANT, eval_batch_size=bs),
                            progress=False, task=task) for bs in (7, 64, 359)]
  assert list(tables[0].layer.unique()) == ["embed", "hidden", "head"]
  assert len(tables[0]) == 9
  for table in tables[1:]:
    np.testing.assert_allclose(table["loss"], tables[0]["loss"], rtol=1e-5)
    np.testing.assert_array_equal(table["accuracy"], tables[0]["accuracy"])
  naive = sweep.naive_sweep(model, variables, split, QUANT, progress=False, task=task)
  np.testing.assert_allclose(naive["loss"], tables[0]["loss"], rtol=1e-5)
  np.testing.assert_array_equal(_right_answers(naive, 359), _right_answers(tables[0], 359))
  np.testing.assert_allclose(tables[0].attrs["baseline_loss"], got["loss"], rtol=1e-5)
  # quantizing to 2 bits changes something (random labels: either way)
  assert tables[0][tables[0].magnitude == 2].loss_increase.abs().max() > 1e-3

  # keyword inputs (inputs={keyword: array name}) give the same table
  by_name = dataclasses.replace(task, inputs={"ids": "ids", "mask": "mask"})
  kw = sweep.run_sweep(model, variables, split, dataclasses.replace(QUANT, eval_batch_size=64),
                       progress=False, task=by_name)
  np.testing.assert_allclose(kw["loss"], tables[0]["loss"], rtol=1e-5)
  np.testing.assert_array_equal(kw["accuracy"], tables[0]["accuracy"])


@pytest.mark.parametrize("inputs", [{"ids": "ids", "mask": "mask"}, ["ids", "mask"]],
                         ids=["dict", "list"])
def test_preset_takes_a_dict_or_list_of_inputs(pooled, inputs):
  """The presets take ``inputs={keyword: array name}`` or a list of names (safer_jax.core.tasks)."""
  model, variables, split = pooled
  task = tasks.classification(inputs=inputs, label="label")
  assert task is tasks.classification(inputs=inputs, label="label")  # cached, as documented
  got = sj.evaluate(model, variables, split, task=task)
  want = sj.evaluate(model, variables, split,
                     task=tasks.classification(inputs=("ids", "mask"), label="label"))
  np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-6)


def test_linen_module_with_two_required_inputs(pooled):
  """``__call__(self, ids, mask)`` with no default: the task passes both arrays."""
  _, variables, split = pooled
  model = PooledRequiredMask()
  task = tasks.classification(inputs=("ids", "mask"), label="label")
  want = sj.evaluate(PooledDefaultMask(), variables, split, task=task)
  got = sj.evaluate(model, variables, split, task=task)
  np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-6)
  got = sj.evaluate(sj.wrap(model, variables), None, split, task=task)
  np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# 3. / 4. A small causal LM: token cross-entropy and KL to the float model.
# ---------------------------------------------------------------------------------------------

LM_LAYERS = ("block1/attn/query", "block1/attn/value", "block1/mlp/fc1", "head/fc")


@pytest.fixture(scope="module")
def lm():
  ds = text.load_text_corpus(seq_len=16, max_train=64, max_eval=32)
  mask = ds.eval.arrays["mask"].copy()
  mask[:6, 10:] = 0  # padding at the ends of some rows, one row all padding
  mask[7] = 0
  split = ds.eval.with_arrays(mask=mask)
  model = TransformerLM(vocab_size=256, max_len=16, dim=16, depth=1, num_heads=2)
  variables = train.init_variables(model, (16,), 0)
  return model, variables, split, jax.jit(model.apply)


def _np_token_scores(logits, split):
  t, m = split.arrays["targets"], split.arrays["mask"]
  ce = np_cross_entropy(logits, t)
  return (ce * m).sum() / m.sum(), ((logits.argmax(-1) == t) * m).sum() / m.sum()


def test_lm_sweep_equals_plain_loop(lm):
  model, variables, split, forward = lm
  config = dataclasses.replace(QUANT, layers=LM_LAYERS, eval_batch_size=12)
  table = sweep.run_sweep(model, variables, split, config, progress=False,
                          task=tasks.token_cross_entropy())
  assert table.attrs["task"] == "token_cross_entropy"
  assert "token_accuracy_drop" in table.columns and "accuracy" not in table.columns

  tokens = split.arrays["tokens"]
  base_loss, base_acc = _np_token_scores(np.asarray(forward(variables, tokens)), split)
  np.testing.assert_allclose(table.attrs["baseline_loss"], base_loss, rtol=1e-4)
  rows = []
  for layer in LM_LAYERS:  # network order
    kernel = layers.get_kernel(variables, layer)
    for bits in (2, 4, 8):
      new = layers.replace_kernel(variables, layer, perturb.quantize(kernel, bits))
      rows.append((layer, bits, *_np_token_scores(np.asarray(forward(new, tokens)), split)))
  assert list(zip(table.layer, table.magnitude)) == [(r[0], r[1]) for r in rows]
  want_loss = np.array([r[2] for r in rows])
  np.testing.assert_allclose(table["loss"], want_loss, rtol=1e-4)
  np.testing.assert_allclose(table["loss_increase"], want_loss - base_loss, atol=1e-4)
  np.testing.assert_allclose(table["token_accuracy"], [r[3] for r in rows], atol=1.01 / 400)
  assert np.abs(want_loss - base_loss).max() > 1e-3  # the quantization changed something


def test_kl_to_float_model(lm):
  model, variables, split, forward = lm
  task = tasks.kl_to_reference(inputs="tokens", mask="mask")
  with_ref = tasks.add_reference(model, variables, split, task, batch_size=10)
  assert with_ref.arrays["reference"].shape == (32, 16, 256)
  np.testing.assert_allclose(with_ref.arrays["reference"],
                             np.asarray(forward(variables, split.arrays["tokens"])), atol=1e-5)
  got = sj.evaluate(model, variables, with_ref, batch_size=10, task=task)
  assert got["loss"] == pytest.approx(0.0, abs=1e-6)
  assert got["agreement"] == 1.0

  config = dataclasses.replace(QUANT, layers=LM_LAYERS)
  table = sweep.run_sweep(model, variables, split, config, progress=False, task=task)
  assert table.attrs["baseline_loss"] == pytest.approx(0.0, abs=1e-6)
  assert table.attrs["baseline_agreement"] == 1.0
  assert (table["loss"] >= -1e-6).all()
  mean = table.groupby("magnitude")["loss"].mean()
  assert mean[2] > mean[4] > mean[8] >= 0
  # the reference the sweep added is the one add_reference computes
  again = sweep.run_sweep(model, variables, with_ref, config, progress=False, task=task)
  np.testing.assert_allclose(again["loss"], table["loss"], rtol=1e-5, atol=1e-7)
  # and the KL of one cell is NumPy's
  layer, bits = LM_LAYERS[0], 2
  new = layers.replace_kernel(variables, layer,
                              perturb.quantize(layers.get_kernel(variables, layer), bits))
  kl = np_kl(with_ref.arrays["reference"], np.asarray(forward(new, split.arrays["tokens"])))
  m = split.arrays["mask"]
  cell = table[(table.layer == layer) & (table.magnitude == bits)]["loss"].item()
  np.testing.assert_allclose(cell, (kl * m).sum() / m.sum(), rtol=1e-3)


# ---------------------------------------------------------------------------------------------
# 5. Clear errors.
# ---------------------------------------------------------------------------------------------


def test_missing_arrays_are_named():
  rng = np.random.default_rng(6)
  x = rng.normal(size=(10, 3)).astype(np.float32)
  model = linear_model(np.ones((3, 2), np.float32))
  with pytest.raises(ValueError, match=r"\['y'\]"):
    sj.evaluate(model, None, data.Split(x=x), task=tasks.mse())
  with pytest.raises(ValueError, match=r"\['tokens', 'targets', 'mask'\]"):
    sj.evaluate(model, None, data.Split(x=x), task=tasks.token_cross_entropy())
  with pytest.raises(ValueError, match=r"\['y'\]"):
    sweep.run_sweep(model, None, data.Split(x=x), QUANT, progress=False, task=tasks.mse())
  with pytest.raises(ValueError, match=r"'reference'.*add_reference"):
    sj.evaluate(model, None, data.Split(x=x), task=tasks.kl_to_reference(inputs="x"))
  with pytest.raises(ValueError, match="'image'"):  # default task on a split without images
    sj.evaluate(model, None, data.Split(x=x, y=x))


def test_labels_out_of_range_name_the_range():
  rng = np.random.default_rng(7)
  x = rng.normal(size=(10, 3)).astype(np.float32)
  model = linear_model(np.ones((3, 4), np.float32))
  labels = np.arange(10, dtype=np.int32) % 5  # 4 is out of range for 4 logits
  with pytest.raises(ValueError, match=r"\[0, 3\]"):
    sj.evaluate(model, None, data.Split(x, labels))
  with pytest.raises(ValueError, match=r"\[0, 3\]"):
    sweep.run_sweep(model, None, data.Split(x, labels), QUANT, progress=False)
  with pytest.raises(ValueError, match=r"\[0, 3\]"):
    sj.evaluate(model, None, data.Split(x, labels - 1))  # -1
  seq = data.Split(x=x[:, None, :].repeat(2, 1), targets=np.full((10, 2), 4, np.int32),
                   mask=np.ones((10, 2), np.float32))
  with pytest.raises(ValueError, match=r"\[0, 3\]"):
    sj.evaluate(model, None, seq, task=tasks.token_cross_entropy(inputs="x"))


@flax.struct.dataclass
class PytreeOutput:
  logits: jax.Array
  hidden: jax.Array


@dataclasses.dataclass
class PlainOutput:
  logits: jax.Array


def test_output_objects_need_wrap_output():
  rng = np.random.default_rng(8)
  x = rng.normal(size=(12, 3)).astype(np.float32)
  w = rng.normal(size=(3, 4)).astype(np.float32)
  split = data.Split(x, rng.integers(0, 4, 12).astype(np.int32))
  want = sj.evaluate(linear_model(w), None, split)
  params = {"dense": {"kernel": w}}
  makers = {"dict": lambda p, x: {"logits": x @ p["dense"]["kernel"], "hidden": x},
            "struct": lambda p, x: PytreeOutput(x @ p["dense"]["kernel"], x),
            "tuple": lambda p, x: (x @ p["dense"]["kernel"], x)}
  pick = {"dict": lambda o: o["logits"], "struct": lambda o: o.logits, "tuple": lambda o: o[0]}
  for kind, fn in makers.items():
    with pytest.raises(ValueError, match=r"output="):
      sj.evaluate(sj.wrap(fn, params), None, split)
    got = sj.evaluate(sj.wrap(fn, params, output=pick[kind]), None, split)
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-6)
    assert got["accuracy"] == want["accuracy"]
  # the sweep reads the picked output too
  model = sj.wrap(makers["dict"], params, output=pick["dict"])
  table = sweep.run_sweep(model, None, split, QUANT, progress=False)
  naive = sweep.naive_sweep(linear_model(w), None, split, QUANT, progress=False)
  np.testing.assert_allclose(table["loss"], naive["loss"], rtol=1e-5)


def test_plain_dataclass_output_gives_a_clear_error():
  """An output object that is not a pytree: a ValueError pointing at ``wrap(output=)``."""
  rng = np.random.default_rng(9)
  x = rng.normal(size=(6, 3)).astype(np.float32)
  w = rng.normal(size=(3, 4)).astype(np.float32)
  split = data.Split(x, rng.integers(0, 4, 6).astype(np.int32))
  model = sj.wrap(lambda p, x: PlainOutput(x @ p["dense"]["kernel"]), {"dense": {"kernel": w}})
  with pytest.raises(ValueError, match=r"output="):
    sj.evaluate(model, None, split)
  picked = sj.wrap(model, output=lambda o: o.logits)
  want = sj.evaluate(linear_model(w), None, split)
  np.testing.assert_allclose(sj.evaluate(picked, None, split)["loss"], want["loss"], rtol=1e-6)


def test_unknown_task_lists_presets():
  with pytest.raises(ValueError, match="nonsense") as err:
    tasks.get("nonsense")
  for name in ("classification", "token_cross_entropy", "mse", "kl_to_reference"):
    assert name in str(err.value)
  with pytest.raises(ValueError, match="Task"):
    tasks.get(3)
  assert tasks.get("mse") is tasks.mse()
  with pytest.raises(ValueError, match="reserved"):
    tasks.Task("bad", lambda o, b: o, metrics={"loss": lambda o, b: o})


class Classifier(nn.Module):
  """A 2-layer classifier of 3 features into 4 classes; ``final``: what its logits go through."""
  final: str = "none"  # 'none' (logits), 'softmax' (probabilities) or 'log_softmax'

  @nn.compact
  def __call__(self, x):
    logits = nn.Dense(4, name="fc")(nn.relu(nn.Dense(8, name="hidden")(x)))
    return {"none": logits, "softmax": nn.softmax(logits),
            "log_softmax": nn.log_softmax(logits)}[self.final]


def test_probabilities_are_refused_and_log_probabilities_are_logits():
  """A final softmax: evaluate, the sweep and fit stop with an error naming probabilities."""
  rng = np.random.default_rng(10)
  x = rng.normal(size=(48, 3)).astype(np.float32)
  labels = ((x[:, 0] > 0) + 2 * (x[:, 1] > 0)).astype(np.int32)
  split = data.Split(x, labels)
  ds = data.Dataset("four", data.Split(x[:32], labels[:32]), data.Split(x[32:], labels[32:]),
                    num_classes=4, input_shape=(3,))
  variables = Classifier().init(jax.random.key(0), x[:1])
  soft = Classifier("softmax")
  with pytest.raises(ValueError, match=r"classification: every row .* \[0, 1\] and sums to 1: "
                                       r"these look like probabilities.*output=jnp.log"):
    sj.evaluate(soft, variables, split)
  with pytest.raises(ValueError, match="look like probabilities"):
    sweep.run_sweep(soft, variables, split, QUANT, progress=False)
  steps_run = []

  def make_steps(model, tx):
    step = train.make_train_step(model, tx)
    return lambda epoch: steps_run.append(epoch) or step

  with pytest.raises(ValueError, match="look like probabilities"):
    sj.fit(soft, ds, sj.TrainConfig(epochs=2, batch_size=16), progress=False,
           variables=variables, make_steps=make_steps)
  assert not steps_run  # refused before the first epoch
  # log-probabilities are logits: the same scores as the logits themselves, and no error
  want = sj.evaluate(Classifier(), variables, split)
  got = sj.evaluate(Classifier("log_softmax"), variables, split)
  np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
  assert got["accuracy"] == want["accuracy"]
  table = sweep.run_sweep(Classifier("log_softmax"), variables, split, QUANT, progress=False)
  np.testing.assert_allclose(table.attrs["baseline_loss"], want["loss"], rtol=1e-5)
  # and the probabilities' logarithm is what the error suggests
  fixed = sj.wrap(soft, variables, output=jnp.log)
  np.testing.assert_allclose(sj.evaluate(fixed, None, split)["loss"], want["loss"], rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# 6. Partitioned (boxed) parameters.
# ---------------------------------------------------------------------------------------------


class Partitioned(nn.Module):

  @nn.compact
  def __call__(self, x):
    init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
    h = nn.Dense(6, kernel_init=init, name="fc")(x)
    return nn.Dense(2, name="out")(jnp.tanh(h))


def test_wrap_unboxes_logical_partitioning():
  rng = np.random.default_rng(10)
  x = rng.normal(size=(15, 4)).astype(np.float32)
  y = rng.normal(size=(15, 2)).astype(np.float32)
  module = Partitioned()
  variables = jax.jit(module.init)(jax.random.key(1), x[:1])
  assert isinstance(variables["params"]["fc"]["kernel"], nn.LogicallyPartitioned)
  model = sj.wrap(module, variables)
  assert sj.find_layers(model.variables) == ["fc", "out"]
  kernel = model.variables["params"]["fc"]["kernel"]
  assert isinstance(kernel, jax.Array) and kernel.shape == (4, 6)
  p = jax.tree.map(np.asarray, model.variables["params"])
  h = np.tanh(x.astype(np.float64) @ p["fc"]["kernel"] + p["fc"]["bias"])
  out = h @ p["out"]["kernel"] + p["out"]["bias"]
  got = sj.evaluate(model, None, data.Split(x=x, y=y), task=tasks.mse())
  np.testing.assert_allclose(got["loss"], np.mean((out - y) ** 2), rtol=1e-5)
  # a perturbed copy of the unboxed layer runs too
  new = layers.replace_kernel(model.variables, "fc", perturb.quantize(kernel, 2))
  got2 = sj.evaluate(model, new, data.Split(x=x, y=y), task=tasks.mse())
  assert got2["loss"] != got["loss"]


# ---------------------------------------------------------------------------------------------
# 7. Mixed precision with a task, tie groups, the allocation evaluator.
# ---------------------------------------------------------------------------------------------

BLOCK = ["b/attn/query", "b/attn/key", "b/attn/value", "b/attn/out", "b/mlp/fc1"]


def _block_forward(p, x):
  a = p["b"]["attn"]
  h = x @ a["query"]["kernel"] + x @ a["key"]["kernel"] + x @ a["value"]["kernel"]
  return jnp.tanh(h @ a["out"]["kernel"]) @ p["b"]["mlp"]["fc1"]["kernel"]


@pytest.fixture(scope="module")
def block():
  rng = np.random.default_rng(11)
  k = lambda s, shape: (s * rng.normal(size=shape)).astype(np.float32)  # noqa: E731
  # query's quantization error is large, key's tiny: left alone they get different widths
  params = {"b": {"attn": {"query": {"kernel": k(3.0, (8, 8))}, "key": {"kernel": k(0.01, (8, 8))},
                           "value": {"kernel": k(0.3, (8, 8))}, "out": {"kernel": k(0.3, (8, 8))}},
                  "mlp": {"fc1": {"kernel": k(0.3, (8, 2))}}}}
  x = rng.normal(size=(48, 8)).astype(np.float32)
  y = rng.normal(size=(48, 2)).astype(np.float32)
  return sj.wrap(_block_forward, params), data.Split(x=x, y=y)


def test_tie_groups_names():
  assert mixed_precision.tie_groups(BLOCK) == [["b/attn/query", "b/attn/key", "b/attn/value"]]
  assert mixed_precision.tie_groups(["b/attn/query", "b/mlp/fc1"]) == []
  two = ["b1/attn/query", "b1/attn/key", "b2/attn/query", "b2/attn/key", "b2/mlp/up_proj",
         "b2/mlp/gate_proj"]
  assert mixed_precision.tie_groups(two) == [["b1/attn/query", "b1/attn/key"],
                                             ["b2/attn/query", "b2/attn/key"],
                                             ["b2/mlp/up_proj", "b2/mlp/gate_proj"]]


@pytest.mark.parametrize("source", ["quant_error", "fisher"])
def test_allocate_with_tie_groups(block, source):
  model, calib = block
  assert sj.find_layers(model.variables) == sorted(BLOCK)
  sizes = {n: layers.get_kernel(model.variables, n).size for n in BLOCK}
  task = tasks.mse()
  kwargs = dict(avg_bits=4, source=source, candidates=(2, 4, 8), task=task, batch_size=16)
  free = mixed_precision.allocate(model, None, calib, **kwargs)
  assert free.bits["b/attn/query"] != free.bits["b/attn/key"]  # ties matter here
  groups = mixed_precision.tie_groups(BLOCK)
  tied = mixed_precision.allocate(model, None, calib, tie_groups=groups, **kwargs)
  assert set(tied.bits) == set(BLOCK)
  assert len({tied.bits[n] for n in groups[0]}) == 1
  used = sum(tied.bits[n] * sizes[n] for n in BLOCK) / sum(sizes.values())
  assert used <= 4 + 1e-9
  assert set(tied.bits.values()) <= {2, 4, 8}

  # the tied solution is the best equal-width one for the group (brute force over the table)
  tables, _ = mixed_precision.cost_tables(model, None, calib, (2, 4, 8), (source,), task=task,
                                          batch_size=16)
  table = tables[source]
  best = None
  for g, o, f in itertools.product((2, 4, 8), repeat=3):
    bits = {"b/attn/query": g, "b/attn/key": g, "b/attn/value": g, "b/attn/out": o,
            "b/mlp/fc1": f}
    if sum(bits[n] * sizes[n] for n in BLOCK) > 4 * sum(sizes.values()):
      continue
    cost = sum(table[n][bits[n]] for n in BLOCK)
    best = cost if best is None else min(best, cost)
  assert sum(table[n][tied.bits[n]] for n in BLOCK) == pytest.approx(best, rel=1e-9)


def test_cost_tables_layers_and_task(block):
  model, calib = block
  tables, _ = mixed_precision.cost_tables(model, None, calib, (2, 8), ("quant_error", "oracle"),
                                          task=tasks.mse(), layers=["b/attn/.*"], batch_size=16,
                                          max_batches=1)
  assert set(tables["oracle"]) == {n for n in BLOCK if n.startswith("b/attn/")}
  # oracle: the MSE increase when that layer alone is quantized, on the calibration batch
  forward = jax.jit(_block_forward)
  part = data.Split(**calib.batch(0, 16))

  def mse(params):
    out = np.asarray(forward(params, part.arrays["x"]), np.float64)
    return np.mean((out - part.arrays["y"]) ** 2)

  params = model.variables["params"]
  for layer in ("b/attn/query", "b/attn/key"):
    q = perturb.quantize(layers.get_kernel(params, layer), 2)
    want = mse(layers.replace_kernel(params, layer, q)) - mse(params)
    np.testing.assert_allclose(tables["oracle"][layer][2], want, rtol=1e-3, atol=1e-6)


def test_allocation_evaluator_equals_evaluate(block):
  model, calib = block
  task = tasks.mse()
  options = search.quantized_options(model.variables, BLOCK, (2, 4, 8))
  ev = search.AllocationEvaluator(model, None, calib, options,
                                  sweep.SweepConfig(eval_batch_size=20), task=task)
  allocs = [{"b/attn/query": 2, "b/attn/key": 8, "b/attn/value": 4, "b/attn/out": 2,
             "b/mlp/fc1": 4}, {n: 8 for n in BLOCK}]
  acc, loss = ev.evaluate(allocs)
  for i, alloc in enumerate(allocs):
    quantized = mixed_precision.quantize_model(model.variables, alloc)
    want = sj.evaluate(model, quantized, calib, task=task)["loss"]
    np.testing.assert_allclose(loss[i], want, rtol=1e-5)
  assert loss[0] > loss[1]
  np.testing.assert_array_equal(acc, 0.0)  # mse has no metric


def test_allocation_evaluator_token_weights():
  """A token task: the candidates' loss is the token-level mean, as ``evaluate`` gives it."""
  x, w, targets, mask = _token_problem(seed=12, n=10)
  model = linear_model(w)
  split = data.Split(x=x, targets=targets, mask=mask)
  task = tasks.token_cross_entropy(inputs="x")
  options = search.quantized_options(model.variables, ["dense"], (2, 8))
  ev = search.AllocationEvaluator(model, None, split, options,
                                  sweep.SweepConfig(eval_batch_size=4), task=task)
  acc, loss, per_example = ev([[0], [1]], per_example=True)
  for i, bits in enumerate((2, 8)):
    quantized = mixed_precision.quantize_model(model.variables, {"dense": bits})
    want = sj.evaluate(model, quantized, split, task=task)
    np.testing.assert_allclose(loss[i], want["loss"], rtol=1e-5)
    assert acc[i] == pytest.approx(want["token_accuracy"], abs=1e-6)
    np.testing.assert_allclose(per_example[i].mean(), loss[i], rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# 8. Training on another task.
# ---------------------------------------------------------------------------------------------


class Regressor(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(1, name="fc")(nn.tanh(nn.Dense(16, name="hidden")(x)))


def test_train_with_mse_lowers_the_loss():
  rng = np.random.default_rng(13)
  x = rng.normal(size=(320, 4)).astype(np.float32)
  y = (x @ np.array([1.0, -2.0, 0.5, 0.0]) + 0.05 * rng.normal(size=320)).astype(np.float32)
  ds = data.Dataset("regression", data.Split(x=x[:256], y=y[:256]), data.Split(x=x[256:],
                                                                                 y=y[256:]),
                    num_classes=0, input_shape=(4,))
  task = tasks.mse()
  model = Regressor()
  config = sj.TrainConfig(epochs=12, batch_size=32, learning_rate=1e-2, weight_decay=0.0)
  start = train.init_from_inputs(model, x[:1], config.seed)
  before = sj.evaluate(model, start, ds.eval, task=task)["loss"]
  variables, history = sj.fit(model, ds, config, progress=False, task=task)
  after = history["eval"]["loss"]
  assert after < 0.2 * before, (before, after)
  assert history["train_loss"][-1] < 0.5 * history["train_loss"][0]
  assert "rmse" in history["eval"]
  # the history's eval is evaluate on the returned variables; and the NumPy MSE
  p = jax.tree.map(np.asarray, variables["params"])
  h = np.tanh(x[256:].astype(np.float64) @ p["hidden"]["kernel"] + p["hidden"]["bias"])
  out = (h @ p["fc"]["kernel"] + p["fc"]["bias"])[:, 0]
  np.testing.assert_allclose(after, np.mean((out - y[256:]) ** 2), rtol=1e-4)
