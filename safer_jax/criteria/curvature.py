"""Second-order criteria on each layer's Hessian block.

For a layer with kernel ``W`` (n weights) the block is ``H = d^2 L / dW^2``
(n x n), all other parameters held fixed, ``L`` the loss averaged over the
given batches. ``H`` is never formed: the criteria use Hessian-vector products
(HVPs) computed forward-over-reverse, ``jax.jvp(jax.grad(f), (W,), (v,))``.
One HVP costs about one forward + one backward pass and its forward-mode
derivative, i.e. ~2-3x a gradient, per batch.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from safer_jax import layers as layers_lib
from safer_jax.criteria import _common
from safer_jax.criteria.data_free import _quant_sq_error


class TraceEstimate(NamedTuple):
  """Hutchinson estimate of a layer's Hessian trace.

  Attributes:
    mean: the estimate of tr(H) (units: loss / weight^2).
    stderr: standard error of ``mean`` (sample std of the probes / sqrt(count)).
    num_probes: number of Rademacher probes used.
  """
  mean: float
  stderr: float
  num_probes: int


def _hvp_fn(loss_fn, name):
  """``(params, kernel, v, batch) -> H v`` for one layer's block (forward-over-reverse)."""
  f = _common.layer_loss(loss_fn, name)

  def hvp(params, kernel, v, batch):
    g = lambda k: jax.grad(f, argnums=1)(params, k, batch)
    return jax.jvp(g, (kernel,), (v,))[1]

  return hvp


def _flat_hvp_acc_fn(loss_fn, name):
  """``(params, kernel, v_flat, batch, acc, w) -> acc + w * ravel(H v)``."""
  hvp = _hvp_fn(loss_fn, name)

  def acc_hvp(params, kernel, flat, batch, acc, weight):
    hv = hvp(params, kernel, jnp.reshape(flat, kernel.shape), batch)
    return acc + weight * jnp.ravel(hv)

  return acc_hvp


@functools.partial(jax.jit, static_argnums=(1, 2))
def _start_vector(key, n, dtype):
  return jax.random.normal(key, (n,), dtype)


def _quad_fn(loss_fn, name):
  """``(params, kernel, vs, batch) -> [v^T H v for v in vs]``, vmapped over probes."""
  hvp = _hvp_fn(loss_fn, name)

  def quad(params, kernel, vs, batch):
    return jax.vmap(lambda v: jnp.vdot(v, hvp(params, kernel, v, batch)))(vs)

  return quad


@_common.accepts_nnx_state
def hutchinson_trace(loss_fn: _common.LossFn, params: _common.Params, batches: Any, *,
                     layers: Any = None, key: jax.Array | None = None,
                     rel_tol: float = 1e-2, max_probes: int = 1024,
                     chunk_size: int = 16) -> dict[str, TraceEstimate]:
  """Hutchinson estimate of the trace of each layer's Hessian block.

  tr(H) = E_v[v^T H v] with Rademacher probes v (entries +-1). Probes are drawn
  ``chunk_size`` at a time and their HVPs vectorised with ``jax.vmap``; every
  probe sees every batch, so the only noise is the probes'. Sampling stops once
  ``stderr <= rel_tol * |mean|`` (checked after each chunk) or when
  ``max_probes`` is reached.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` mean loss over the batch.
    params: Flax params pytree (or ``variables``).
    batches: sequence of batches (pytrees with a leading batch axis).
    layers: ``None`` (all layers) or regex pattern(s).
    key: ``jax.random`` key for the probes (``None``: ``jax.random.key(0)``);
      layer i uses ``fold_in(key, i)``.
    rel_tol: target relative standard error.
    max_probes: upper bound on the number of probes per layer.
    chunk_size: probes vectorised together (memory ~ chunk_size x one HVP).

  Returns:
    ``{layer: TraceEstimate(mean, stderr, num_probes)}``. COST per layer:
    ``num_probes`` HVPs per batch (a multiple of ``chunk_size``, at most
    ``max_probes`` rounded up to it).

  Raises:
    ValueError: non-finite parameters, a pattern matching no layer, no data,
      or a bad option.
  """
  names, batches = _common.setup(loss_fn, params, batches, layers)
  rel_tol = _common.check_nonneg_float("rel_tol", rel_tol)
  max_probes = _common.check_positive_int("max_probes", max_probes)
  chunk_size = _common.check_positive_int("chunk_size", chunk_size)
  key = jax.random.key(0) if key is None else key
  out = {}
  for index, name in enumerate(names):
    quad = _common.cached_jit(_quad_fn, loss_fn, name)
    kernel = layers_lib.get_kernel(params, name)
    layer_key = jax.random.fold_in(key, index)
    samples: list[np.ndarray] = []
    chunk = 0
    while True:
      vs = jax.random.rademacher(jax.random.fold_in(layer_key, chunk),
                                 (chunk_size,) + kernel.shape, dtype=kernel.dtype)
      q = sum(quad(params, kernel, vs, b) for b in batches) / len(batches)
      samples.append(np.asarray(jax.device_get(q), dtype=np.float64))
      chunk += 1
      x = np.concatenate(samples)
      mean = float(np.mean(x))
      stderr = float(np.std(x, ddof=1) / math.sqrt(x.size)) if x.size > 1 else math.inf
      if stderr <= rel_tol * abs(mean) or x.size >= max_probes:
        break
    out[name] = TraceEstimate(mean, stderr, int(x.size))
  return out


