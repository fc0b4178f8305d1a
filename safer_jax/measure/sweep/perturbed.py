"""Perturbed copies of one kernel, stacked, compiled as little as possible.

:func:`perturb_stack` applies a perturbation family to every cell of one
(layer, family) at once; :func:`padded_layout` is the shared shape that lets
every layer reuse one compiled program per family; :func:`loss_gradients` is
what the ``'corrupt'`` family needs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from safer_jax.core import data as data_lib
from safer_jax.core import layers as layers_lib
from safer_jax.core import perturb
from safer_jax.core import staged
from safer_jax.core import tasks as tasks_lib
from safer_jax.core import wrapping

MAX_PADDED = 1 << 24  # elements of the shared padded layout (64 MiB in float32)
MAX_SHARED_DRAW = 1 << 18  # largest flat draw size shared by layers of a sweep
SHARED_DRAW_SPAN = 4  # kernels whose own bucket is within this factor of it share it
_DRAW_MULTIPLE = 1 << 12  # the shared draw size is a multiple of this


def shared_draw_size(variables: Mapping[str, Any], layers: Sequence[str]) -> int | None:
  """A flat draw size shared by the larger kernels of ``layers``, or None (each its own bucket).

  The largest kernel's size rounded up to a multiple of 4096 when that is at most
  :data:`MAX_SHARED_DRAW` elements (not its power-of-4 bucket: resnet8's largest
  kernel, 36,864 weights, draws 36,864 values per copy, not 65,536).
  :func:`perturb_stack` uses it for every kernel that fits in it and whose own
  bucket (:func:`safer_jax.core.perturb.flat_bucket`) is at least 1 / :data:`SHARED_DRAW_SPAN`
  of it: their random draws (bit-flip masks, noise) and magnitude pruning
  compile once instead of once per bucket, while small kernels keep their own
  (cheaper to draw) bucket. A flat draw's prefix is the per-shape draw, so the
  numbers do not change.
  """
  largest = max(int(np.prod(layers_lib.get_kernel(variables, n).shape)) for n in layers)
  size = -(-largest // _DRAW_MULTIPLE) * _DRAW_MULTIPLE
  return size if size <= MAX_SHARED_DRAW else None


def _draw_size(n: int, shared: int | None) -> int:
  """The flat draw size of an ``n``-weight kernel: ``shared`` where it applies, else its bucket."""
  own = perturb.flat_bucket(n)
  if shared is not None and n <= shared <= own * SHARED_DRAW_SPAN:
    return shared
  return own


def padded_layout(variables: Mapping[str, Any], layers: Sequence[str]) -> tuple[int, int]:
  """``(R, C)``: powers of two holding every kernel of ``layers`` as a (rows, channels) matrix.

  A kernel of shape ``(..., c)`` is the ``(n / c, c)`` matrix of its rows (all
  axes but the last, flattened) by output channels.
  """
  shapes = [layers_lib.get_kernel(variables, name).shape for name in layers]
  rows = max(int(np.prod(s[:-1])) for s in shapes)
  cols = max(int(s[-1]) for s in shapes)
  return 1 << max(rows - 1, 0).bit_length(), 1 << max(cols - 1, 0).bit_length()


def _padded_kind(family: str, options: Mapping[str, Any]) -> str | None:
  """How ``family`` runs on the padded layout: ``'matrix'``, ``'flat'``, or None (per shape)."""
  if (family in ("quantize", "bitflip") and options.get("axis", -1) in (-1, None)
      and options.get("group_size") is None):
    return "matrix"  # per output channel (or per tensor): zero padding changes no scale
  if family == "prune" and options.get("method", "magnitude") == "magnitude":
    return "flat"
  return None


def perturb_stack(family: str, options: Mapping[str, Any],
                  layout: tuple[int, int] | None = None, draw_size: int | None = None) -> Callable:
  """``(kernel, magnitudes [P floats], keys (P,), grad) -> kernels (P, *kernel.shape)`` (NumPy).

  The family's function on every cell, the same numbers as
  :func:`safer_jax.measure.sweep.naive_sweep`'s one call per cell (bit for bit;
  ``bench_sweep`` and tests/test_sweep.py check it), compiled as little as possible:

  * with ``layout`` (:func:`padded_layout`), quantization and bit flips run on
    the kernel zero padded into that matrix, so every layer shares one compiled
    program per family (padding with zeros changes no per-channel or per-tensor
    maximum or minimum), and magnitude pruning on the flat kernel padded to its
    size bucket (:func:`safer_jax.core.perturb.flat_bucket`; padding ranks last).
    Binary quantization (1 bit, whose scale is a mean) stays per shape.
  * families that draw their randomness apart (:func:`safer_jax.core.perturb.split_draws`:
    bit flips, noise) draw all ``P`` cells' rows in one call, compiled once per
    flat size bucket: the PRNG is what made per-shape programs slow to compile.
  * everything else: the family function per cell, compiled once per kernel shape.

  ``draw_size`` (:func:`shared_draw_size`): the flat size of draws and of padded
  pruning for every kernel that fits in it and whose own size bucket is within
  :data:`SHARED_DRAW_SPAN` of it (one compiled program for them); smaller kernels
  and None: each kernel's own size bucket.
  """
  fam = perturb.get_family(family)
  opts = dict(options)

  def stack(kernel, magnitudes, keys, grad):
    shape, n = kernel.shape, int(np.prod(kernel.shape))
    flat_size = _draw_size(n, draw_size)
    fits = layout is not None and n // shape[-1] <= layout[0] and shape[-1] <= layout[1]
    kind = _padded_kind(family, opts) if fits else None
    rows = None
    if perturb.split_draws(fam, opts):
      rows = np.asarray(fam.draw(keys, jnp.asarray(magnitudes, jnp.float32), flat_size,
                                 **opts))
    if kind is not None:
      r, c = n // shape[-1], shape[-1]
      host = np.asarray(kernel)
      padded = np.zeros(layout, host.dtype)
      padded[:r, :c] = host.reshape(r, c)
      if kind == "flat":  # (a sort: a size bucket per kernel, not the largest layout)
        flat = np.zeros(flat_size, host.dtype)
        flat[:n] = host.reshape(-1)

    out = [None] * len(magnitudes)
    if kind == "flat":
      pruned = np.asarray(perturb.prune_magnitude_padded(
          flat, np.asarray(magnitudes, np.float32), n))
      out = [row[:n].reshape(shape) for row in pruned]
    elif kind == "matrix":
      todo = [i for i, m in enumerate(magnitudes) if not (family == "quantize" and m == 1)]
      if family == "quantize" and todo:
        bits = np.asarray([magnitudes[i] for i in todo], np.float32)
        perturb.validate_magnitude("quantize", bits)
        done = np.asarray(perturb.quantize_many(padded, bits, **opts))
      elif todo:
        masks = np.zeros((len(todo), *layout), rows.dtype)
        masks[:, :r, :c] = rows[todo, :n].reshape(len(todo), r, c)
        done = np.asarray(perturb.bitflip_many(padded, masks, **opts))
      for j, i in enumerate(todo):
        out[i] = done[j, :r, :c].reshape(shape)
    for i, m in enumerate(magnitudes):  # the rest: the family function, per shape
      if out[i] is None:
        out[i] = np.asarray(fam.apply(kernel, m, rows[i], grad=grad, **opts) if rows is not None
                            else fam.fn(kernel, m, keys[i], grad=grad, **opts))
    return np.stack(out)

  return stack


def loss_gradients(model: Any, variables: Mapping[str, Any], split: data_lib.Split,
                   batch_size: int = 1024, task: tasks_lib.Task | None = None) -> dict:
  """Gradient of the task's mean loss on ``split`` w.r.t. ``variables['params']``.

  The mean is ``Σ w·loss / Σ w`` (:class:`safer_jax.core.tasks.Task`; classification:
  the mean cross-entropy).
  """
  model, variables = wrapping.as_model(model, variables)
  task = tasks_lib.get(task)
  apply = staged.apply_fn(model)

  @jax.jit
  def grad_sum(params, inputs, batch, mask):
    def f(p):
      outputs = tasks_lib.forward(apply, {**variables, "params": p}, inputs)
      return task.sums(outputs, batch, mask)[1]
    return jax.grad(f)(params)

  total, weight = None, 0.0
  for inputs, batch, mask in staged.eval_batches(split, batch_size, task):
    g = grad_sum(variables["params"], inputs, batch, mask)
    weight += float(np.sum(np.asarray(task.example_weights(batch, mask))))
    total = g if total is None else jax.tree.map(jnp.add, total, g)
  return jax.tree.map(lambda x: x / weight, total)
