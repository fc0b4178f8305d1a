"""p-norms and the geometry of an eps-ball corruption: one home for every caller.

A *norm order* ``p`` is one of :data:`ALLOWED_P` (``'1'``, ``'2'``, ``'inf'``);
:func:`normalize_p` maps what users write (``2``, ``float('inf')``, ``'l2'``,
``'linf'``, ...) to it and :func:`p_value` to the float. Norms are over a whole
array, flattened.

The corruption ball of a weight array is ``{a : ||a||_p <= eps_abs}``, with at
most ``n_sparse`` non-zero entries when ``n_sparse`` is given. Its geometry:

* :func:`steepest_ascent` — the first-order worst case ``argmax <g, a>`` in the
  ball (closed forms: ``eps g / ||g||_2``, ``eps sign(g)``, or all the budget
  on the largest ``|g|``);
* :func:`dual_norm` — its value per unit radius, ``||g||_q`` with
  ``1/p + 1/q = 1`` (over the ``n_sparse`` largest ``|g|``);
* :func:`project` — the Euclidean projection onto the ball;
* :func:`random_corruptions` — random points on the ball's surface (the
  random baseline of the same norm and sparsity).

Used by :mod:`safer_jax.core.perturb` (the ``corrupt`` family),
:mod:`safer_jax.criteria.corruption`, :mod:`safer_jax.training.acr` and the
``corruption`` experiment. This module imports no other ``safer_jax`` module.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ALLOWED_P = ("1", "2", "inf")


def normalize_p(p: Any) -> str:
  """Maps ``p`` to one of ``'1'``, ``'2'``, ``'inf'``; raises ``ValueError`` otherwise.

  Accepted: the numbers 1, 2 and ``inf`` (``math.inf``, ``np.inf``), and the
  strings ``'1'``/``'l1'``, ``'2'``/``'l2'``, ``'inf'``/``'infinity'``/``'linf'``/``'max'``
  (any case, surrounding spaces ignored).
  """
  if isinstance(p, str):
    key = p.strip().lower()
    if key in ("inf", "infinity", "linf", "max"):
      return "inf"
    if key in ("1", "l1"):
      return "1"
    if key in ("2", "l2"):
      return "2"
  elif isinstance(p, (int, float, np.integer, np.floating)) and not isinstance(p, bool):
    if math.isinf(p) and p > 0:
      return "inf"
    if p == 1:
      return "1"
    if p == 2:
      return "2"
  raise ValueError(f"Unsupported norm p={p!r}; allowed: 1, 2, inf (float('inf') or 'inf').")


def p_value(p: str) -> float:
  """The float of a normalised order: ``'1'`` -> 1.0, ``'2'`` -> 2.0, ``'inf'`` -> ``math.inf``."""
  return math.inf if p == "inf" else float(p)


def check_sparsity(n_sparse: Any, name: str = "n_sparse") -> Any:
  """Validates a sparsity (maximum number of non-zeros): ``None`` or an integer >= 1.

  A traced value is returned unchecked; a concrete one as a Python ``int``.

  Raises:
    ValueError: naming ``name`` and the bad value, e.g. ``n_sparse=0``.
  """
  if n_sparse is None or isinstance(n_sparse, jax.core.Tracer):
    return n_sparse
  if (isinstance(n_sparse, bool) or not isinstance(n_sparse, (int, float, np.integer, np.floating))
      or int(n_sparse) != n_sparse or n_sparse < 1):
    raise ValueError(f"{name}={n_sparse!r} is out of range; allowed: integers >= 1 (or None)")
  return int(n_sparse)


def sparsity_argument(n_sparse: Any, n: Any) -> tuple[Any, str]:
  """``(value, keyword)`` of a sparsity given as ``n_sparse=`` or by its old name ``n=``.

  Raises:
    ValueError: both keywords given with different values.
  """
  if n is None:
    return n_sparse, "n_sparse"
  if n_sparse is not None and n_sparse is not n and n_sparse != n:
    raise ValueError(f"n_sparse={n_sparse!r} and its old name n={n!r} disagree; pass n_sparse only.")
  return n, "n"


@functools.partial(jax.jit, static_argnames="p")
def vector_norm(x: jax.Array, p: str) -> jax.Array:
  """The p-norm of ``x`` flattened; ``p`` in {'1', '2', 'inf'} (see :func:`normalize_p`)."""
  x = jnp.ravel(x)
  if p == "1":
    return jnp.sum(jnp.abs(x))
  if p == "2":
    return jnp.sqrt(jnp.sum(jnp.square(x)))
  return jnp.max(jnp.abs(x))


def safe_norm(x: jax.Array, p: str) -> jax.Array:
  """The p-norm of ``x`` flattened, in float32, without under/overflow.

  Like :func:`vector_norm`, but the 2-norm is computed on ``x / max|x|`` and
  scaled back, so tiny or huge entries do not under/overflow when squared; an
  empty or all-zero ``x`` gives 0. Traceable (``p`` must be a Python value).
  """
  a = jnp.abs(x.astype(jnp.float32))
  if p == "1":
    return jnp.sum(a)
  if p == "inf":
    return jnp.max(a, initial=0.0)
  amax = jnp.max(a, initial=0.0)  # Rescaled so tiny or huge values do not under/overflow.
  safe = jnp.where(amax > 0, amax, 1.0)
  return amax * jnp.sqrt(jnp.sum((a / safe) ** 2))


def stable_rank(x: jax.Array) -> jax.Array:
  """Rank of each entry of the 1-D ``x`` in ascending order; ties: lower index first.

  Returns:
    ``(x.size,)`` int32, a permutation of ``0 .. x.size - 1``.
  """
  order = jnp.argsort(x, stable=True)
  return jnp.zeros(x.shape, jnp.int32).at[order].set(jnp.arange(x.size, dtype=jnp.int32))


@functools.partial(jax.jit, static_argnames=("p",))
def _steepest_ascent(grad: jax.Array, eps_abs: Any, p: str, n_sparse: Any) -> jax.Array:
  g = grad.astype(jnp.float32).reshape(-1)
  if n_sparse is not None:
    keep = stable_rank(-jnp.abs(g)) < n_sparse  # The n largest |g|; ties: lower index.
    g = jnp.where(keep, g, 0.0)
  eps = jnp.asarray(eps_abs, jnp.float32)
  if p == "2":
    amax = jnp.max(jnp.abs(g), initial=0.0)
    gs = g / jnp.where(amax > 0, amax, 1.0)
    norm = jnp.sqrt(jnp.sum(gs * gs))
    a = eps * gs / jnp.where(norm > 0, norm, 1.0)
  elif p == "inf":
    a = eps * jnp.sign(g)
  else:  # p == 1: all the budget on the largest |g| (first one on ties).
    j = jnp.argmax(jnp.abs(g))
    a = jnp.zeros_like(g).at[j].set(eps * jnp.sign(g[j]))
  return a.reshape(grad.shape).astype(grad.dtype)


def steepest_ascent(grad: jax.Array, eps_abs: Any, p: Any, n_sparse: Any = None) -> jax.Array:
  """First-order worst case ``argmax <grad, a>`` s.t. ``||a||_p <= eps_abs``, ``||a||_0 <= n_sparse``.

  Closed forms (Zhang et al., 2021): ``p = 2``: ``eps * g / ||g||_2``;
  ``p = inf``: ``eps * sign(g)``; ``p = 1``: ``eps * sign(g_j)`` on the single
  entry ``j`` with the largest ``|g_j|`` (first on ties), zero elsewhere. With
  ``n_sparse`` only the ``n_sparse`` largest ``|g|`` (ties: lower flat index)
  are kept first. A zero gradient gives a zero direction (never NaN). No input
  checks (see :func:`safer_jax.core.perturb.corruption_direction` for the checked
  public form); jitted, traceable in ``grad``, ``eps_abs`` and ``n_sparse``.

  Args:
    grad: float array, any shape.
    eps_abs: absolute budget ``||a||_p`` in the units of ``grad``'s weights.
    p: a norm order (see :func:`normalize_p`).
    n_sparse: ``None`` (dense) or the maximum number of non-zeros.

  Returns:
    ``a``, same shape and dtype as ``grad``.
  """
  return _steepest_ascent(grad, eps_abs, normalize_p(p), n_sparse)


@functools.partial(jax.jit, static_argnames=("p", "n_sparse"))
def _dual_norm(g: jax.Array, p: str, n_sparse: int | None) -> jax.Array:
  a = jnp.abs(jnp.ravel(g))
  if n_sparse is not None and n_sparse < a.size:
    a = jax.lax.top_k(a, n_sparse)[0]
  if p == "1":
    return jnp.max(a)
  if p == "2":
    return jnp.sqrt(jnp.sum(jnp.square(a)))
  return jnp.sum(a)


def dual_norm(g: jax.Array, p: Any, n_sparse: int | None = None, *,
              n: int | None = None) -> jax.Array:
  """``max_{||a||_p <= 1, ||a||_0 <= n_sparse} <g, a>``: the q-norm of the n_sparse largest |g|.

  ``1/p + 1/q = 1``: p=1 -> max |g|, p=2 -> ||g||_2, p=inf -> sum |g|. With
  ``n_sparse`` only the n_sparse largest entries of |g| count (no effect for
  p=1). Jitted; ``p`` and ``n_sparse`` are static. ``n`` is the old name of
  ``n_sparse``.

  Returns:
    A float scalar (units of ``g``).
  """
  n_sparse, _ = sparsity_argument(n_sparse, n)
  return _dual_norm(g, normalize_p(p), n_sparse)


@functools.partial(jax.jit, static_argnames=("p", "n_sparse"))
def _project(a: jax.Array, eps_abs: Any, p: str, n_sparse: int | None) -> jax.Array:
  if n_sparse is not None and n_sparse < a.size:
    flat = jnp.ravel(a)
    idx = jax.lax.top_k(jnp.abs(flat), n_sparse)[1]
    flat = jnp.zeros_like(flat).at[idx].set(flat[idx])
    a = jnp.reshape(flat, a.shape)
  if p == "inf":
    return jnp.clip(a, -eps_abs, eps_abs)
  if p == "2":
    norm = jnp.linalg.norm(jnp.ravel(a))
    return a * jnp.minimum(1.0, eps_abs / jnp.maximum(norm, 1e-30))
  flat = jnp.ravel(a)
  u = jnp.abs(flat)
  srt = jnp.sort(u)[::-1]
  css = jnp.cumsum(srt)
  ks = jnp.arange(1, u.size + 1, dtype=u.dtype)
  rho = jnp.max(jnp.where(srt - (css - eps_abs) / ks > 0, jnp.arange(u.size), 0))
  theta = jnp.maximum((css[rho] - eps_abs) / (rho + 1), 0.0)
  proj = jnp.sign(flat) * jnp.maximum(u - theta, 0.0)
  proj = jnp.where(jnp.sum(u) <= eps_abs, flat, proj)
  return jnp.reshape(proj, a.shape)


def project(a: jax.Array, eps_abs: Any, p: Any, n_sparse: int | None = None, *,
            n: int | None = None) -> jax.Array:
  """Euclidean projection of ``a`` onto ``{||a||_p <= eps_abs, ||a||_0 <= n_sparse}``.

  p=2: rescale onto the sphere if outside; p=inf: clip to [-eps_abs, eps_abs];
  p=1: the sort-based simplex projection (Duchi et al. 2008). With
  ``n_sparse``, the n_sparse largest |a| are kept first (hard thresholding),
  which makes the projection exact for the L2 and L-inf balls (and for L1,
  Kyrillidis et al. 2013). Exact up to float rounding (the result's norm may
  exceed ``eps_abs`` by a few ulps). Jitted; ``p`` and ``n_sparse`` are
  static. ``n`` is the old name of ``n_sparse``.

  Returns:
    The projection, same shape and dtype as ``a``.
  """
  n_sparse, _ = sparsity_argument(n_sparse, n)
  return _project(a, eps_abs, normalize_p(p), n_sparse)


@functools.partial(jax.jit, static_argnames=("shape", "p", "n_sparse", "num"))
def _random_corruptions(key, eps_abs, *, shape, p, n_sparse, num):
  def one(k):
    k1, k2 = jax.random.split(k)
    z = jax.random.normal(k1, (int(np.prod(shape)),), jnp.float32)
    if n_sparse is not None and n_sparse < z.size:
      keep = jax.random.permutation(k2, z.size) < n_sparse
      z = jnp.where(keep, z, 0.0)
    if p == "inf":
      a = eps_abs * jnp.sign(z)
    else:
      a = eps_abs * z / jnp.linalg.norm(z)
    return a.reshape(shape)

  return jax.vmap(one)(jax.random.split(key, num))


def random_corruptions(key: jax.Array, eps_abs: jax.Array, *, shape: tuple[int, ...], p: Any,
                       n_sparse: int | None = None, num: int,
                       n: int | None = None) -> jax.Array:
  """``num`` random corruptions with ``||a||_p = eps_abs`` and (if ``n_sparse``) n_sparse non-zeros.

  Args:
    key: a ``jax.random`` key.
    eps_abs: the radius (weight units; may be traced).
    shape: the shape of one corruption (the kernel's).
    p: ``2`` or ``inf`` (see :func:`normalize_p`; ``1`` draws as ``2``).
    n_sparse: ``None`` (dense) or the number of non-zeros (``n``: its old name).
    num: how many.

  Returns:
    ``(num, *shape)`` float32: Gaussian directions rescaled to the 2-norm for
    ``p='2'``, ``eps_abs * random signs`` for ``p='inf'``; with ``n_sparse`` the
    support is ``n_sparse`` uniformly random positions.
  """
  n_sparse, _ = sparsity_argument(n_sparse, n)
  return _random_corruptions(key, eps_abs, shape=tuple(shape), p=normalize_p(p),
                             n_sparse=n_sparse, num=num)