@_common.accepts_nnx_state
def hessian_trace(loss_fn: _common.LossFn, params: _common.Params, batches: Any, *,
                  layers: Any = None, key: jax.Array | None = None,
                  rel_tol: float = 1e-2, max_probes: int = 1024,
                  chunk_size: int = 16) -> _common.Scores:
  """Trace of each layer's Hessian block (Hutchinson), i.e. the sum of its eigenvalues.

  See ``hutchinson_trace`` for the estimator and its stopping rule; this
  returns only the means.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` mean loss over the batch.
    params: Flax params pytree.
    batches: sequence of batches.
    layers: ``None`` or regex pattern(s).
    key: probe key (``None``: ``jax.random.key(0)``).
    rel_tol: target relative standard error.
    max_probes: upper bound on the number of probes per layer.
    chunk_size: probes vectorised together.

  Returns:
    ``{layer: tr(H)}`` (units: loss / weight^2). COST per layer: up to
    ``max_probes`` HVPs per batch.

  Raises:
    ValueError: non-finite parameters, a pattern matching no layer, no data,
      or a bad option.
  """
  est = hutchinson_trace(loss_fn, params, batches, layers=layers, key=key, rel_tol=rel_tol,
                         max_probes=max_probes, chunk_size=chunk_size)
  return {n: e.mean for n, e in est.items()}


@jax.jit
def _lanczos_step(basis, j, v, v_prev, beta, w):
  """One Lanczos step given ``w = H v``; ``basis`` (m, n) holds v_0..v_j, zeros after.

  Fixed shapes, so it compiles once per layer size.
  """
  alpha = jnp.vdot(w, v)
  w = w - alpha * v - beta * v_prev
  for _ in range(2):  # Full reorthogonalisation; twice is enough.
    w = w - basis.T @ (basis @ w)
  beta_next = jnp.linalg.norm(w)
  v_next = w / jnp.where(beta_next > 0, beta_next, 1.0)
  basis = jax.lax.dynamic_update_index_in_dim(basis, v_next, j + 1, axis=0)
  return alpha, beta_next, v_next, basis


@functools.partial(jax.jit, static_argnums=1)
def _lanczos_init(v0, m):
  v = v0 / jnp.linalg.norm(v0)
  basis = jnp.zeros((m + 1, v.size), v.dtype).at[0].set(v)
  return v, jnp.zeros_like(v), jnp.zeros((), v.dtype), basis


def _lanczos_top(matvec, n: int, v0: jax.Array, max_iter: int, tol: float) -> float:
  """Largest eigenvalue by Lanczos with full reorthogonalisation.

  Stops when the residual bound ``beta_j * |s_j|`` of the top Ritz pair is
  ``<= tol * |theta|`` (then an eigenvalue lies within ``tol * |theta|`` of
  ``theta``), when the Krylov space is invariant, or after ``min(max_iter, n)``
  steps (with n steps the result is exact up to rounding). Memory: a
  ``(min(max_iter, n) + 1, n)`` basis.
  """
  m = min(max_iter, n)
  v, v_prev, beta, basis = _lanczos_init(v0, m)
  alphas: list[float] = []
  betas: list[float] = []
  theta = 0.0
  for j in range(m):
    alpha, beta_next, v_next, basis = _lanczos_step(basis, j, v, v_prev, beta, matvec(v))
    alpha, beta_f = float(alpha), float(beta_next)
    alphas.append(alpha)
    if j == 0:
      evals, evecs = np.array([alpha]), np.ones((1, 1))
    else:
      evals, evecs = scipy.linalg.eigh_tridiagonal(np.array(alphas), np.array(betas))
    top = int(np.argmax(evals))
    theta = float(evals[top])
    residual = beta_f * abs(float(evecs[-1, top]))
    if residual <= tol * abs(theta) or beta_f <= 1e-7 * max(abs(theta), 1e-30):
      break
    betas.append(beta_f)
    v_prev, v, beta = v, v_next, beta_next
  return theta


def _power_top(matvec, v0: jax.Array, max_iter: int, tol: float) -> float:
  """Eigenvalue of largest magnitude by power iteration (Rayleigh quotient).

  Stops when two successive Rayleigh quotients differ by ``<= tol * |lambda|``.
  """
  v = v0 / jnp.linalg.norm(v0)
  lam = None
  for _ in range(max_iter):
    w = matvec(v)
    new = float(jnp.vdot(v, w))
    norm = jnp.linalg.norm(w)
    if float(norm) == 0.0:
      return 0.0
    v = w / norm
    if lam is not None and abs(new - lam) <= tol * abs(new):
      return new
    lam = new
  return lam


