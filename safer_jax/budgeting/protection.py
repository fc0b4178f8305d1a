"""Protecting layers against random bit flips under a parameter budget.

A protection rule scores the layers; :func:`select_protected` builds the
protected set greedily under a budget (a fraction of all kernel weights).
:func:`inject` flips random bits (:func:`safer_jax.core.perturb.bitflip`) in every
*unprotected* kernel, while a protected kernel keeps its fault-free stored
representation bit for bit (:func:`reference_kernels`: for ``'int8'`` the
per-channel int8 model, i.e. ``bitflip`` at rate 0; for ``'float32'`` the
original weights). :func:`make_evaluator` measures accuracy and loss over many
fault patterns at once, vectorised over PRNG keys with ``jax.vmap``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from safer_jax.core import layers
from safer_jax.core import perturb
from safer_jax.training import train


def select_protected(scores: Mapping[str, float], sizes: Mapping[str, int],
                     fraction: float) -> list[str]:
  """Greedy: layers in descending score (ties: key order of ``sizes``), each kept if it fits.

  The capacity is ``fraction * sum(sizes)`` weights; NaN scores rank last.
  Returns the protected layers in the key order of ``sizes``.
  """
  if not 0 <= fraction <= 1:
    raise ValueError(f"budget fraction {fraction} must be in [0, 1].")
  names = list(sizes)
  cap = fraction * sum(int(sizes[n]) for n in names)
  key = {n: (-np.inf if np.isnan(float(scores[n])) else float(scores[n])) for n in names}
  order = sorted(names, key=lambda n: -key[n])  # sorted() is stable: ties keep layer order
  chosen, used = set(), 0
  for n in order:
    if used + int(sizes[n]) <= cap:
      chosen.add(n)
      used += int(sizes[n])
  return [n for n in names if n in chosen]


def reference_kernels(variables, names: Sequence[str], representation: str) -> list[jax.Array]:
  """The fault-free stored kernels: ``bitflip`` at rate 0 (int8: quantized; float32: unchanged)."""
  return [perturb.bitflip(jnp.asarray(layers.get_kernel(variables, n)), 0.0, jax.random.key(0),
                          representation=representation) for n in names]


def inject(variables, names: Sequence[str], protect: jax.Array, rate, key: jax.Array, *,
           representation: str = "int8", references: Sequence[jax.Array] | None = None):
  """Variables with bit flips in the kernels whose ``protect`` entry is False.

  Layer ``i`` uses the key ``fold_in(key, i)``; a protected layer gets its
  reference kernel (fault-free representation), selected with ``jnp.where`` so
  its bits are exactly the reference's. Traceable in ``key``, ``rate`` and
  ``protect`` (bool ``(len(names),)``).
  """
  if references is None:
    references = reference_kernels(variables, names, representation)
  out = dict(variables)
  for i, (name, ref) in enumerate(zip(names, references)):
    w = jnp.asarray(layers.get_kernel(variables, name))
    flipped = perturb.bitflip(w, rate, jax.random.fold_in(key, i), representation=representation)
    out = layers.replace_kernel(out, name, jnp.where(protect[i], ref, flipped))
  return out


def make_evaluator(model, variables, names: Sequence[str], split, representation: str,
                   chunk: int):
  """``evaluate(keys (S,), rate, protect (L,)) -> (accuracy (S,), loss (S,))`` on ``split``."""
  apply = model.apply if hasattr(model, "apply") else model
  images, labels = jnp.asarray(split.images), jnp.asarray(split.labels)

  @jax.jit
  def chunk_metrics(keys, rate, protect):
    refs = reference_kernels(variables, names, representation)  # traced: one compilation

    def one(key):
      v = inject(variables, names, protect, rate, key, representation=representation,
                 references=refs)
      logits = apply(v, images)
      return (jnp.mean(jnp.argmax(logits, -1) == labels),
              jnp.mean(train.cross_entropy(logits, labels)))
    return jax.vmap(one)(keys)

  def evaluate(keys, rate, protect):
    n = keys.shape[0]
    accs, losses = [], []
    for lo in range(0, n, chunk):
      idx = np.arange(lo, lo + chunk).clip(max=n - 1)  # pad with the last key: one compile
      a, l = chunk_metrics(keys[idx], jnp.float32(rate), jnp.asarray(protect, bool))
      valid = min(chunk, n - lo)
      accs.append(np.asarray(a)[:valid])
      losses.append(np.asarray(l)[:valid])
    return np.concatenate(accs), np.concatenate(losses)

  return evaluate
