"""Tests of safer_jax.core.perturb against independent NumPy references."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from safer_jax.core import perturb as P

K = (3, 3, 4, 4)  # A conv kernel; shared by many tests so that compilations are reused.
BIG = (256, 64)  # For statistical tests.
SHAPES = [(12, 8), K]


def _key(seed):
  """A PRNG key for tests. The 'rbg' implementation compiles ~5x faster than the
  default threefry on CPU; the functions under test are implementation-agnostic,
  and the tests that mimic the sweep use the default keys."""
  return jax.random.key(seed, impl="rbg")


def _w(shape, seed=0, scale=1.0):
  return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def _channels(x):
  """(C, rest) view of a kernel whose last axis is the output channel."""
  x = np.asarray(x)
  return np.moveaxis(x, -1, 0).reshape(x.shape[-1], -1)


# ---------------------------------------------------------------------------
# Quantization.
# ---------------------------------------------------------------------------


def _np_quantize_sym(w, bits, per_channel=True):
  """NumPy reference: symmetric round-to-nearest, codes in [-qmax, qmax]."""
  qmax = 2 ** (bits - 1) - 1
  red = tuple(range(w.ndim - 1)) if per_channel else tuple(range(w.ndim))
  amax = np.max(np.abs(w), axis=red, keepdims=True)
  scale = np.where(amax > 0, amax / np.float32(qmax), np.float32(1)).astype(np.float32)
  codes = np.clip(np.round(w / scale), -qmax, qmax)
  return codes, scale


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantize_symmetric_per_channel(shape, bits):
  w = _w(shape, bits)
  grid = P.quantize_grid(w, bits, full_range=False)  # the restricted grid (the default is qwix's)
  q = np.asarray(P.quantize(w, bits, full_range=False))
  codes, scale = _np_quantize_sym(w, bits)
  qmax = 2 ** (bits - 1) - 1
  assert q.shape == w.shape and q.dtype == np.float32
  assert np.asarray(grid.codes).dtype == np.int32
  np.testing.assert_array_equal(np.asarray(grid.codes), codes)
  np.testing.assert_allclose(np.asarray(grid.scale), scale, rtol=1e-6)
  np.testing.assert_allclose(q, codes * scale, rtol=1e-6, atol=1e-7)
  assert np.abs(np.asarray(grid.codes)).max() <= qmax
  assert np.all(np.abs(w - q) <= scale / 2 * (1 + 1e-5))
  for row in _channels(q):
    assert len(np.unique(row)) <= 2**bits - 1


@pytest.mark.parametrize("bits", [2, 4])
def test_quantize_per_tensor(bits):
  w = _w((16, 5), 7) * np.array([0.01, 0.1, 1.0, 10.0, 100.0], np.float32)
  q = np.asarray(P.quantize(w, bits, axis=None, full_range=False))
  codes, scale = _np_quantize_sym(w, bits, per_channel=False)
  np.testing.assert_allclose(q, codes * scale, rtol=1e-6)
  assert len(np.unique(q)) <= 2**bits - 1
  assert np.all(np.abs(w - q) <= scale / 2 * (1 + 1e-5))
  # Per tensor, the small channels collapse to 0; per channel they do not.
  assert np.all(q[:, 0] == 0)
  assert np.any(np.asarray(P.quantize(w, bits))[:, 0] != 0)


@pytest.mark.parametrize("bits", [1, 2, 3, 8])
@pytest.mark.parametrize("positive", [False, True])
def test_quantize_asymmetric(bits, positive):
  w = _w((12, 8), bits)
  if positive:
    w = np.abs(w) + 0.5
  grid = P.quantize_grid(w, bits, symmetric=False)
  q = np.asarray(P.quantize(w, bits, symmetric=False))
  codes = np.asarray(grid.codes)
  zp = np.asarray(grid.zero_point)
  levels = 2**bits - 1
  assert codes.min() >= 0 and codes.max() <= levels
  assert np.all((zp >= 0) & (zp <= levels))
  # NumPy reference with the range extended to hold 0.
  lo = np.minimum(w.min(0, keepdims=True), 0)
  hi = np.maximum(w.max(0, keepdims=True), 0)
  scale = ((hi - lo) / np.float32(levels)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(grid.scale), scale, rtol=1e-6)
  assert np.all(np.abs(w - q) <= scale / 2 * (1 + 1e-4))
  for row in _channels(q):
    assert len(np.unique(row)) <= 2**bits


def test_quantize_16_bits_nearly_exact():
  w = _w((12, 8), 3)
  q = np.asarray(P.quantize(w, 16))
  amax = np.abs(w).max(0)
  assert np.all(np.abs(w - q) <= amax / 32767.5 / 2 * (1 + 1e-3))  # the max: exactly half a step
  assert np.max(np.abs(w - q)) < 1e-4


def test_quantize_binary():
  w = _w((12, 8), 4)
  w[3, 2] = 0.0
  grid = P.quantize_grid(w, 1)
  q = np.asarray(P.quantize(w, 1))
  m = np.abs(w).mean(0)
  np.testing.assert_array_equal(np.asarray(grid.codes), np.where(w >= 0, 1, -1))
  np.testing.assert_allclose(q, np.where(w >= 0, 1.0, -1.0) * m, rtol=1e-6)
  for row in _channels(q):
    assert len(np.unique(row)) <= 2


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [1, 4])
def test_quantize_zero_channel_is_exactly_zero(symmetric, bits):
  w = _w((12, 8), 5)
  w[:, 1] = 0.0
  q = np.asarray(P.quantize(w, bits, symmetric=symmetric))
  assert np.all(np.isfinite(q))
  np.testing.assert_array_equal(q[:, 1], 0.0)
  q = np.asarray(P.quantize(np.zeros((4, 3), np.float32), bits, axis=None, symmetric=symmetric))
  np.testing.assert_array_equal(q, 0.0)


@pytest.mark.parametrize("symmetric", [True, False])
def test_quantize_jit_and_vmap_match_loop(symmetric):
  w = _w(K, 11)
  grid = [1, 2, 3, 4, 8, 16]
  bits = jnp.array(grid, jnp.float32)
  loop = np.stack([np.asarray(P.quantize(w, b, symmetric=symmetric)) for b in grid])
  quant = lambda w, b: P.quantize(w, b, symmetric=symmetric)
  np.testing.assert_array_equal(np.asarray(jax.vmap(lambda b: quant(w, b))(bits)), loop)
  np.testing.assert_array_equal(np.asarray(jax.jit(jax.vmap(quant, (None, 0)))(w, bits)), loop)
  jitted = jax.jit(quant)
  np.testing.assert_array_equal(np.stack([np.asarray(jitted(w, b)) for b in grid]), loop)
  # quantize == dequantize(quantize_grid), also for a vmapped grid.
  grids = jax.vmap(lambda b: P.quantize_grid(w, b, symmetric=symmetric))(bits)
  np.testing.assert_array_equal(np.asarray(jax.vmap(P.dequantize)(grids)), loop)
  # With w a compile-time constant XLA folds the scale statistics itself (its own
  # summation order): the codes are identical, the values within 1 ulp.
  closed = jax.jit(jax.vmap(lambda b: P.quantize_grid(w, b, symmetric=symmetric)))(bits)
  np.testing.assert_array_equal(np.asarray(closed.codes), np.asarray(grids.codes))
  np.testing.assert_allclose(np.asarray(jax.vmap(P.dequantize)(closed)), loop, rtol=2.5e-7)


def test_quantize_keeps_dtype():
  w = jnp.asarray(_w((8, 4)), jnp.bfloat16)
  assert P.quantize(w, 4).dtype == jnp.bfloat16


# ---------------------------------------------------------------------------
# Pruning.
# ---------------------------------------------------------------------------

RATIOS = [0.0, 0.1, 0.25, 1 / 3, 0.5, 0.57, 0.9, 0.999, 1.0]


def _np_count(ratio, n):
  return int(np.floor(np.float32(ratio) * np.float32(n)))


def _np_prune_magnitude(w, ratio):
  k = _np_count(ratio, w.size)
  flat = w.reshape(-1).copy()
  flat[np.argsort(np.abs(flat), kind="stable")[:k]] = 0
  return flat.reshape(w.shape)


@pytest.mark.parametrize("shape", [(100,), (7, 5), (3, 3, 2, 4)])
def test_prune_magnitude_matches_reference(shape):
  w = _w(shape, 2)
  out = np.asarray(jax.vmap(lambda r: P.prune(w, r))(jnp.array(RATIOS, jnp.float32)))
  for ratio, o in zip(RATIOS, out):
    assert int((o == 0).sum()) == _np_count(ratio, w.size) == math.floor(ratio * w.size + 1e-9)
    np.testing.assert_array_equal(o, _np_prune_magnitude(w, ratio))
    np.testing.assert_array_equal(np.asarray(P.prune(w, ratio)), o)  # vmap == loop.


def test_prune_count_uses_float32_product():
  # float64 gives floor(0.57 * 100) = 56; the documented float32 product gives 57.
  w = _w((100,), 1)
  assert int((np.asarray(P.prune(w, 0.57)) == 0).sum()) == 57


def test_prune_ties_are_deterministic():
  w = np.array([3.0, 1.0, -1.0, 2.0, 1.0, -2.0, 1.0, 0.5], np.float32)
  for ratio, expected_zeros in [(0.25, [1, 7]), (0.5, [1, 2, 4, 7]),
                                (0.625, [1, 2, 4, 6, 7]), (0.75, [1, 2, 3, 4, 6, 7])]:
    out = np.asarray(P.prune(w, ratio))
    np.testing.assert_array_equal(np.flatnonzero(out == 0), expected_zeros)
    np.testing.assert_array_equal(out, _np_prune_magnitude(w, ratio))


@pytest.mark.parametrize("shape", [(6, 10), (3, 3, 4, 8)])
@pytest.mark.parametrize("ratio", [0.0, 0.2, 0.5, 0.75, 1.0])
def test_prune_structured(shape, ratio):
  w = _w(shape, 3)
  w[..., 2] *= 0.01
  out = np.asarray(P.prune(w, ratio, method="structured"))
  c = shape[-1]
  k = _np_count(ratio, c)
  l1 = np.abs(_channels(w)).sum(1)
  expected = np.argsort(l1, kind="stable")[:k]
  zero_channels = np.flatnonzero(np.all(_channels(out) == 0, axis=1))
  np.testing.assert_array_equal(zero_channels, np.sort(expected))
  kept = np.setdiff1d(np.arange(c), expected)
  np.testing.assert_array_equal(_channels(out)[kept], _channels(w)[kept])
  if k:
    assert 2 in expected


def test_prune_structured_other_axis():
  w = _w((5, 4), 3)
  out = np.asarray(P.prune(w, 0.4, method="structured", axis=0))
  expected = np.argsort(np.abs(w).sum(1), kind="stable")[:2]
  np.testing.assert_array_equal(np.flatnonzero(np.all(out == 0, axis=1)), np.sort(expected))


@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.93])
def test_prune_random(ratio):
  w = _w(K, 4)
  a = np.asarray(P.prune(w, ratio, method="random", key=_key(0)))
  b = np.asarray(P.prune(w, ratio, method="random", key=_key(1)))
  k = _np_count(ratio, w.size)
  assert (a == 0).sum() == k and (b == 0).sum() == k
  assert not np.array_equal(a == 0, b == 0)
  np.testing.assert_array_equal(a[a != 0], w[a != 0])
  # Not the magnitude choice.
  assert not np.array_equal(a == 0, _np_prune_magnitude(w, ratio) == 0)


def test_prune_random_vmap_over_ratio_and_seed():
  w = _w(K, 5)
  ratios = jnp.array([0.1, 0.5, 0.9])
  keys = jax.random.split(jax.random.key(0), 2)  # threefry: vmap == loop (not so for rbg).
  out = jax.vmap(lambda k: jax.vmap(lambda r: P.prune(w, r, method="random", key=k))(ratios))(
      keys)
  for i in range(2):
    for j, r in enumerate([0.1, 0.5, 0.9]):
      np.testing.assert_array_equal(
          np.asarray(out[i, j]), np.asarray(P.prune(w, r, method="random", key=keys[i])))


# ---------------------------------------------------------------------------
# Bit flips.
# ---------------------------------------------------------------------------


def test_flip_bits_float32_bit_exact():
  rng = np.random.default_rng(0)
  w = _w((64, 16), 6)
  mask = rng.integers(0, 2**32, size=w.shape, dtype=np.uint32)
  mask[0] = 1 << 30  # Exponent MSB.
  mask[1] = 0x7F800000  # All exponent bits: gives NaN/inf patterns.
  mask[2] = 0x7FC00001
  expected = (w.view(np.uint32) ^ mask).view(np.float32)
  got = np.asarray(P.flip_bits_float32(w, mask))
  assert got.dtype == np.float32
  assert np.isnan(expected).any()
  np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))
  np.testing.assert_array_equal(
      np.asarray(jax.jit(P.flip_bits_float32)(w, mask)).view(np.uint32),
      expected.view(np.uint32))


def test_flip_bits_bfloat16_bit_exact():
  rng = np.random.default_rng(1)
  w = _w((32, 8), 7).astype(ml_dtypes.bfloat16)
  mask = rng.integers(0, 2**16, size=w.shape, dtype=np.uint16)
  mask[0] = 0x7F80
  expected = (w.view(np.uint16) ^ mask).view(ml_dtypes.bfloat16)
  got = np.asarray(P.flip_bits_bfloat16(jnp.asarray(w), mask))
  assert got.dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(got.view(np.uint16), expected.view(np.uint16))
  # float32 input: rounded to bf16, flipped, cast back.
  w32 = _w((32, 8), 8)
  expected32 = (w32.astype(ml_dtypes.bfloat16).view(np.uint16) ^ mask).view(
      ml_dtypes.bfloat16).astype(np.float32)
  got32 = np.asarray(P.flip_bits_bfloat16(w32, mask))
  finite = np.isfinite(expected32)
  np.testing.assert_array_equal(got32[finite].view(np.uint32), expected32[finite].view(np.uint32))
  np.testing.assert_array_equal(np.isnan(got32), np.isnan(expected32))


def test_flip_bits_int8():
  rng = np.random.default_rng(2)
  codes = rng.integers(-128, 128, size=(50, 7), dtype=np.int8)
  mask = rng.integers(0, 256, size=codes.shape, dtype=np.uint8)
  expected = codes ^ mask.view(np.int8)
  got = np.asarray(P.flip_bits_int(codes, mask, 8))
  assert got.dtype == np.int8
  np.testing.assert_array_equal(got, expected)
  got32 = np.asarray(P.flip_bits_int(codes.astype(np.int32), mask.astype(np.uint32), 8))
  np.testing.assert_array_equal(got32, expected.astype(np.int32))


@pytest.mark.parametrize("num_bits", [2, 4, 5])
def test_flip_bits_int_narrow(num_bits):
  rng = np.random.default_rng(num_bits)
  half = 2 ** (num_bits - 1)
  codes = rng.integers(-half, half, size=200).astype(np.int32)
  mask = rng.integers(0, 2**num_bits, size=200).astype(np.uint32)
  x = (codes & (2**num_bits - 1)) ^ mask.astype(np.int64)
  expected = np.where(x >= half, x - 2**num_bits, x)
  np.testing.assert_array_equal(np.asarray(P.flip_bits_int(codes, mask, num_bits)), expected)


@pytest.mark.parametrize("num_bits,rate", [(8, 0.01), (32, 0.003), (16, 0.2)])
def test_random_bit_mask_rate(num_bits, rate):
  mask = np.asarray(P.random_bit_mask(_key(3), BIG, num_bits, rate))
  assert mask.dtype == {8: np.uint8, 16: np.uint16, 32: np.uint32}[num_bits]
  bits = (mask.astype(np.uint64)[..., None] >> np.arange(num_bits, dtype=np.uint64)) & 1
  trials = bits.size
  std = math.sqrt(trials * rate * (1 - rate))
  assert abs(bits.sum() - trials * rate) < 5 * std
  per_pos = bits.reshape(-1, num_bits).mean(0)
  per_std = math.sqrt(rate * (1 - rate) / (bits.size / num_bits))
  assert np.all(np.abs(per_pos - rate) < 6 * per_std)


def test_random_bit_mask_positions_and_extremes():
  key = _key(4)
  shape = BIG
  mask = np.asarray(P.random_bit_mask(key, shape, 32, 0.05, positions=(3, 30)))
  assert np.all(mask & ~np.uint32((1 << 3) | (1 << 30)) == 0)
  for pos in (3, 30):
    rate = ((mask >> pos) & 1).mean()
    assert abs(rate - 0.05) < 5 * math.sqrt(0.05 * 0.95 / mask.size)
  full = np.asarray(P.random_bit_mask(key, shape, 32, 0.05))
  np.testing.assert_array_equal(mask, full & np.uint32((1 << 3) | (1 << 30)))
  np.testing.assert_array_equal(np.asarray(P.random_bit_mask(key, shape, 8, 0.0)), 0)
  np.testing.assert_array_equal(np.asarray(P.random_bit_mask(key, shape, 8, 1.0)), 255)


def test_bitflip_float32_exponent_flip_is_huge():
  w = np.random.default_rng(5).uniform(-0.9, 0.9, K).astype(np.float32)
  out = np.asarray(P.bitflip(w, 1.0, _key(0), representation="float32",
                             positions=(30,)))
  assert np.all(np.abs(out) > 1e30)
  np.testing.assert_array_equal(out.view(np.uint32), w.view(np.uint32) ^ np.uint32(1 << 30))


def test_bitflip_int8():
  w = _w(K, 6)
  q8 = np.asarray(P.quantize(w, 8, full_range=False))  # int8 bit flips: codes -127..127
  np.testing.assert_array_equal(np.asarray(P.bitflip(w, 0.0, _key(0))), q8)
  # Rate 1 on the sign bit only: code c -> c ^ 0x80 in int8, same scale.
  codes, scale = _np_quantize_sym(w, 8)
  flipped = (codes.astype(np.int8) ^ np.int8(-128)).astype(np.float32) * scale
  out = np.asarray(P.bitflip(w, 1.0, _key(0), positions=(7,)))
  np.testing.assert_allclose(out, flipped, rtol=1e-6)
  # Every bit of an 8-bit code flipped: c -> ~c = -c - 1.
  out = np.asarray(P.bitflip(w, 1.0, _key(0)))
  np.testing.assert_allclose(out, (-codes - 1) * scale, rtol=1e-6)


def test_bitflip_vmap_over_rate_and_bfloat16():
  w = _w(K, 9)
  key = _key(2)
  rates = [0.0, 1e-3, 1e-2]
  for rep in ("int8", "float32"):
    out = jax.vmap(lambda r: P.bitflip(w, r, key, representation=rep))(jnp.array(rates))
    for r, o in zip(rates, out):
      np.testing.assert_array_equal(np.asarray(o).view(np.uint32),
                                    np.asarray(P.bitflip(w, r, key, representation=rep)).view(
                                        np.uint32))
  bf = np.asarray(P.bitflip(w, 0.0, key, representation="bfloat16"))
  np.testing.assert_array_equal(bf, w.astype(ml_dtypes.bfloat16).astype(np.float32))
  np.testing.assert_array_equal(
      np.asarray(P.bitflip(w, 0.0, key, representation="float32")), w)


# ---------------------------------------------------------------------------
# Noise.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [0.05, 0.5, 2.0])
def test_noise_std(sigma):
  w = _w(BIG, 10, scale=0.3)
  out = np.asarray(P.noise(w, sigma, _key(0)))
  ratio = np.std(out - w) / (sigma * np.std(w))
  assert abs(ratio - 1) < 0.03  # The relative std error of the estimate is 0.55%.
  assert abs(np.mean(out - w)) < 4 * sigma * np.std(w) / math.sqrt(w.size)


def test_noise_vmap_and_zero():
  w = _w(K, 11)
  key = _key(1)
  sigmas = [0.0, 0.1, 1.0]
  out = jax.vmap(lambda s: P.noise(w, s, key))(jnp.array(sigmas))
  np.testing.assert_array_equal(np.asarray(out[0]), w)
  for s, o in zip(sigmas, out):
    np.testing.assert_allclose(np.asarray(o), np.asarray(P.noise(w, s, key)), rtol=1e-6,
                               atol=1e-7)
  assert not np.array_equal(np.asarray(P.noise(w, 0.1, _key(2))), np.asarray(out[1]))


# ---------------------------------------------------------------------------
# Corruption.
# ---------------------------------------------------------------------------

PS = [1, 2, math.inf]


def _np_pnorm(x, p):
  return float(np.linalg.norm(np.asarray(x, np.float64).reshape(-1), ord=p))


def _np_direction(g, eps, p):
  g = g.astype(np.float64)
  if p == 2:
    return eps * g / np.linalg.norm(g)
  if p == math.inf:
    return eps * np.sign(g)
  a = np.zeros_like(g).reshape(-1)
  j = np.argmax(np.abs(g).reshape(-1))
  a[j] = eps * np.sign(g.reshape(-1)[j])
  return a.reshape(g.shape)


def _random_directions(rng, count, size, p, eps):
  if p == math.inf:
    return eps * rng.choice([-1.0, 1.0], size=(count, size)) * rng.uniform(0.5, 1, (count, 1))
  d = rng.standard_normal((count, size))
  if p == 1:
    d *= rng.uniform(0, 1, (count, size)) ** 4  # Also some nearly sparse ones.
  return eps * d / np.linalg.norm(d, ord=p, axis=1, keepdims=True)


@pytest.mark.parametrize("p", PS)
def test_corruption_direction(p):
  g = _w((16, 9), 12)
  eps = 0.37
  a = np.asarray(P.corruption_direction(g, eps, p=p))
  np.testing.assert_allclose(_np_pnorm(a, p), eps, rtol=1e-5)
  np.testing.assert_allclose(a, _np_direction(g, eps, p), rtol=1e-5, atol=1e-7)
  best = float(np.sum(g.astype(np.float64) * a))
  np.testing.assert_allclose(best, eps * _np_pnorm(g, {1: math.inf, 2: 2, math.inf: 1}[p]),
                             rtol=1e-5)
  rand = _random_directions(np.random.default_rng(0), 1000, g.size, p, eps)
  assert np.all(np.linalg.norm(rand, ord=p, axis=1) <= eps * (1 + 1e-9))
  assert best >= (rand @ g.reshape(-1).astype(np.float64)).max()


@pytest.mark.parametrize("p", PS)
@pytest.mark.parametrize("n", [1, 5, 30])
def test_corruption_direction_sparse(p, n):
  g = _w((8, 8), 13)
  a = np.asarray(P.corruption_direction(g, 0.5, p=p, n=n))
  assert np.count_nonzero(a) <= n
  top = np.argsort(-np.abs(g).reshape(-1), kind="stable")[:n]
  assert set(np.flatnonzero(a)) <= set(top)
  np.testing.assert_allclose(_np_pnorm(a, p), 0.5, rtol=1e-5)
  gs = np.zeros(g.size, np.float32)
  gs[top] = g.reshape(-1)[top]
  np.testing.assert_allclose(a.reshape(-1), _np_direction(gs, 0.5, p), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("p", PS)
def test_corruption_zero_grad_and_vmap(p):
  z = np.zeros((5, 3), np.float32)
  a = np.asarray(jax.vmap(lambda e: P.corruption_direction(z, e, p=p))(jnp.array([0.0, 0.1])))
  np.testing.assert_array_equal(a, 0.0)
  tiny = np.full((5, 3), 1e-30, np.float32)
  np.testing.assert_allclose(_np_pnorm(np.asarray(P.corruption_direction(tiny, 1.0, p=p)), p),
                             1.0, rtol=1e-5)


@pytest.mark.parametrize("p", PS)
def test_corrupt_relative_budget(p):
  w = _w((10, 6), 14)
  g = _w((10, 6), 15)
  eps = [0.01, 0.1, 0.2]
  out = np.asarray(jax.vmap(lambda e: P.corrupt(w, e, g, p=p))(jnp.array(eps)))
  for e, o in zip(eps, out):
    np.testing.assert_allclose(_np_pnorm(o - w, p), e * _np_pnorm(w, p), rtol=1e-4)
    assert float(np.sum(g * (o - w))) > 0
    np.testing.assert_allclose(o, np.asarray(P.corrupt(w, e, g, p=p)), rtol=1e-6)


# ---------------------------------------------------------------------------
# Bad inputs and the registry.
# ---------------------------------------------------------------------------

KEY = _key(0)
W = _w((4, 3))


@pytest.mark.parametrize("call,bad", [
    (lambda: P.quantize(W, 0), "bits=0"),
    (lambda: P.quantize(W, 17), "bits=17"),
    (lambda: P.quantize(W, 2.5), "bits=2.5"),
    (lambda: P.prune(W, 1.5), "ratio=1.5"),
    (lambda: P.prune(W, -0.1), "ratio=-0.1"),
    (lambda: P.bitflip(W, -0.01, KEY), "rate=-0.01"),
    (lambda: P.bitflip(W, 1.5, KEY), "rate=1.5"),
    (lambda: P.noise(W, -1.0, KEY), "sigma=-1.0"),
    (lambda: P.corrupt(W, -0.5, W), "eps=-0.5"),
    (lambda: P.corrupt(W, float("nan"), W), "eps=nan"),
    (lambda: P.validate_magnitude("quantize", np.array([2, 3, 0])), "bits=0"),
    (lambda: P.get_family("fooo"), "fooo"),
    (lambda: P.validate_magnitude("fooo", 1), "fooo"),
    (lambda: P.prune(W, 0.5, method="fooo"), "fooo"),
    (lambda: P.bitflip(W, 0.1, KEY, representation="fooo"), "fooo"),
    (lambda: P.corruption_direction(W, 0.1, p=3), "p=3"),
    (lambda: P.corruption_direction(W, 0.1, n=0), "n=0"),
    (lambda: P.random_bit_mask(KEY, (3,), 8, 0.1, positions=(8,)), "8"),
    (lambda: P.bitflip(W, 0.1, KEY, representation="int", num_bits=17), "num_bits=17"),
])
def test_bad_inputs_raise(call, bad):
  with pytest.raises(ValueError) as e:
    call()
  assert bad in str(e.value)


def test_bad_magnitude_message_names_allowed_range():
  with pytest.raises(ValueError, match=r"bits=0 is out of range; allowed: integers 1\.\.16"):
    P.validate_magnitude("quantize", 0)
  with pytest.raises(ValueError, match="valid families"):
    P.get_family("nope")


@pytest.mark.parametrize("name", sorted(P.FAMILIES))
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weights_raise(name, bad):
  fam = P.get_family(name)
  w = W.copy()
  w[1, 2] = bad
  with pytest.raises(ValueError, match="NaN" if np.isnan(bad) else "inf"):
    fam.fn(w, fam.default_grid[0], KEY, grad=W)


def test_prune_random_needs_key_and_corrupt_needs_grad():
  with pytest.raises(ValueError, match="key"):
    P.prune(W, 0.5, method="random")
  with pytest.raises(ValueError, match="grad"):
    P.get_family("corrupt").fn(W, 0.1, None)


@pytest.mark.parametrize("name", sorted(P.FAMILIES))
def test_families_uniform_interface_under_jit_and_vmap(name):
  fam = P.FAMILIES[name]
  assert fam.name == name
  assert fam.needs_grad == (name == "corrupt")
  P.validate_magnitude(name, np.array(fam.default_grid))
  w = _w(K, 16)
  grid = jnp.array(fam.default_grid, jnp.float32)
  grad = w * 0.5 + 1.0
  key = jax.random.key(0)  # The default (threefry) implementation, as in the sweep.
  out = jax.jit(jax.vmap(lambda m: fam.fn(w, m, key, grad=grad)))(grid)
  assert out.shape == (len(fam.default_grid),) + w.shape
  assert np.all(np.isfinite(np.asarray(out)))
  assert not np.array_equal(np.asarray(out[-1]), w)


# ---------------------------------------------------------------------------
# Param pytrees.
# ---------------------------------------------------------------------------


def _params():
  rng = np.random.default_rng(20)

  def arr(*shape):
    return jnp.asarray(rng.standard_normal(shape).astype(np.float32))

  return {
      "stem": {"conv": {"kernel": arr(3, 3, 4, 4), "bias": arr(4)}, "bn": {
          "scale": arr(4), "bias": arr(4)}},
      "block1": {"conv1": {"kernel": arr(3, 3, 4, 4), "bias": arr(4)},
                 "conv2": {"kernel": arr(3, 3, 4, 4)}},
      "head": {"kernel": arr(36, 5), "bias": arr(5)},
  }


def _flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _kernel_key(layer):
  return "".join(f"['{part}']" for part in layer.split("/")) + "['kernel']"


FAMILY_OPTIONS = [
    ("quantize", 3, {}), ("prune", 0.5, {}),
    ("prune", 0.5, {"method": "structured"}), ("prune", 0.5, {"method": "random"}),
    ("bitflip", 0.05, {}), ("bitflip", 0.05, {"representation": "float32"}),
    ("noise", 0.5, {}), ("corrupt", 0.1, {}), ("corrupt", 0.1, {"p": math.inf, "n": 3}),
]


@pytest.mark.parametrize("include_bias", [False, True])
@pytest.mark.parametrize("family,magnitude,options", FAMILY_OPTIONS)
def test_perturb_params_only_touches_listed_layers(family, magnitude, options, include_bias):
  params = _params()
  grads = jax.tree.map(lambda x: x * 0.3 - 0.1, params)
  layers = ["stem/conv", "block1/conv1"]
  before = _flat(params)
  new = P.perturb_params(params, layers, family, magnitude, _key(1), grads=grads,
                         include_bias=include_bias, **options)
  assert jax.tree.structure(new) == jax.tree.structure(params)
  after = _flat(new)
  assert _flat(params).keys() == before.keys()  # Input not mutated.
  for path, x in before.items():
    np.testing.assert_array_equal(_flat(params)[path], x)
  changed = {_kernel_key(name) for name in layers}
  if include_bias:
    changed |= {"['stem']['conv']['bias']", "['block1']['conv1']['bias']"}
  for path, x in before.items():
    if path in changed:
      assert after[path].shape == x.shape and after[path].dtype == x.dtype
      if "kernel" in path:
        assert not np.array_equal(after[path], x), path
    else:
      np.testing.assert_array_equal(after[path].view(np.uint32), x.view(np.uint32))


def test_perturb_params_matches_array_function_and_keys():
  params = _params()
  key = jax.random.key(7)
  new = P.perturb_params(params, ["block1/conv1", "block1/conv2"], "noise", 0.3, key)
  for i, name in enumerate(["conv1", "conv2"]):
    expected = P.noise(params["block1"][name]["kernel"], 0.3, jax.random.fold_in(key, i))
    np.testing.assert_array_equal(np.asarray(new["block1"][name]["kernel"]),
                                  np.asarray(expected))
  q = P.perturb_params({"params": params}, "head", "quantize", 4, None, include_bias=True)
  np.testing.assert_array_equal(np.asarray(q["params"]["head"]["kernel"]),
                                np.asarray(P.quantize(params["head"]["kernel"], 4)))
  np.testing.assert_array_equal(np.asarray(q["params"]["head"]["bias"]),
                                np.asarray(P.quantize(params["head"]["bias"], 4, axis=None)))


def test_perturb_params_structured_prunes_bias_of_pruned_channels():
  params = _params()
  new = P.perturb_params(params, "stem/conv", "prune", 0.5, None, include_bias=True,
                         method="structured")
  k = np.asarray(new["stem"]["conv"]["kernel"])
  zero = np.all(_channels(k) == 0, axis=1)
  assert zero.sum() == 2
  b = np.asarray(new["stem"]["conv"]["bias"])
  np.testing.assert_array_equal(b[zero], 0)
  np.testing.assert_array_equal(b[~zero], np.asarray(params["stem"]["conv"]["bias"])[~zero])


def test_perturb_params_vmap_over_magnitude_and_seed():
  params = _params()
  f = jax.jit(jax.vmap(jax.vmap(
      lambda m, k: P.perturb_params(params, ["stem/conv"], "bitflip", m, k)["stem"]["conv"][
          "kernel"],
      in_axes=(None, 0)), in_axes=(0, None)))
  keys = jax.random.split(jax.random.key(0), 2)
  out = f(jnp.array([1e-3, 1e-2]), keys)
  assert out.shape == (2, 2, *K)
  single = P.perturb_params(params, ["stem/conv"], "bitflip", 1e-2, keys[0])
  np.testing.assert_array_equal(np.asarray(out[1, 0]), np.asarray(single["stem"]["conv"]["kernel"]))


def test_perturb_params_errors():
  params = _params()
  with pytest.raises(KeyError, match="nope"):
    P.perturb_params(params, ["nope"], "noise", 0.1, KEY)
  with pytest.raises(ValueError, match="grads"):
    P.perturb_params(params, ["head"], "corrupt", 0.1, KEY)
  with pytest.raises(ValueError, match="fooo"):
    P.perturb_params(params, ["head"], "fooo", 0.1, KEY)
  with pytest.raises(ValueError, match="ratio=2"):
    P.perturb_params(params, ["head"], "prune", 2, KEY)
  with pytest.raises(ValueError, match="key"):
    P.perturb_params(params, ["head"], "noise", 0.1, None)


@pytest.mark.parametrize("shape", [(3, 3, 16, 16), (10,), (2, 4097)])
def test_bucketed_draws_are_the_per_shape_draws(shape):
  """Flat draws of a bucket size, cut and reshaped, are the draws of the shape (bit for bit)."""
  w = jax.random.normal(jax.random.key(1), shape)
  n = int(np.prod(shape))
  assert P.flat_bucket(n) >= n and P.flat_bucket(n) in (4 ** k for k in range(6, 12))
  for key in (jax.random.key(7), jax.random.PRNGKey(7)):
    z = jax.random.normal(key, shape, jnp.float32)  # the per-shape draw
    row = P.normal_draws(key[None], P.flat_bucket(n))[0]
    np.testing.assert_array_equal(np.asarray(row[:n]).reshape(shape), z)
    np.testing.assert_array_equal(P.noise(w, 0.3, key),
                                  P.get_family("noise").apply(w, 0.3, z))
    mask = P.random_bit_mask(key, shape, 8, 0.01)
    rows = P.bitflip_masks(key[None], jnp.float32(0.01)[None], P.flat_bucket(n),
                                 num_bits=8, positions=tuple(range(8)))
    np.testing.assert_array_equal(np.asarray(rows[0, :n]).reshape(shape), mask)
    np.testing.assert_array_equal(P.bitflip(w, 0.01, key),
                                  P.bitflip_with_mask(w, mask))
    # traced (inside jit) and eager calls draw the same bits.
    traced = jax.jit(lambda w, k: P.bitflip(w, 0.01, k))(w, key)
    np.testing.assert_array_equal(traced, P.bitflip(w, 0.01, key))


def test_prune_magnitude_padded_equals_prune():
  rng = np.random.default_rng(3)
  for n, pad in [(1, 0), (7, 9), (300, 1024 - 300), (4096, 0)]:
    w = np.round(rng.normal(size=n), 1).astype(np.float32)  # many ties
    flat = np.concatenate([w, rng.normal(size=pad).astype(np.float32)])
    ratios = (0.0, 0.1, 0.57, 1.0)
    got = np.asarray(P.prune_magnitude_padded(flat, np.asarray(ratios, np.float32), n))
    for row, ratio in zip(got, ratios):
      np.testing.assert_array_equal(row[:n], P.prune(w, ratio))
      assert not row[n:].any()


def test_batched_quantize_and_bitflip_equal_one_call_each():
  w = jax.random.normal(jax.random.key(0), (3, 3, 8, 16))
  bits = np.asarray([8, 5, 3, 2], np.float32)
  for row, b in zip(P.quantize_many(w, bits), bits):
    np.testing.assert_array_equal(row, P.quantize(w, float(b)))
  masks = np.stack([P.random_bit_mask(jax.random.key(i), w.shape, 8, 0.05) for i in range(3)])
  for row, mask in zip(P.bitflip_many(w, masks), masks):
    np.testing.assert_array_equal(row, P.bitflip_with_mask(w, mask))
