"""Tests of safer_jax.core.norms: p-norm encoding and the eps-ball geometry, against NumPy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from safer_jax.core import norms, perturb

PS = ["1", "2", "inf"]


def _np_norm(x, p):
  return float(np.linalg.norm(np.asarray(x, np.float64).reshape(-1), ord=norms.p_value(p)))


def _w(shape, seed):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.mark.parametrize("given,expected", [
    (1, "1"), (2, "2"), (2.0, "2"), (math.inf, "inf"), (np.inf, "inf"), (np.int64(2), "2"),
    ("1", "1"), (" L2 ", "2"), ("inf", "inf"), ("Infinity", "inf"), ("linf", "inf"),
    ("max", "inf"), ("l1", "1")])
def test_normalize_p(given, expected):
  assert norms.normalize_p(given) == expected
  assert norms.p_value(expected) == {"1": 1.0, "2": 2.0, "inf": math.inf}[expected]


@pytest.mark.parametrize("bad", [3, 0, -math.inf, "l3", True, None, "2.5"])
def test_normalize_p_rejects(bad):
  with pytest.raises(ValueError, match=f"p={bad!r}.*allowed: 1, 2, inf"):
    norms.normalize_p(bad)


@pytest.mark.parametrize("bad,name", [(0, "n_sparse"), (-2, "n"), (2.5, "n_sparse"),
                                      (True, "n_sparse"), ("3", "n")])
def test_check_sparsity_rejects(bad, name):
  with pytest.raises(ValueError, match=f"{name}={bad!r} is out of range"):
    norms.check_sparsity(bad, name)


def test_check_sparsity_and_old_keyword():
  assert norms.check_sparsity(None) is None
  assert norms.check_sparsity(np.int32(4)) == 4
  assert norms.sparsity_argument(None, 3) == (3, "n")
  assert norms.sparsity_argument(5, None) == (5, "n_sparse")
  with pytest.raises(ValueError, match="disagree"):
    norms.sparsity_argument(5, 3)


@pytest.mark.parametrize("p", PS)
def test_vector_and_safe_norm_match_numpy(p):
  x = _w((7, 5), 0)
  np.testing.assert_allclose(float(norms.vector_norm(x, p)), _np_norm(x, p), rtol=1e-6)
  np.testing.assert_allclose(float(norms.safe_norm(jnp.asarray(x), p)), _np_norm(x, p),
                             rtol=1e-6)
  tiny = np.full((4, 4), 1e-30, np.float32)  # squares underflow: only safe_norm survives
  np.testing.assert_allclose(float(norms.safe_norm(jnp.asarray(tiny), p)), _np_norm(tiny, p),
                             rtol=1e-5)
  assert float(norms.safe_norm(jnp.zeros((0,)), p)) == 0.0


@pytest.mark.parametrize("p", PS)
@pytest.mark.parametrize("n_sparse", [None, 1, 4, 100])
def test_dual_norm_is_the_best_inner_product(p, n_sparse):
  g = _w((6, 5), 1)
  a = np.sort(np.abs(g.astype(np.float64)).reshape(-1))[::-1][:n_sparse or g.size]
  q = {"1": a.max(), "2": np.sqrt(np.sum(a ** 2)), "inf": a.sum()}[p]
  np.testing.assert_allclose(float(norms.dual_norm(g, p, n_sparse)), q, rtol=1e-6)
  np.testing.assert_allclose(float(norms.dual_norm(g, p, n=n_sparse)), q, rtol=1e-6)
  # Attained by the steepest-ascent direction of a unit ball.
  d = np.asarray(norms.steepest_ascent(jnp.asarray(g), 1.0, p, n_sparse), np.float64)
  np.testing.assert_allclose(np.sum(d * g), q, rtol=1e-5)


@pytest.mark.parametrize("p", PS)
@pytest.mark.parametrize("n_sparse", [None, 3])
def test_steepest_ascent_is_corruption_direction_bit_for_bit(p, n_sparse):
  g = _w((9, 4), 2)
  a = norms.steepest_ascent(jnp.asarray(g), 0.3, p, n_sparse)
  b = perturb.corruption_direction(g, 0.3, p=p, n_sparse=n_sparse)
  c = perturb.corruption_direction(g, 0.3, p=p, n=n_sparse)  # the old keyword
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(b), np.asarray(c))


def _np_project(a, r, p):
  a = np.asarray(a, np.float64).reshape(-1)
  if p == "inf":
    return np.clip(a, -r, r)
  if p == "2":
    return a * min(1.0, r / max(np.linalg.norm(a), 1e-30))
  if np.abs(a).sum() <= r:
    return a
  lo, hi = 0.0, np.abs(a).max()  # soft threshold theta with sum max(|a| - theta, 0) = r
  for _ in range(200):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if np.maximum(np.abs(a) - mid, 0).sum() > r else (lo, mid)
  return np.sign(a) * np.maximum(np.abs(a) - (lo + hi) / 2, 0)


@pytest.mark.parametrize("p", PS)
@pytest.mark.parametrize("r", [0.05, 1.0, 100.0])
def test_project_matches_numpy(p, r):
  a = _w((5, 6), 3)
  got = np.asarray(norms.project(jnp.asarray(a), r, p), np.float64).reshape(-1)
  np.testing.assert_allclose(got, _np_project(a, r, p), rtol=1e-5, atol=1e-6)
  assert _np_norm(got, p) <= r * (1 + 1e-5)


@pytest.mark.parametrize("p", PS)
def test_project_sparse_keeps_the_largest(p):
  a = _w((30,), 4)
  got = np.asarray(norms.project(jnp.asarray(a), 0.5, p, 4))
  assert np.count_nonzero(got) <= 4
  top = np.argsort(-np.abs(a), kind="stable")[:4]
  kept = np.zeros_like(a)
  kept[top] = a[top]
  np.testing.assert_allclose(got, _np_project(kept, 0.5, p), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(got, np.asarray(norms.project(jnp.asarray(a), 0.5, p, n=4)))


@pytest.mark.parametrize("p,n", [("2", None), ("inf", None), ("2", 5), ("inf", 5)])
def test_random_corruptions_have_the_norm_and_sparsity(p, n):
  a = np.asarray(norms.random_corruptions(jax.random.key(0), jnp.float32(0.3),
                                          shape=(4, 6), p=p, n_sparse=n, num=7))
  assert a.shape == (7, 4, 6)
  flat = np.abs(a.reshape(7, -1))
  got = flat.max(1) if p == "inf" else np.sqrt((flat ** 2).sum(1))
  np.testing.assert_allclose(got, 0.3, rtol=1e-5)
  if n is not None:
    assert ((flat > 0).sum(1) <= n).all()
  old = norms.random_corruptions(jax.random.key(0), jnp.float32(0.3), shape=(4, 6), p=p, n=n,
                                 num=7)
  np.testing.assert_array_equal(np.asarray(old), a)
