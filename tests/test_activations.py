"""Tests of activation quantization: the per-tensor quantizer and the input sweep, against NumPy."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from safer_jax.core import data
from safer_jax.core.errors import ConfigError
from safer_jax.measure import activations, sweep


class _Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(16, name="fc1")(x.reshape(len(x), -1)))
    return nn.Dense(10, name="fc2")(h)


def _np_quantize(x, bits, absmax):
  scale = absmax / (2.0 ** (bits - 1) - 0.5) if absmax > 0 else 1.0
  return np.clip(np.round(x / scale), -2 ** (bits - 1), 2 ** (bits - 1) - 1) * scale


def test_quantize_tensor_is_a_signed_per_tensor_grid():
  x = np.asarray(jax.random.normal(jax.random.key(0), (4, 50)), np.float32) * 3
  for bits in (2, 3, 8):
    got = np.asarray(activations.quantize_tensor(jnp.asarray(x), bits, 2.0))
    ref = _np_quantize(x.astype(np.float64), bits, 2.0)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    assert len(np.unique(got)) <= 2 ** bits  # at most every code of the signed type
    scale = 2.0 / (2 ** (bits - 1) - 0.5)  # beyond the range: clipped to the extreme codes
    assert got.max() <= (2 ** (bits - 1) - 1) * scale + 1e-6
    assert got.min() >= -2 ** (bits - 1) * scale - 1e-6


def test_act_sweep_equals_numpy(digits):
  net = _Net()
  x_eval, y_eval = digits.eval.images[:200], digits.eval.labels[:200]
  variables = net.init(jax.random.key(1), x_eval[:1])
  calib = [{"image": digits.train.images[:64], "label": digits.train.labels[:64]}]
  table = activations.act_sweep(net, variables, data.Split(x_eval, y_eval), calib, (3, 2),
                                progress=False)
  assert list(table.layer.unique()) == ["fc1", "fc2"] and set(table.family) == {"act_quantize"}
  p = jax.tree.map(np.asarray, variables["params"])
  w1, b1, w2, b2 = p["fc1"]["kernel"], p["fc1"]["bias"], p["fc2"]["kernel"], p["fc2"]["bias"]

  def forward(x, q1=None, q2=None):
    x = x.reshape(len(x), -1).astype(np.float64)
    x = q1(x) if q1 else x
    h = np.maximum(x @ w1 + b1, 0)
    h = q2(h) if q2 else h
    return h @ w2 + b2

  xc = digits.train.images[:64].reshape(64, -1)
  ranges = {"fc1": np.abs(xc).max(), "fc2": np.abs(np.maximum(xc @ w1 + b1, 0)).max()}
  np.testing.assert_allclose(table.groupby("layer").input_absmax.first()[["fc1", "fc2"]],
                             [ranges["fc1"], ranges["fc2"]], rtol=1e-5)
  for row in table.itertuples():
    q = lambda a, r=ranges[row.layer], b=row.magnitude: _np_quantize(a, b, r)
    logits = forward(x_eval, **({"q1": q} if row.layer == "fc1" else {"q2": q}))
    logp = logits - logits.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    assert abs(row.accuracy - np.mean(logits.argmax(1) == y_eval)) <= 1 / 200 + 1e-9
    np.testing.assert_allclose(row.loss, -np.mean(logp[np.arange(200), y_eval]), rtol=1e-4)
  assert sweep.importance(table)["act_quantize"].notna().all()
  # every listed layer's input at once (quant_sweep's W + A): one layer listed = the sweep's row.
  apply = activations.quantized_inputs_apply(net, {"fc2": ranges["fc2"]}, 2)
  logits = np.asarray(apply(variables, x_eval))
  row = table[(table.layer == "fc2") & (table.magnitude == 2)].iloc[0]
  assert np.mean(logits.argmax(1) == y_eval) == pytest.approx(row.accuracy)
  with pytest.raises(ConfigError, match="bits=1"):
    activations.act_sweep(net, variables, data.Split(x_eval, y_eval), calib, (1,))
  with pytest.raises(ConfigError, match="unknown layers"):
    activations.act_sweep(net, variables, data.Split(x_eval, y_eval), calib, (4,),
                          layers=["fc3"])
