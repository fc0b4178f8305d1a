"""Data-free criteria: statistics of each layer's kernel alone.

They need no loss and no data (``loss_fn`` and ``batches`` are ignored and may
be ``None``). COST: no forward or backward pass; one reduction (or one SVD for
``spectral_norm``) per layer.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from safer_jax.core import layers as layers_lib
from safer_jax.core import norms
from safer_jax.core.perturb import quantize
from safer_jax.criteria import _common

def param_count(loss_fn: Any, params: _common.Params, batches: Any = None, *,
                layers: Any = None, key: jax.Array | None = None) -> _common.Scores:
  """Number of scalar weights in each layer's kernel (bias excluded).

  Estimates nothing: a size baseline (big layers are often assumed important).

  Args:
    loss_fn: ignored (may be ``None``).
    params: Flax params pytree (or ``variables`` with a ``'params'`` entry).
    batches: ignored (may be ``None``).
    layers: ``None`` (all layers) or regex pattern(s) fully matching layer paths.
    key: ignored.

  Returns:
    ``{layer: float(kernel.size)}``. COST: none (shapes only).

  Raises:
    ValueError: a pattern matches no layer, or a kernel is not finite.
  """
  del loss_fn, batches, key
  names = _common.setup_data_free(params, layers)
  return {n: float(layers_lib.get_kernel(params, n).size) for n in names}


def weight_norm(loss_fn: Any, params: _common.Params, batches: Any = None, *,
                layers: Any = None, key: jax.Array | None = None, ord: str = "l2",
                per_param: bool = False) -> _common.Scores:
  """Norm of each layer's kernel (flattened).

  Args:
    loss_fn, params, batches, layers, key: the criterion signature (:mod:`safer_jax.criteria`);
      data-free: ``loss_fn``, ``batches`` and ``key`` are ignored (may be None).
    ord: ``'l1'`` (sum |w|), ``'l2'`` (sqrt of sum w^2) or ``'linf'`` (max |w|);
      any spelling of :func:`safer_jax.core.norms.normalize_p` (``1``, ``2``, ``inf``) works.
    per_param: normalise by the kernel size n: ``'l1'`` -> mean |w|,
      ``'l2'`` -> root mean square ||W||_2 / sqrt(n), ``'linf'`` unchanged.

  Returns:
    ``{layer: norm}`` in the units of the weights. COST: one reduction per layer.

  Raises:
    ValueError: unknown ``ord``, a pattern matching no layer, non-finite kernel.
  """
  del loss_fn, batches, key
  try:
    p = norms.normalize_p(ord)
  except ValueError:
    raise ValueError(f"Unsupported ord={ord!r}; allowed: 'l1', 'l2', 'linf' "
                     f"(or any p of safer_jax.core.norms.normalize_p).") from None
  names = _common.setup_data_free(params, layers)
  out = {}
  for n in names:
    w = layers_lib.get_kernel(params, n)
    value = norms.vector_norm(w, p)
    if per_param and p == "1":
      value = value / w.size
    elif per_param and p == "2":
      value = value / jnp.sqrt(float(w.size))
    out[n] = _common.to_float(value)
  return out


def quant_error(loss_fn: Any, params: _common.Params, batches: Any = None, *,
                layers: Any = None, key: jax.Array | None = None, bits: int = 4) -> _common.Scores:
  """Squared quantization error ||Q_b(W) - W||_2^2 of each layer's kernel.

  ``Q_b`` is ``safer_jax.core.perturb.quantize`` (symmetric, per output channel).
  This is the weight-space distortion that HAWQ-v2 multiplies by the mean
  Hessian eigenvalue.

  Args:
    loss_fn, params, batches, layers, key: the criterion signature (:mod:`safer_jax.criteria`);
      data-free: ``loss_fn``, ``batches`` and ``key`` are ignored (may be None).
    bits: bit width, an integer in [1, 16].

  Returns:
    ``{layer: sum of squared errors}`` (units: weight^2). COST: one
    quantization per layer.

  Raises:
    ValueError: bad ``bits``, a pattern matching no layer, non-finite kernel.
  """
  del loss_fn, batches, key
  bits = _common.check_bits(bits)
  names = _common.setup_data_free(params, layers)
  errors = quant_sq_errors(layers_lib.get_kernels(params, names), bits)
  return {n: _common.to_float(errors[n]) for n in names}


def quant_sq_error(w: jax.Array, bits: int) -> jax.Array:
  """``||Q_b(w) - w||_2^2``: the squared error of :func:`safer_jax.core.perturb.quantize` at
  ``bits``.

  Args:
    w: float kernel, any shape (per output channel = last axis).
    bits: bit width, an integer in [1, 16] (not checked here).

  Returns:
    A float32 scalar (units: weight^2).
  """
  return jnp.sum(jnp.square(quantize(w, bits) - w))


@functools.partial(jax.jit, static_argnums=1)
def quant_sq_errors(kernels: dict[str, jax.Array], bits: int) -> dict[str, jax.Array]:
  """:func:`quant_sq_error` of every kernel of ``{layer: kernel}``, in one compiled program.

  (Eagerly, each kernel shape compiled its own quantize, subtract, square and sum: on a
  first run of hawq_v2 on the zoo mobilenet_v2, about as long as the Hessian program.)
  """
  return {n: quant_sq_error(w, bits) for n, w in kernels.items()}


def spectral_norm(loss_fn: Any, params: _common.Params, batches: Any = None, *,
                  layers: Any = None, key: jax.Array | None = None) -> _common.Scores:
  """Largest singular value of each kernel reshaped to ``(-1, out_channels)``.

  For a Dense kernel ``(in, out)`` this is the operator 2-norm (Lipschitz
  constant) of the layer; for a Conv kernel ``(kh, kw, in, out)`` it is the norm
  of the unfolded ``(kh*kw*in, out)`` matrix (not the norm of the convolution
  operator).

  Args:
    loss_fn, params, batches, layers, key: the criterion signature (:mod:`safer_jax.criteria`);
      data-free: ``loss_fn``, ``batches`` and ``key`` are ignored (may be None).

  Returns:
    ``{layer: sigma_max}``. COST: one SVD (singular values only) per layer.

  Raises:
    ValueError: a pattern matching no layer, non-finite kernel.
  """
  del loss_fn, batches, key
  names = _common.setup_data_free(params, layers)
  out = {}
  for n in names:
    w = layers_lib.get_kernel(params, n)
    mat = jnp.reshape(w, (-1, w.shape[-1]))
    out[n] = _common.to_float(jnp.linalg.svd(mat, compute_uv=False)[0])
  return out


def random(loss_fn: Any, params: _common.Params, batches: Any = None, *,
           layers: Any = None, key: jax.Array | None = None) -> _common.Scores:
  """Random baseline: i.i.d. Uniform[0, 1) score per layer.

  Estimates nothing; the rank agreement of any useful criterion should beat it.

  Args:
    loss_fn: ignored (may be ``None``).
    params: Flax params pytree.
    batches: ignored (may be ``None``).
    layers: ``None`` or regex pattern(s).
    key: a ``jax.random`` key (required).

  Returns:
    ``{layer: u}`` with u ~ U[0, 1). COST: none.

  Raises:
    ValueError: ``key`` is None, a pattern matches no layer, or a kernel is
      not finite (for consistency with the other criteria).
  """
  del loss_fn, batches
  if key is None:
    raise ValueError("The 'random' criterion needs a `key` (e.g. jax.random.key(0)).")
  names = _common.setup_data_free(params, layers)
  u = jax.device_get(jax.random.uniform(key, (len(names),)))
  return {n: float(v) for n, v in zip(names, u)}