@_common.accepts_nnx_state
def top_eigenvalue(loss_fn: _common.LossFn, params: _common.Params, batches: Any, *,
                   layers: Any = None, key: jax.Array | None = None,
                   method: str = "lanczos", max_iter: int = 100,
                   tol: float = 1e-3) -> _common.Scores:
  """Top eigenvalue of each layer's Hessian block (local sharpness along that layer).

  ``method='lanczos'`` (default): the largest *algebraic* eigenvalue, by
  Lanczos with full reorthogonalisation; stops when the Ritz residual bound is
  ``<= tol * |lambda|`` (so an eigenvalue of H lies within that distance), or
  after ``min(max_iter, n)`` steps (exact up to rounding when n <= max_iter).
  ``method='power'``: power iteration, which returns the eigenvalue of largest
  *magnitude* (signed; equal to the largest one when H is PSD, e.g. the last
  layer under cross-entropy); stops when successive Rayleigh quotients differ by
  ``<= tol * |lambda|``; converges slowly when the top two eigenvalues are close.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` mean loss over the batch.
    params: Flax params pytree.
    batches: sequence of batches.
    layers: ``None`` or regex pattern(s).
    key: ``jax.random`` key for the start vector (``None``: ``key(0)``).
    method: ``'lanczos'`` or ``'power'``.
    max_iter: maximum number of HVPs per layer.
    tol: relative tolerance (see above).

  Returns:
    ``{layer: lambda}`` (units: loss / weight^2). COST per layer: one HVP per
    batch per iteration, at most ``max_iter`` iterations.

  Raises:
    ValueError: bad ``method``, non-finite parameters, a pattern matching no
      layer, no data.
  """
  if method not in ("lanczos", "power"):
    raise ValueError(f"Unsupported method={method!r}; allowed: ['lanczos', 'power'].")
  names, batches = _common.setup(loss_fn, params, batches, layers)
  max_iter = _common.check_positive_int("max_iter", max_iter)
  tol = _common.check_nonneg_float("tol", tol)
  key = jax.random.key(0) if key is None else key
  out = {}
  for index, name in enumerate(names):
    kernel = layers_lib.get_kernel(params, name)
    acc_hvp = _common.cached_jit(_flat_hvp_acc_fn, loss_fn, name)

    def matvec(flat, kernel=kernel, acc_hvp=acc_hvp):
      acc = jnp.zeros_like(flat)
      for b in batches:
        acc = acc_hvp(params, kernel, flat, b, acc, 1.0 / len(batches))
      return acc

    v0 = _start_vector(jax.random.fold_in(key, index), kernel.size, kernel.dtype)
    if method == "lanczos":
      out[name] = _lanczos_top(matvec, kernel.size, v0, max_iter, tol)
    else:
      out[name] = _power_top(matvec, v0, max_iter, tol)
  return out


@_common.accepts_nnx_state
def hawq_v2(loss_fn: _common.LossFn, params: _common.Params, batches: Any, *,
            layers: Any = None, key: jax.Array | None = None, bits: int = 4,
            rel_tol: float = 1e-2, max_probes: int = 1024, chunk_size: int = 16) -> _common.Scores:
  """HAWQ-v2 sensitivity: mean Hessian eigenvalue times squared quantization error.

  score = tr(H) / n * ||Q_b(W) - W||_2^2 (Dong et al. 2020), the second-order
  loss increase of quantizing the layer to ``bits`` bits when the error is
  spread isotropically. ``Q_b`` is ``safer_jax.perturb.quantize``; tr(H) is
  the Hutchinson estimate (see ``hutchinson_trace``).

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` mean loss over the batch.
    params: Flax params pytree.
    batches: sequence of batches.
    layers: ``None`` or regex pattern(s).
    key: probe key (``None``: ``key(0)``).
    bits: bit width, an integer in [1, 16].
    rel_tol, max_probes, chunk_size: Hutchinson options.

  Returns:
    ``{layer: score}`` (units: loss). COST per layer: up to ``max_probes``
    HVPs per batch, plus one quantization.

  Raises:
    ValueError: bad ``bits``, non-finite parameters, a pattern matching no
      layer, no data.
  """
  bits = _common.check_bits(bits)
  est = hutchinson_trace(loss_fn, params, batches, layers=layers, key=key, rel_tol=rel_tol,
                         max_probes=max_probes, chunk_size=chunk_size)
  out = {}
  for name, e in est.items():
    w = layers_lib.get_kernel(params, name)
    out[name] = e.mean / w.size * _common.to_float(_quant_sq_error(w, bits))
  return out
