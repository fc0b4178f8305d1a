"""Tests of ACR training (safer_jax/training/acr.py): closed forms, projected ascent, one step."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from safer_jax.training import acr


def _kernels(seed=0):
  rng = np.random.default_rng(seed)
  return {"a/fc": jnp.asarray(rng.normal(size=(5, 4)), jnp.float32),
          "b/fc": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)}


def _pnorm(x, p):
  x = np.abs(np.ravel(np.asarray(x, np.float64)))
  return x.max() if p == "inf" else np.sqrt(np.sum(x ** 2))


def _concat(tree):
  return np.concatenate([np.ravel(np.asarray(tree[k])) for k in sorted(tree)])


@pytest.mark.parametrize("p", ["2", "inf"])
@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("n", [None, 3])
def test_closed_form_matches_formula_and_norm(p, scope, n):
  w, g = _kernels(0), _kernels(1)
  eps = 0.1
  a = jax.jit(lambda g, w: acr.first_order_corruption(g, w, eps=eps, p=p, scope=scope,
                                                      n_sparse=n))(g, w)
  groups = ([[k] for k in sorted(w)] if scope == "layer" else [sorted(w)])
  for names in groups:
    gv = np.concatenate([np.ravel(np.asarray(g[k], np.float64)) for k in names])
    wv = np.concatenate([np.ravel(np.asarray(w[k], np.float64)) for k in names])
    av = np.concatenate([np.ravel(np.asarray(a[k], np.float64)) for k in names])
    r = eps * _pnorm(wv, p)
    if n is not None:
      keep = np.zeros_like(gv, bool)
      keep[np.argsort(-np.abs(gv), kind="stable")[:n]] = True
      gv = np.where(keep, gv, 0.0)
    expected = r * gv / np.linalg.norm(gv) if p == "2" else r * np.sign(gv)
    np.testing.assert_allclose(av, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(_pnorm(av, p), r, rtol=1e-6)
    if n is not None:
      assert np.count_nonzero(av) <= n
    # The maximiser attains the dual norm: <g, a> = r * ||g||_q.
    q = np.abs(gv).sum() if p == "inf" else np.linalg.norm(gv)
    np.testing.assert_allclose(gv @ av, r * q, rtol=1e-5)


@pytest.mark.parametrize("p", ["2", "inf"])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_projected_ascent_stays_in_ball_and_improves(p, scope):
  w = _kernels(2)
  x = jnp.asarray(np.random.default_rng(3).normal(size=(16, 5)), jnp.float32)
  y = jnp.arange(16) % 3

  def loss(a):
    h = jnp.tanh(x @ (w["a/fc"] + a["a/fc"]))
    logits = h @ (w["b/fc"] + a["b/fc"])
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

  eps = 0.3
  res = jax.jit(lambda w: acr.adversarial_corruption(loss, w, eps=eps, p=p, steps=6,
                                                     step_size=0.5, scope=scope))(w)
  radii = acr.corruption_radius(w, eps, p, scope)
  for k, r in radii.items():
    a = res.corruption[k] if scope == "layer" else _concat(res.corruption)
    assert _pnorm(a, p) <= float(r) * (1 + 1e-5)
  losses = np.asarray(res.losses)
  assert losses.shape == (7,)
  assert float(res.loss) >= float(res.start_loss) - 1e-7
  np.testing.assert_allclose(float(res.loss), losses.max(), rtol=1e-6)
  np.testing.assert_allclose(float(loss(res.corruption)), float(res.loss), rtol=1e-5)
  assert float(res.loss) > float(loss({k: jnp.zeros_like(v) for k, v in w.items()}))


class _Tiny(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    del train
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(6, name="fc1")(x))
    return nn.Dense(3, name="fc2")(x)


def _reference_step(model, params, images, labels, eps, mix, lr):
  """Closed-form per-layer ACR step (p=2) written out by hand with jax.grad and SGD."""

  def loss(p):
    logits = model.apply({"params": p}, images)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

  g = jax.grad(loss)(params)
  corrupted = {k: dict(v) for k, v in params.items()}
  for layer in params:
    w, gw = params[layer]["kernel"], g[layer]["kernel"]
    a = eps * jnp.linalg.norm(w) * gw / jnp.linalg.norm(gw)
    corrupted[layer]["kernel"] = w + a
  g_adv = jax.grad(loss)(corrupted)  # gradient at w + a*, as a function of the weights
  return jax.tree.map(lambda p, gc, ga: p - lr * ((1 - mix) * gc + mix * ga), params, g, g_adv)


def test_one_acr_step_equals_hand_written_reference():
  model = _Tiny()
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(8, 2, 2, 1)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 3, size=8))
  params = model.init(jax.random.key(0), images)["params"]
  eps, mix, lr = 0.2, 0.3, 0.1
  tx = optax.sgd(lr)
  step = acr.make_acr_step(model, tx, acr.ACRConfig(eps=eps, p=2, steps=0, mix=mix))
  new_vars, _, loss = step({"params": params}, tx.init(params), images, labels)
  expected = _reference_step(model, params, images, labels, eps, mix, lr)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               new_vars["params"], expected)
  assert math.isfinite(float(loss))


class _BN(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    x = x.reshape((x.shape[0], -1))
    x = nn.Dense(4, name="fc1")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.5, name="bn")(x)
    return nn.Dense(3, name="fc2")(nn.relu(x))


def test_batchnorm_state_comes_from_the_clean_pass():
  model = _BN()
  rng = np.random.default_rng(1)
  images = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 3, size=8))
  variables = model.init(jax.random.key(0), images)
  _, clean_state = model.apply(variables, images, train=True, mutable=["batch_stats"])
  _, new_state, metrics = acr.acr_gradients(model, variables, images, labels,
                                            acr.ACRConfig(eps=0.5, mix=1.0))
  jax.tree.map(np.testing.assert_allclose, new_state["batch_stats"], clean_state["batch_stats"])
  assert float(metrics["adv_loss"]) > float(metrics["loss"])


def test_bad_config_raises():
  with pytest.raises(ValueError, match="scope"):
    acr.ACRConfig(scope="nope")
  with pytest.raises(ValueError, match="mix"):
    acr.ACRConfig(mix=1.5)
  with pytest.raises(ValueError, match="p="):
    acr.ACRConfig(p=3)
