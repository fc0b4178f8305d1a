"""Perturbations of weight arrays, and of the layers of a Flax param pytree.

Every function here is pure and works under ``jax.jit`` and ``jax.vmap`` with
its *magnitude* (``bits``, ``ratio``, ``rate``, ``sigma``, ``eps``) and its
PRNG key traced, so a sweep can ``vmap`` over a grid of magnitudes and seeds::

  jax.vmap(lambda b: quantize(w, b))(jnp.array([2., 3., 4.]))

Options that change the computation's structure (``axis``, ``method``,
``representation``, ``positions``, ``num_bits``, ``p``) are Python values and
must be static under ``jit``.

Kernels follow Flax: the last axis is the output-channel axis (Dense
``(in, out)``, Conv ``(kh, kw, in/groups, out)``), so ``axis=-1`` means "one
scale / one decision per output channel".

The array work runs in jitted helpers (compiled once per shape and static
option), so eager calls are fast after the first. Input checks are eager: when a magnitude or a weight array is concrete (not a
``jax.core.Tracer``) it is checked at call time and a bad one raises
``ValueError`` (see :func:`validate_magnitude` and :func:`check_finite`). Traced
values cannot be inspected and are not checked; validate the grid before
``vmap``-ing over it.

Families (the uniform interface used by the sweep, see :data:`FAMILIES`):

=========  ===========  ======================  ==============================
family     magnitude    unit                    function
=========  ===========  ======================  ==============================
quantize   ``bits``     integer bit width 1..16 :func:`quantize`
prune      ``ratio``    fraction of zeros       :func:`prune`
bitflip    ``rate``     per-bit flip prob.      :func:`bitflip`
noise      ``sigma``    relative to std(w)      :func:`noise`
corrupt    ``eps``      relative to ||w||_p     :func:`corrupt` (needs grad)
=========  ===========  ======================  ==============================
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from safer_jax.core import layers as layers_lib
from safer_jax.core import norms

Array = jax.Array
ArrayLike = jax.typing.ArrayLike
Params = Mapping[str, Any]

MAX_BITS = 16
KERNEL = "kernel"
BIAS = "bias"


# ---------------------------------------------------------------------------
# Checks.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Range:
  name: str
  low: float
  high: float
  integer: bool
  allowed: str


_RANGES = {
    "quantize": _Range("bits", 1, MAX_BITS, True, f"integers 1..{MAX_BITS}"),
    "prune": _Range("ratio", 0.0, 1.0, False, "real numbers in [0, 1]"),
    "bitflip": _Range("rate", 0.0, 1.0, False, "probabilities in [0, 1]"),
    "noise": _Range("sigma", 0.0, math.inf, False, "finite real numbers >= 0"),
    "corrupt": _Range("eps", 0.0, math.inf, False, "finite real numbers >= 0"),
}


def _is_traced(x: Any) -> bool:
  return isinstance(x, jax.core.Tracer)


def _check_range(spec: _Range, value: Any) -> None:
  """Raises ``ValueError`` if a concrete ``value`` (scalar or array) is outside ``spec``."""
  if _is_traced(value):
    return
  arr = np.asarray(value)
  if arr.dtype.kind not in "iuf":
    raise ValueError(
        f"{spec.name}={value!r} is not a real number; allowed: {spec.allowed}")
  flat = arr.reshape(-1)
  x = flat.astype(np.float64)
  bad = ~np.isfinite(x) | (x < spec.low) | (x > spec.high)
  if spec.integer:
    bad |= x != np.round(x)
  if bad.any():
    i = int(np.argmax(bad))
    where = "" if arr.ndim == 0 else f" (element {i} of the {arr.shape} grid)"
    raise ValueError(
        f"{spec.name}={flat[i]}{where} is out of range; allowed: {spec.allowed}")


def validate_magnitude(family: str, value: ArrayLike) -> None:
  """Checks the magnitude of a perturbation family, when it is concrete.

  Args:
    family: a family name, one of ``FAMILIES`` (``'quantize'``: bits, integers
      1..16; ``'prune'``: ratio in [0, 1]; ``'bitflip'``: rate in [0, 1];
      ``'noise'``: relative sigma >= 0; ``'corrupt'``: relative eps >= 0).
    value: a scalar or an array of magnitudes (e.g. a whole sweep grid). A
      traced value is not checked.

  Raises:
    ValueError: for an unknown family (listing the valid ones), or a value out
      of range, e.g. ``"bits=0 is out of range; allowed: integers 1..16"``.
  """
  if family not in _RANGES:
    raise ValueError(
        f"Unknown perturbation family {family!r}; valid families: {sorted(_RANGES)}")
  _check_range(_RANGES[family], value)


def check_finite(w: ArrayLike, name: str = "w") -> None:
  """Raises ``ValueError`` if a concrete array holds NaN or inf (traced: no check).

  :func:`safer_jax.core.layers.check_finite` on one array.

  Args:
    w: array of any shape; integer arrays always pass.
    name: how to call ``w`` in the error message.

  Raises:
    ValueError: naming ``name``, the number of NaN and inf entries and the first
      bad index.
  """
  layers_lib.check_finite(w, name)


def _check_num_bits(num_bits: Any, low: int = 1, high: int = MAX_BITS) -> None:
  if _is_traced(num_bits):
    return
  if isinstance(num_bits, bool) or int(num_bits) != num_bits or not low <= num_bits <= high:
    raise ValueError(f"num_bits={num_bits} is out of range; allowed: integers {low}..{high}")


def _reduce_axes(ndim: int, axis: int | None) -> tuple[int, ...]:
  """Axes to reduce over for per-channel statistics along ``axis`` (None: all)."""
  if axis is None or ndim == 0:
    return tuple(range(ndim))
  if not -ndim <= axis < ndim:
    raise ValueError(f"axis={axis} is out of range for an array with {ndim} dims")
  axis %= ndim
  return tuple(i for i in range(ndim) if i != axis)


def _as_float_array(w: ArrayLike) -> Array:
  w = jnp.asarray(w)
  if not jnp.issubdtype(w.dtype, jnp.floating):
    raise TypeError(f"Expected a floating-point weight array, got dtype {w.dtype}")
  return w


# ---------------------------------------------------------------------------
# Quantization.
# ---------------------------------------------------------------------------


@struct.dataclass
class QuantGrid:
  """The integer grid a weight array is quantized onto: ``w ~ (codes - zero_point) * scale``.

  Attributes:
    codes: int32, the shape of ``w``. Symmetric ``b >= 2``: in
      ``[-(2^(b-1) - 1), 2^(b-1) - 1]``; symmetric ``b = 1``: in ``{-1, +1}``;
      asymmetric: in ``[0, 2^b - 1]``.
    scale: float32, broadcastable to ``codes`` (``(1, ..., 1, C)`` per channel,
      ``(1, ..., 1)`` per tensor); the step between two levels, in weight units.
    zero_point: int32, the shape of ``scale``; the code of the value 0 (always 0
      when symmetric).
    bits: int32 scalar, the bit width ``b``.
    symmetric: static; whether the grid is symmetric.
    dtype: static; the dtype :func:`dequantize` returns (that of ``w``).
  """

  codes: Array
  scale: Array
  zero_point: Array
  bits: Array
  symmetric: bool = struct.field(pytree_node=False, default=True)
  dtype: Any = struct.field(pytree_node=False, default=jnp.float32)


def quantize_grid(w: ArrayLike, bits: ArrayLike, *, axis: int | None = -1,
                  symmetric: bool = True, full_range: bool = True,
                  group_size: int | None = None) -> QuantGrid:
  """Uniform round-to-nearest quantization of ``w`` onto a ``bits``-bit grid.

  Symmetric, ``b >= 2``, ``full_range=True`` (the default): qwix's convention
  (what its deployed integer kernels run): every code of the signed type is used,
  ``scale = max|w| / (2^(b-1) - 0.5)`` and codes
  ``clip(round(w / scale), -2^(b-1), 2^(b-1) - 1)`` (int4: scale max|w| / 7.5,
  codes -8..7), a scale below sqrt(float32 tiny) becoming 1, as in qwix. With
  ``full_range=False``, the restricted range: ``scale = max|w| / (2^(b-1) - 1)``,
  codes ``clip(round(w / scale), -(2^(b-1) - 1), 2^(b-1) - 1)`` (ternary at 2
  bits; the int8 codes of :func:`bitflip`).
  Symmetric, ``b = 1`` (binary, as in BinaryConnect/XNOR-Net): codes
  ``sign(w)`` in ``{-1, +1}`` (``+1`` for ``w = 0``) and ``scale = mean|w|``,
  the L2-optimal scale for sign codes.
  Asymmetric: the range ``[min(w_min, 0), max(w_max, 0)]`` (extended to hold 0,
  so that 0 is exactly representable -- our choice, as in TFLite/PyTorch) is cut
  into ``2^b - 1`` steps, ``scale = (max - min) / (2^b - 1)``, integer
  ``zero_point = round(-min / scale)`` and codes
  ``clip(round(w / scale) + zero_point, 0, 2^b - 1)``.
  ``round`` is round-half-to-even. An all-zero channel gets ``scale = 1`` (or
  ``0`` when binary) and dequantizes to exactly 0. Statistics are computed in
  float32.

  Args:
    w: float array, e.g. a kernel ``(..., C)``.
    bits: bit width, an integer 1..16 (may be a traced scalar, then rounded to
      the nearest integer; it is not range-checked).
    axis: the channel axis (one scale per entry along it, reducing over all the
      other axes); ``-1`` is the output channel of Dense/Conv kernels. ``None``:
      one scale for the whole tensor.
    symmetric: symmetric (zero point 0) or asymmetric (min/max) grid.
    full_range: symmetric ``b >= 2`` only: qwix's full signed range (above; the
      default), else the restricted one.
    group_size: group-wise (sub-channel) scales, as qwix's ``tile_size``: one
      scale per output channel *and* per group of ``group_size`` consecutive
      entries along the first axis (the contraction axis of a Dense kernel
      ``(in, out)``, which ``in`` must be a multiple of). Applies to 2-D
      kernels (``axis=-1``); others keep per-channel scales, as in qwix, which
      cannot tile convolutions. For a 2-D kernel the grid is in the grouped shape: codes
      ``(in // group_size, group_size, out)``, scale ``(in // group_size, 1, out)``
      (``dequantize(grid).reshape(w.shape)`` is the quantized ``w``).

  Returns:
    A :class:`QuantGrid`; ``dequantize(grid)`` is the quantized ``w``.

  Raises:
    ValueError: for concrete ``bits`` outside 1..16 or a concrete ``w`` holding
      NaN/inf.
  """
  validate_magnitude("quantize", bits)
  check_finite(w, "w")
  w = _as_float_array(w)
  if group_size is not None and w.ndim == 2:
    grouped = _grouped(w, axis, group_size)
    return _quantize_grid(grouped, bits, axis=-1, symmetric=symmetric, full_range=full_range,
                          reduce=(1,))
  return _quantize_grid(w, bits, axis=axis, symmetric=symmetric, full_range=full_range)


def _grouped(w: Array, axis: int | None, group_size: int) -> Array:
  """``w (in, out)`` as ``(in // group_size, group_size, out)`` (checked)."""
  if isinstance(group_size, bool) or int(group_size) != group_size or group_size < 1:
    raise ValueError(f"group_size={group_size!r} must be a positive integer (or None).")
  if axis not in (-1, 1):
    raise ValueError(f"group_size needs per-channel scales (axis=-1); got axis={axis}.")
  if w.shape[0] % group_size:
    raise ValueError(f"group_size={group_size} does not divide the kernel's {w.shape[0]} "
                     f"input rows (shape {w.shape}).")
  return w.reshape(w.shape[0] // group_size, int(group_size), w.shape[1])


@functools.partial(jax.jit, static_argnames=("axis", "symmetric", "full_range", "reduce"))
def _quantize_grid(w: Array, bits: ArrayLike, *, axis: int | None, symmetric: bool,
                   full_range: bool = False, reduce: tuple[int, ...] | None = None) -> QuantGrid:
  x = w.astype(jnp.float32)
  red = _reduce_axes(x.ndim, axis) if reduce is None else reduce
  b = jnp.round(jnp.asarray(bits, jnp.float32)).astype(jnp.int32)
  one = jnp.int32(1)

  if symmetric:
    qmax = (jnp.left_shift(one, b - 1) - 1).astype(jnp.float32)  # 0 when b == 1.
    amax = jnp.max(jnp.abs(x), axis=red, keepdims=True)
    if full_range:  # qwix: absmax / (qmax + 0.5), codes -(qmax + 1)..qmax
      scale_multi = amax / (qmax + 0.5)
      scale_multi = jnp.where(scale_multi < jnp.sqrt(jnp.finfo(jnp.float32).tiny), 1.0,
                              scale_multi)
      codes_multi = jnp.clip(jnp.round(x / scale_multi), -qmax - 1.0, qmax)
    else:
      scale_multi = jnp.where(amax > 0, amax * (1.0 / jnp.maximum(qmax, 1.0)), 1.0)
      codes_multi = jnp.clip(jnp.round(x / scale_multi), -qmax, qmax)
    count = math.prod(x.shape[i] for i in red)
    scale_bin = jnp.sum(jnp.abs(x), axis=red, keepdims=True) * (1.0 / max(count, 1))
    codes_bin = jnp.where(x >= 0, 1.0, -1.0)
    binary = b == 1
    codes = jnp.where(binary, codes_bin, codes_multi).astype(jnp.int32)
    scale = jnp.where(binary, scale_bin, scale_multi)
    zero_point = jnp.zeros(scale.shape, jnp.int32)
  else:
    levels = (jnp.left_shift(one, b) - 1).astype(jnp.float32)
    lo = jnp.minimum(jnp.min(x, axis=red, keepdims=True), 0.0)
    hi = jnp.maximum(jnp.max(x, axis=red, keepdims=True), 0.0)
    span = hi - lo
    scale = jnp.where(span > 0, span * (1.0 / levels), 1.0)
    zp = jnp.clip(jnp.round(-lo / scale), 0.0, levels)
    codes = jnp.clip(jnp.round(x / scale) + zp, 0.0, levels).astype(jnp.int32)
    zero_point = zp.astype(jnp.int32)
  return QuantGrid(codes=codes, scale=scale, zero_point=zero_point, bits=b,
                   symmetric=symmetric, dtype=w.dtype)


@jax.jit
def dequantize(grid: QuantGrid) -> Array:
  """Returns ``(codes - zero_point) * scale`` in ``grid.dtype``, the shape of ``codes``."""
  x = (grid.codes - grid.zero_point).astype(jnp.float32) * grid.scale
  return x.astype(grid.dtype)


def quantize(w: ArrayLike, bits: ArrayLike, *, axis: int | None = -1,
             symmetric: bool = True, full_range: bool = True,
             group_size: int | None = None) -> Array:
  """Fake-quantizes ``w`` to ``bits`` bits: ``dequantize(quantize_grid(w, bits, ...))``.

  See :func:`quantize_grid` for the grid, ``axis`` and ``symmetric``.

  Args:
    w: float array, any shape.
    bits: integer bit width 1..16 (may be traced).
    axis: channel axis for per-channel scales; ``None`` for one scale per tensor.
    symmetric: symmetric or asymmetric grid.
    full_range: qwix's full signed range (see :func:`quantize_grid`).
    group_size: group-wise scales along a 2-D (Dense) kernel's input axis (see
      :func:`quantize_grid`); ``None``: per channel (or per tensor).

  Returns:
    The dequantized array, same shape and dtype as ``w``.
  """
  validate_magnitude("quantize", bits)
  check_finite(w, "w")
  w = _as_float_array(w)
  if group_size is not None and w.ndim == 2:
    return _quantize(_grouped(w, axis, group_size), bits, axis=-1, symmetric=symmetric,
                     full_range=full_range, reduce=(1,)).reshape(w.shape)
  return _quantize(w, bits, axis=axis, symmetric=symmetric, full_range=full_range)


@functools.partial(jax.jit, static_argnames=("axis", "symmetric", "full_range", "reduce"))
def _quantize(w: Array, bits: ArrayLike, *, axis: int | None, symmetric: bool,
              full_range: bool = False, reduce: tuple[int, ...] | None = None) -> Array:
  return dequantize(_quantize_grid(w, bits, axis=axis, symmetric=symmetric,
                                   full_range=full_range, reduce=reduce))


# ---------------------------------------------------------------------------
# Pruning.
# ---------------------------------------------------------------------------

PRUNE_METHODS = ("magnitude", "structured", "random")


def _prune_count(ratio: ArrayLike, n: int) -> Array:
  # float32 so that a concrete and a traced ratio give the same count.
  return jnp.floor(jnp.asarray(ratio, jnp.float32) * jnp.float32(n)).astype(jnp.int32)


def _pruned_channels(w: Array, ratio: ArrayLike, axis: int | None) -> Array:
  """Boolean ``(C,)``: the ``floor(ratio * C)`` channels with the smallest L1 norm."""
  if axis is None or w.ndim == 0:
    raise ValueError("Structured pruning needs a channel axis (got axis=None or a scalar).")
  red = _reduce_axes(w.ndim, axis)
  l1 = jnp.sum(jnp.abs(w.astype(jnp.float32)), axis=red)
  return norms.stable_rank(l1) < _prune_count(ratio, l1.size)


def prune(w: ArrayLike, ratio: ArrayLike, *, method: str = "magnitude",
          key: Array | None = None, axis: int | None = -1) -> Array:
  """Sets a fraction ``ratio`` of the weights (or output channels) of ``w`` to zero.

  The number of zeros is exactly ``k = floor(ratio * n)``, the product evaluated
  in float32 (so a traced and a concrete ratio agree; e.g. ``0.57 * 100`` gives
  57, where float64 would give 56; beyond ``n = 2^24`` the count may be off by
  a few). Methods:

  * ``'magnitude'`` (unstructured): the ``k`` entries with the smallest ``|w|``;
    ties broken by flat (row-major) index, lower index pruned first.
  * ``'structured'``: the ``floor(ratio * C)`` channels along ``axis`` with the
    smallest L1 norm (ties: lower channel index first) are zeroed entirely.
  * ``'random'``: ``k`` entries chosen uniformly at random (needs ``key``).

  Args:
    w: float array, any shape; ``n = w.size``.
    ratio: fraction of entries (or channels) pruned, in [0, 1] (may be traced).
    method: one of ``PRUNE_METHODS``.
    key: PRNG key, required by ``'random'`` only.
    axis: channel axis for ``'structured'`` (``-1``: output channels); ignored
      by the other methods.

  Returns:
    The pruned array, same shape and dtype as ``w``.

  Raises:
    ValueError: for a concrete ``ratio`` outside [0, 1], NaN/inf weights, an
      unknown method, or ``'random'`` without a key.
  """
  validate_magnitude("prune", ratio)
  check_finite(w, "w")
  if method not in PRUNE_METHODS:
    raise ValueError(f"Unknown pruning method {method!r}; valid methods: {list(PRUNE_METHODS)}")
  if method == "random" and key is None:
    raise ValueError("prune(method='random') needs a PRNG key.")
  return _prune(_as_float_array(w), ratio, key, method=method, axis=axis)


@functools.partial(jax.jit, static_argnames=("method", "axis"))
def _prune(w: Array, ratio: ArrayLike, key: Array | None, *, method: str,
           axis: int | None) -> Array:
  if method == "magnitude":
    flat = jnp.abs(w.astype(jnp.float32)).reshape(-1)
    keep = (norms.stable_rank(flat) >= _prune_count(ratio, flat.size)).reshape(w.shape)
  elif method == "random":
    rank = jax.random.permutation(key, w.size)
    keep = (rank >= _prune_count(ratio, w.size)).reshape(w.shape)
  else:  # structured
    pruned = _pruned_channels(w, ratio, axis)
    shape = [1] * w.ndim
    shape[axis % w.ndim] = w.shape[axis]
    keep = ~pruned.reshape(shape)
  return jnp.where(keep, w, jnp.zeros((), w.dtype))


@jax.jit
def prune_magnitude_padded(flat: Array, ratios: ArrayLike, n: ArrayLike) -> Array:
  """:func:`prune` ``method='magnitude'`` of ``flat[:n]`` at each of ``ratios``; the rest is padding.

  ``flat`` (N,) holds a kernel's ``n`` weights in row-major order, then
  anything; ``n`` may be traced, so kernels of every size share one compiled
  program, and the ranking is computed once for all ``ratios`` (P,). Row p of
  the ``(P, N)`` result equals ``prune(flat[:n], ratios[p])`` on its first
  ``n`` entries bit for bit (padding ranks after every weight; the count is
  ``floor(ratio * n)`` in float32) and is zero after them.
  """
  valid = jnp.arange(flat.shape[0]) < n
  rank = norms.stable_rank(jnp.where(valid, jnp.abs(flat.astype(jnp.float32)), jnp.inf))
  counts = jnp.floor(jnp.asarray(ratios, jnp.float32) * jnp.asarray(n, jnp.float32))
  keep = valid & (rank[None, :] >= counts.astype(jnp.int32)[:, None])
  return jnp.where(keep, flat[None, :], jnp.zeros((), flat.dtype))


@functools.partial(jax.jit, static_argnames=("axis", "symmetric", "full_range"))
def quantize_many(w: ArrayLike, bits: ArrayLike, *, axis: int | None = -1,
                  symmetric: bool = True, full_range: bool = True) -> Array:
  """``(P, *w.shape)``: :func:`quantize` of ``w`` at each of ``bits`` (P,), in one program.

  Row p equals ``quantize(w, bits[p])`` bit for bit for ``bits[p] >= 2`` (the
  statistics are computed once; the rest is elementwise). Bits are not range-checked.
  """
  return jax.vmap(lambda b: _quantize(w, b, axis=axis, symmetric=symmetric,
                                     full_range=full_range))(bits)


# ---------------------------------------------------------------------------
# Bit flips.
# ---------------------------------------------------------------------------

REPRESENTATIONS = ("int8", "int", "float32", "bfloat16")


@jax.jit
def flip_bits_float32(w: ArrayLike, mask: ArrayLike) -> Array:
  """XORs the IEEE float32 bit pattern of ``w`` with ``mask`` (bit-exact).

  Args:
    w: float array; cast to float32 first.
    mask: integer array broadcastable to ``w`` (cast to uint32); bit ``i`` set
      flips bit ``i`` of the pattern (0 = mantissa LSB, 23..30 exponent, 31 sign).

  Returns:
    The flipped values, cast back to ``w.dtype``; may hold inf or NaN (an
    exponent flip), which is intended.
  """
  w = jnp.asarray(w)
  pattern = jax.lax.bitcast_convert_type(w.astype(jnp.float32), jnp.uint32)
  flipped = pattern ^ jnp.asarray(mask).astype(jnp.uint32)
  return jax.lax.bitcast_convert_type(flipped, jnp.float32).astype(w.dtype)


@jax.jit
def flip_bits_bfloat16(w: ArrayLike, mask: ArrayLike) -> Array:
  """Casts ``w`` to bfloat16 and XORs its 16-bit pattern with ``mask`` (bit-exact).

  Args:
    w: float array.
    mask: integer array broadcastable to ``w`` (cast to uint16); bit ``i`` flips
      bit ``i`` (0 = mantissa LSB, 7..14 exponent, 15 sign).

  Returns:
    The flipped bfloat16 values cast back to ``w.dtype`` (so even a zero mask
    rounds ``w`` to bfloat16); may hold inf or NaN.
  """
  w = jnp.asarray(w)
  pattern = jax.lax.bitcast_convert_type(w.astype(jnp.bfloat16), jnp.uint16)
  flipped = pattern ^ jnp.asarray(mask).astype(jnp.uint16)
  return jax.lax.bitcast_convert_type(flipped, jnp.bfloat16).astype(w.dtype)


def flip_bits_int(codes: ArrayLike, mask: ArrayLike, num_bits: int) -> Array:
  """XORs ``num_bits``-bit two's-complement integer codes with ``mask``.

  Only the low ``num_bits`` bits of ``codes`` and ``mask`` are used; the result
  is re-interpreted as a signed ``num_bits`` integer, e.g. for 8 bits flipping
  bit 7 (the sign bit) maps ``5 -> -123``.

  Args:
    codes: integer array with values in ``[-2^(num_bits-1), 2^(num_bits-1) - 1]``.
    mask: integer array broadcastable to ``codes``; bit ``i`` set flips bit ``i``
      (0 = LSB, ``num_bits - 1`` = sign bit).
    num_bits: code width, 1..16.

  Returns:
    The flipped codes, same shape as ``codes`` and dtype of ``codes`` (which
    must be able to hold ``num_bits``-bit values).
  """
  _check_num_bits(num_bits)
  codes = jnp.asarray(codes)
  if not jnp.issubdtype(codes.dtype, jnp.integer):
    raise TypeError(f"flip_bits_int expects integer codes, got dtype {codes.dtype}")
  return _flip_bits_int(codes, mask, num_bits)


@jax.jit
def _flip_bits_int(codes: Array, mask: ArrayLike, num_bits: ArrayLike) -> Array:
  nb = jnp.asarray(num_bits, jnp.int32)
  full = jnp.left_shift(jnp.int32(1), nb) - 1
  low = codes.astype(jnp.int32) & full
  m = (jnp.asarray(mask).astype(jnp.uint32) & full.astype(jnp.uint32)).astype(jnp.int32)
  x = low ^ m
  signed = jnp.where(x >= jnp.left_shift(jnp.int32(1), nb - 1), x - full - 1, x)
  return signed.astype(codes.dtype)


def _mask_dtype(num_bits: int):
  return jnp.uint8 if num_bits <= 8 else jnp.uint16 if num_bits <= 16 else jnp.uint32


def _check_positions(positions: Sequence[int] | None, num_bits: int) -> tuple[int, ...]:
  """Validates static bit positions; ``None`` means all ``num_bits`` bits."""
  if positions is None:
    return tuple(range(num_bits))
  positions = tuple(positions)
  for pos in positions:
    if isinstance(pos, bool) or int(pos) != pos or not 0 <= pos < num_bits:
      raise ValueError(
          f"bit position {pos} is out of range; allowed: integers 0..{num_bits - 1}")
  if len(set(positions)) != len(positions):
    raise ValueError(f"bit positions {positions} hold duplicates")
  return tuple(int(pos) for pos in positions)


def random_bit_mask(key: Array, shape: Sequence[int], num_bits: int, rate: ArrayLike,
                    positions: Sequence[int] | None = None) -> Array:
  """Random XOR mask: every bit of every element is set independently with prob. ``rate``.

  Bit ``i`` of all elements is drawn from ``jax.random.fold_in(key, i)``, so
  restricting ``positions`` gives the full mask ANDed with those positions.

  Args:
    key: PRNG key.
    shape: shape of the mask (that of the weights).
    num_bits: number of bits per element, a static int 1..32.
    rate: per-bit flip probability in [0, 1] (may be traced).
    positions: static bit indices (0 = LSB) that may flip; ``None``: all
      ``num_bits`` bits.

  Returns:
    A ``shape`` mask of the smallest unsigned dtype holding ``num_bits`` bits
    (uint8, uint16 or uint32).
  """
  _check_num_bits(num_bits, 1, 32)
  validate_magnitude("bitflip", rate)
  positions = _check_positions(positions, num_bits)
  return _random_bit_mask(key, rate, shape=tuple(int(d) for d in shape), num_bits=num_bits,
                          positions=positions)


@functools.partial(jax.jit, static_argnames=("shape", "num_bits", "positions"))
def _random_bit_mask(key: Array, rate: ArrayLike, *, shape: tuple[int, ...], num_bits: int,
                     positions: tuple[int, ...]) -> Array:
  rate = jnp.asarray(rate, jnp.float32)
  pos_array = jnp.asarray(positions, jnp.uint32)

  def body(i, mask):  # A loop, not an unrolled one: one RNG in the graph, O(size) memory.
    pos = pos_array[i]
    flip = jax.random.bernoulli(jax.random.fold_in(key, pos), rate, shape)
    return mask | jnp.left_shift(flip.astype(jnp.uint32), pos)

  mask = jax.lax.fori_loop(0, len(positions), body, jnp.zeros(shape, jnp.uint32))
  return mask.astype(_mask_dtype(num_bits))


def bitflip(w: ArrayLike, rate: ArrayLike, key: Array, *, representation: str = "int8",
            positions: Sequence[int] | None = None, num_bits: int = 8,
            axis: int | None = -1) -> Array:
  """Hardware-style bit flips in the stored representation of ``w``.

  Each bit of each stored weight flips independently with probability ``rate``
  (only the bits in ``positions``, if given).

  * ``'int8'`` / ``'int'``: ``w`` is quantized symmetric per channel to
    ``num_bits``-bit two's-complement codes (``'int8'``: 8 bits), the codes'
    bits are flipped and the result is dequantized with the same scales. A
    flipped code may reach ``-2^(num_bits-1)``. At ``rate = 0`` this returns the
    quantized ``w`` (the deployed integer network), not ``w`` itself.
  * ``'float32'``: flips the IEEE float32 pattern (32 bits).
  * ``'bfloat16'``: flips the bfloat16 pattern (16 bits) of ``w`` cast to bf16.

  Float exponent flips can give huge values, inf or NaN: that is the fault
  model, and no check or clipping is applied to the result.

  Args:
    w: float array, e.g. a kernel ``(..., C)``.
    rate: per-bit flip probability in [0, 1] (may be traced).
    key: PRNG key.
    representation: one of ``REPRESENTATIONS``.
    positions: static bit indices (0 = LSB) allowed to flip; ``None``: all.
    num_bits: code width for ``'int'`` (2..16); must be 8 for ``'int8'``.
    axis: channel axis of the integer scales (``None``: per tensor).

  Returns:
    The faulty weights, same shape and dtype as ``w``.

  Raises:
    ValueError: for a concrete ``rate`` outside [0, 1], NaN/inf in ``w``, an
      unknown representation or bad ``num_bits``/``positions``.
  """
  validate_magnitude("bitflip", rate)
  check_finite(w, "w")
  w = _as_float_array(w)
  static = _bitflip_static(representation, positions, num_bits, axis)
  if any(_is_traced(x) for x in (w, rate, key)):
    return _bitflip(w, rate, key, **static)
  mask = bitflip_masks(key[None], jnp.asarray(rate, jnp.float32)[None], flat_bucket(w.size),
                       num_bits=static["num_bits"], positions=static["positions"])[0]
  return _bitflip_with(w, mask, **static)


def bitflip_with_mask(w: ArrayLike, mask: ArrayLike, *, representation: str = "int8",
                      positions: Sequence[int] | None = None, num_bits: int = 8,
                      axis: int | None = -1) -> Array:
  """:func:`bitflip` with a given XOR ``mask`` (``w.shape``; e.g. :func:`random_bit_mask`)."""
  return _bitflip_with(_as_float_array(w), jnp.asarray(mask),
                       **_bitflip_static(representation, positions, num_bits, axis))


@functools.partial(jax.jit,
                   static_argnames=("representation", "positions", "num_bits", "axis"))
def _bitflip_many(w: Array, masks: Array, *, representation: str, positions: tuple[int, ...],
                  num_bits: int, axis: int | None) -> Array:
  return jax.vmap(lambda m: _bitflip_with(w, m, representation=representation,
                                          positions=positions, num_bits=num_bits,
                                          axis=axis))(masks)


def bitflip_many(w: ArrayLike, masks: ArrayLike, **options) -> Array:
  """``(P, *w.shape)``: :func:`bitflip_with_mask` of ``w`` with each of ``masks`` (P, *w.shape).

  In one program (the integer grid is computed once); row p equals
  ``bitflip_with_mask(w, masks[p], **options)`` bit for bit.
  """
  return _bitflip_many(_as_float_array(w), jnp.asarray(masks), **_bitflip_static(**options))


def _bitflip_static(representation: str = "int8", positions: Sequence[int] | None = None,
                    num_bits: int = 8, axis: int | None = -1) -> dict:
  """:func:`bitflip`'s static options, checked: representation, positions, num_bits, axis."""
  if representation not in REPRESENTATIONS:
    raise ValueError(
        f"Unknown representation {representation!r}; valid ones: {list(REPRESENTATIONS)}")
  if representation == "int8" and num_bits != 8:
    raise ValueError(f"representation='int8' needs num_bits=8, got num_bits={num_bits}; "
                     "use representation='int'")
  if representation == "int":
    _check_num_bits(num_bits, 2, MAX_BITS)
  width = {"int8": 8, "int": num_bits, "float32": 32, "bfloat16": 16}[representation]
  return dict(representation=representation, positions=_check_positions(positions, width),
              num_bits=int(width), axis=axis)


@functools.partial(jax.jit,
                   static_argnames=("representation", "positions", "num_bits", "axis"))
def _bitflip(w: Array, rate: ArrayLike, key: Array, *, representation: str,
             positions: tuple[int, ...], num_bits: int, axis: int | None) -> Array:
  mask = _random_bit_mask(key, rate, shape=w.shape, num_bits=num_bits, positions=positions)
  return _bitflip_with(w, mask, representation=representation, positions=positions,
                       num_bits=num_bits, axis=axis)


@functools.partial(jax.jit,
                   static_argnames=("representation", "positions", "num_bits", "axis"))
def _bitflip_with(w: Array, mask: Array, *, representation: str, positions: tuple[int, ...],
                  num_bits: int, axis: int | None) -> Array:
  """:func:`bitflip` given its XOR mask: ``w.shape``, or flat and at least ``w.size`` long."""
  del positions  # (already in the mask)
  if mask.shape != w.shape:
    mask = mask[:w.size].reshape(w.shape)
  if representation in ("int8", "int"):
    grid = _quantize_grid(w, num_bits, axis=axis, symmetric=True)
    return dequantize(grid.replace(codes=_flip_bits_int(grid.codes, mask, num_bits)))
  if representation == "float32":
    return flip_bits_float32(w, mask)
  return flip_bits_bfloat16(w, mask)


# ---------------------------------------------------------------------------
# Gaussian noise.
# ---------------------------------------------------------------------------


def noise(w: ArrayLike, sigma: ArrayLike, key: Array) -> Array:
  """Adds Gaussian noise of std ``sigma * std(w)``: ``w + sigma * std(w) * N(0, 1)``.

  ``sigma`` is relative to the standard deviation (``ddof=0``, over the whole
  tensor) of the layer's own weights, so one grid fits layers of any scale; a
  constant tensor (std 0) is returned unchanged.

  Args:
    w: float array, any shape.
    sigma: relative noise level >= 0 (may be traced).
    key: PRNG key.

  Returns:
    The noisy array, same shape and dtype as ``w``.
  """
  validate_magnitude("noise", sigma)
  check_finite(w, "w")
  w = _as_float_array(w)
  if any(_is_traced(x) for x in (w, sigma, key)):
    return _noise(w, sigma, key)
  return _noise_with(w, sigma, normal_draws(key[None], flat_bucket(w.size))[0])


@jax.jit
def _noise(w: Array, sigma: ArrayLike, key: Array) -> Array:
  return _noise_with(w, sigma, jax.random.normal(key, w.shape, jnp.float32))


@jax.jit
def _noise_with(w: Array, sigma: ArrayLike, z: Array) -> Array:
  """:func:`noise` given its N(0, 1) draws ``z``: ``w.shape``, or flat and >= ``w.size`` long."""
  if z.shape != w.shape:
    z = z[:w.size].reshape(w.shape)
  x = w.astype(jnp.float32)
  return (x + jnp.asarray(sigma, jnp.float32) * jnp.std(x) * z).astype(w.dtype)


# ---------------------------------------------------------------------------
# Random draws, compiled once per size bucket.
# ---------------------------------------------------------------------------
#
# XLA compiles the counter-based PRNG (threefry) into a large program: on CPU it is
# most of the compile time of `noise` and `bitflip` (~0.4 s per weight shape). With
# `jax_threefry_partitionable` (JAX's default) element i of a draw of shape S is a
# function of the key and of i's row-major index alone, so the first n values of a
# flat draw of any size >= n, reshaped, *are* the draw of shape S (n = prod S). The
# eager `noise` / `bitflip` and the sweep draw on flat sizes and
# compile the PRNG once per size bucket (a power of 4) instead of once per shape; the numbers are
# those of the per-shape draw (tests/test_perturb.py checks it bit for bit).

_MIN_BUCKET = 1 << 12


def flat_bucket(n: int) -> int:
  """The flat draw size for ``n`` weights: the next power of 4 >= n (at least 4096).

  Powers of 4: few buckets (few compilations) for at most 4x the draws needed.
  """
  if not jax.config.jax_threefry_partitionable:
    raise RuntimeError("Bucketed draws need jax_threefry_partitionable=True (JAX's default), "
                       "under which a flat draw's prefix equals the per-shape draw.")
  bits = max(int(n) - 1, 0).bit_length()
  return max(_MIN_BUCKET, 1 << (bits + bits % 2))


@functools.partial(jax.jit, static_argnums=(1,))
def normal_draws(keys: Array, size: int) -> Array:
  """``(P, size)`` float32 N(0, 1): row p is ``jax.random.normal(keys[p], (size,))``."""
  return jax.vmap(lambda k: jax.random.normal(k, (size,), jnp.float32))(keys)


@functools.partial(jax.jit, static_argnums=(2,), static_argnames=("num_bits", "positions"))
def bitflip_masks(keys: Array, rates: Array, size: int, *, num_bits: int,
                  positions: tuple[int, ...]) -> Array:
  """``(P, size)`` XOR masks: row p is ``random_bit_mask(keys[p], (size,), ..., rates[p])``."""
  return jax.vmap(lambda k, r: _random_bit_mask(k, r, shape=(size,), num_bits=num_bits,
                                                positions=positions))(keys, rates)


# ---------------------------------------------------------------------------
# Worst-case parameter corruption (Zhang et al., AAAI 2021).
# ---------------------------------------------------------------------------


def corruption_direction(grad: ArrayLike, eps_abs: ArrayLike, *, p: Any = 2,
                         n_sparse: int | None = None, n: int | None = None) -> Array:
  """First-order worst-case corruption: ``argmax <grad, a>`` s.t. ``||a||_p <= eps_abs``.

  Closed forms (Zhang et al., 2021): ``p = 2``: ``eps * g / ||g||_2``;
  ``p = inf``: ``eps * sign(g)``; ``p = 1``: ``eps * sign(g_j)`` on the single
  entry ``j`` with the largest ``|g_j|`` (first on ties), zero elsewhere. With
  ``n_sparse``, only the ``n_sparse`` largest ``|g|`` entries (ties: lower flat
  index) are kept and the formula is applied to them, so ``a`` has at most
  ``n_sparse`` non-zeros. A zero gradient gives a zero direction (never NaN).
  Norms are over the whole array, flattened. The checked form of
  :func:`safer_jax.core.norms.steepest_ascent`.

  Args:
    grad: float array, the loss gradient w.r.t. the weights (any shape).
    eps_abs: absolute budget ``||a||_p``, >= 0, in weight units (may be traced).
    p: 1, 2 or ``inf`` (``math.inf``, ``np.inf`` or ``'inf'``; see
      :func:`safer_jax.core.norms.normalize_p`).
    n_sparse: optional sparsity, an integer >= 1 (``None``: dense).
    n: the old name of ``n_sparse``.

  Returns:
    The direction ``a``, same shape and dtype as ``grad``; ``||a||_p = eps_abs``
    unless ``grad`` is zero.

  Raises:
    ValueError: bad ``p``, ``n_sparse`` or concrete ``eps_abs``, or NaN/inf in ``grad``.
  """
  p = norms.normalize_p(p)
  n_sparse = norms.check_sparsity(*norms.sparsity_argument(n_sparse, n))
  _check_range(dataclasses.replace(_RANGES["corrupt"], name="eps_abs"), eps_abs)
  check_finite(grad, "grad")
  return norms.steepest_ascent(_as_float_array(grad), eps_abs, p, n_sparse)


def corrupt(w: ArrayLike, eps: ArrayLike, grad: ArrayLike, *, p: Any = 2,
            n_sparse: int | None = None, n: int | None = None) -> Array:
  """Worst-case (gradient) corruption of ``w`` at a budget relative to ``||w||_p``.

  Returns ``w + corruption_direction(grad, eps * ||w||_p, p=p, n_sparse=n_sparse)``:
  ``eps`` is relative to the layer's own p-norm (over the whole tensor,
  :func:`safer_jax.core.norms.safe_norm`), so ``||w' - w||_p = eps * ||w||_p``.

  Args:
    w: float array, any shape.
    eps: relative budget >= 0 (may be traced).
    grad: loss gradient w.r.t. ``w``, same shape.
    p: 1, 2 or inf.
    n_sparse: optional sparsity (at most ``n_sparse`` entries change).
    n: the old name of ``n_sparse``.

  Returns:
    The corrupted array, same shape and dtype as ``w``.

  Raises:
    ValueError: bad ``eps``/``p``/``n_sparse``, NaN/inf in ``w`` or ``grad``, or a
      shape mismatch.
  """
  validate_magnitude("corrupt", eps)
  p = norms.normalize_p(p)
  n_sparse = norms.check_sparsity(*norms.sparsity_argument(n_sparse, n))
  check_finite(w, "w")
  check_finite(grad, "grad")
  w = _as_float_array(w)
  grad = _as_float_array(grad)
  if grad.shape != w.shape:
    raise ValueError(f"grad has shape {grad.shape} but w has shape {w.shape}")
  return _corrupt(w, eps, grad, n_sparse, p=p)


@functools.partial(jax.jit, static_argnames=("p",))
def _corrupt(w: Array, eps: ArrayLike, grad: Array, n_sparse: Any, *, p: str) -> Array:
  eps_abs = jnp.asarray(eps, jnp.float32) * norms.safe_norm(w, p)
  a = norms.steepest_ascent(grad.astype(jnp.float32), eps_abs, p, n_sparse)
  return (w.astype(jnp.float32) + a).astype(w.dtype)


# ---------------------------------------------------------------------------
# Family registry.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Family:
  """A perturbation family with a uniform interface for the sweep.

  Attributes:
    name: registry name.
    fn: ``fn(w, magnitude, key, grad=None, **options) -> w'`` (same shape and
      dtype as ``w``); ``options`` are the keyword options of the underlying
      function (e.g. ``axis``, ``method``, ``representation``, ``p``).
    stochastic: whether the result depends on ``key`` (average over seeds).
    magnitude_name: what the magnitude is (``'bits'``, ``'ratio'``, ...).
    needs_grad: whether ``fn`` needs ``grad`` (the loss gradient w.r.t. ``w``).
    default_grid: default magnitudes, mildest first.
    draw: optional ``draw(keys (P,), magnitudes (P,), size, **options) -> (P, size)``,
      the family's random draws on flat ``size``-long rows (see :func:`split_draws`).
    apply: with ``draw``: ``apply(w, magnitude, row, grad=None, **options) -> w'``.
  """

  name: str
  fn: Callable[..., Array]
  stochastic: bool
  magnitude_name: str
  needs_grad: bool
  default_grid: tuple[float, ...]
  draw: Callable[..., Array] | None = None
  apply: Callable[..., Array] | None = None


def split_draws(family: Family, options: Mapping[str, Any]) -> bool:
  """Whether ``family`` with ``options`` draws its randomness apart (:attr:`Family.draw`).

  Then ``fn(w, m, key, **options)`` equals ``apply(w, m, draw(key[None], m[None],
  flat_bucket(w.size), **options)[0], **options)`` bit for bit, and ``draw``
  compiles once per size bucket (see :func:`flat_bucket`).
  """
  return family.draw is not None and family.apply is not None


def _quantize_fn(w, magnitude, key=None, grad=None, **options):
  del key, grad
  return quantize(w, magnitude, **options)


def _prune_fn(w, magnitude, key=None, grad=None, **options):
  del grad
  return prune(w, magnitude, key=key, **options)


def _bitflip_fn(w, magnitude, key, grad=None, **options):
  del grad
  return bitflip(w, magnitude, key, **options)


def _noise_fn(w, magnitude, key, grad=None, **options):
  del grad
  if options:
    raise TypeError(f"noise takes no options, got {sorted(options)}")
  return noise(w, magnitude, key)


def _bitflip_draw(keys, magnitudes, size, **options):
  static = _bitflip_static(**options)
  return bitflip_masks(keys, jnp.asarray(magnitudes, jnp.float32), size,
                       num_bits=static["num_bits"], positions=static["positions"])


def _bitflip_apply(w, magnitude, mask, grad=None, **options):
  del magnitude, grad  # (in the mask)
  return _bitflip_with(_as_float_array(w), mask, **_bitflip_static(**options))


def _noise_draw(keys, magnitudes, size, **options):
  del magnitudes
  if options:
    raise TypeError(f"noise takes no options, got {sorted(options)}")
  return normal_draws(keys, size)


def _noise_apply(w, magnitude, z, grad=None, **options):
  del grad, options
  return _noise_with(_as_float_array(w), magnitude, z)


def _corrupt_fn(w, magnitude, key=None, grad=None, **options):
  del key
  if grad is None:
    raise ValueError("The 'corrupt' family needs the loss gradient (grad=...).")
  return corrupt(w, magnitude, grad, **options)


FAMILIES: dict[str, Family] = {
    "quantize": Family("quantize", _quantize_fn, False, "bits", False, (8, 6, 5, 4, 3, 2)),
    # 'prune' is deterministic for the default method; method='random' uses the key.
    "prune": Family("prune", _prune_fn, False, "ratio", False, (0.1, 0.3, 0.5, 0.7, 0.9)),
    "bitflip": Family("bitflip", _bitflip_fn, True, "rate", False,
                      (1e-4, 3e-4, 1e-3, 3e-3, 1e-2), _bitflip_draw, _bitflip_apply),
    "noise": Family("noise", _noise_fn, True, "sigma", False, (0.05, 0.1, 0.2, 0.5, 1.0),
                    _noise_draw, _noise_apply),
    "corrupt": Family("corrupt", _corrupt_fn, False, "eps", True,
                      (0.01, 0.02, 0.05, 0.1, 0.2)),
}


def get_family(name: str | Family) -> Family:
  """Returns the registered family ``name`` (a :class:`Family` is returned as is).

  Raises:
    ValueError: for an unknown name, listing the valid ones.
  """
  if isinstance(name, Family):
    return name
  if name not in FAMILIES:
    raise ValueError(
        f"Unknown perturbation family {name!r}; valid families: {sorted(FAMILIES)}")
  return FAMILIES[name]


# ---------------------------------------------------------------------------
# Param pytrees.
# ---------------------------------------------------------------------------


def _perturb_bias(fam: Family, kernel: Array, bias: Array, grad: Array | None,
                  magnitude: ArrayLike, key: Array | None, options: Mapping[str, Any]) -> Array:
  opts = dict(options)
  if fam.name == "prune" and opts.get("method", "magnitude") == "structured":
    axis = opts.get("axis", -1)
    kernel = jnp.asarray(kernel)
    pruned = _pruned_channels(kernel, magnitude, axis)
    # A DenseGeneral kernel (in, heads, head_dim) has a bias (heads, head_dim): pruning
    # last-axis channel j zeroes bias[..., j] of every head.
    last = axis is not None and axis % kernel.ndim == kernel.ndim - 1
    if not (bias.shape == pruned.shape
            or (last and bias.ndim >= 1 and bias.shape[-1] == pruned.shape[0])):
      raise ValueError(f"bias shape {bias.shape} does not match the {pruned.shape[0]} "
                       "kernel channels")
    return jnp.where(pruned, jnp.zeros((), bias.dtype), bias)
  if fam.name in ("quantize", "prune", "bitflip"):
    opts["axis"] = None
  return fam.fn(bias, magnitude, key, grad=grad, **opts)


def perturb_params(params: Params, layers: str | Sequence[str], family: str | Family,
                   magnitude: ArrayLike, key: Array | None, *, grads: Params | None = None,
                   include_bias: bool = False, **options) -> dict:
  """Returns a copy of ``params`` with the kernels of ``layers`` perturbed.

  Layer ``layers[i]`` uses the key ``jax.random.fold_in(key, i)`` for its
  kernel (and ``fold_in`` of that key with 1 for its bias), so layers get
  independent draws and a kernel's draw does not depend on ``include_bias``.
  All other leaves are shared with ``params`` (bit-identical).

  With ``include_bias=True`` a layer's ``bias`` (if any) is perturbed by the
  same family at the same magnitude: per tensor for quantize/bitflip/prune
  (``axis=None``), except structured pruning, which zeroes the bias of the
  pruned kernel channels; noise is relative to std(bias) and corruption to
  ``||bias||_p`` (with the bias gradient from ``grads``).

  Args:
    params: Flax params pytree, or variables with a ``'params'`` collection.
    layers: a layer path (``'block1/conv2'``) or a sequence of them, see
      :mod:`safer_jax.core.layers`.
    family: a name in ``FAMILIES`` or a :class:`Family`.
    magnitude: the family's magnitude (may be traced).
    key: PRNG key (may be ``None`` for deterministic families).
    grads: gradient pytree with the structure of ``params``; required by
      families with ``needs_grad``.
    include_bias: also perturb biases.
    **options: forwarded to the family function (e.g. ``method='structured'``,
      ``representation='float32'``, ``p=math.inf``, ``symmetric=False``).

  Returns:
    The new params pytree (same structure).

  Raises:
    ValueError: unknown family, bad magnitude, missing key/grads, duplicate
      layers; KeyError: unknown layer (from :mod:`safer_jax.core.layers`).
  """
  fam = get_family(family)
  validate_magnitude(fam.name, magnitude)
  names = [layers] if isinstance(layers, str) else list(layers)
  if len(set(names)) != len(names):
    raise ValueError(f"layers holds duplicates: {names}")
  if fam.needs_grad and grads is None:
    raise ValueError(f"The {fam.name!r} family needs grads=... (a gradient pytree).")
  if fam.stochastic and key is None:
    raise ValueError(f"The {fam.name!r} family is stochastic and needs a PRNG key.")
  stochastic_options = fam.name == "prune" and options.get("method") == "random"
  if stochastic_options and key is None:
    raise ValueError("prune(method='random') needs a PRNG key.")

  out = params
  for i, name in enumerate(names):
    leaves = layers_lib.get_layer_params(params, name)
    if KERNEL not in leaves:
      raise KeyError(f"Layer {name!r} has no {KERNEL!r} leaf; it has {sorted(leaves)}")
    grad_leaves = layers_lib.get_layer_params(grads, name) if grads is not None else {}
    layer_key = jax.random.fold_in(key, i) if key is not None else None
    kernel = leaves[KERNEL]
    new = {KERNEL: fam.fn(kernel, magnitude, layer_key, grad=grad_leaves.get(KERNEL),
                          **options)}
    if include_bias and BIAS in leaves:
      if fam.needs_grad and BIAS not in grad_leaves:
        raise ValueError(f"grads has no bias gradient for layer {name!r}")
      bias_key = jax.random.fold_in(layer_key, 1) if layer_key is not None else None
      new[BIAS] = _perturb_bias(fam, kernel, leaves[BIAS], grad_leaves.get(BIAS), magnitude,
                                bias_key, options)
    out = layers_lib.replace_leaves(out, name, new)
  return out
