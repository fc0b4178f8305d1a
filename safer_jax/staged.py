"""Running a model from one of its stages: the programs the sweep engine compiles.

A *staged* model (every zoo model, see :mod:`safer_jax.models.common`) has
``stage_names`` (its top-level blocks, in network order) and
``apply(variables, h, start=i, stop=j)`` running stages ``[i, j)``: the
activation entering the stage that holds a perturbed layer can be computed once
and only the rest of the network re-run per perturbed copy. Any other model (a
:func:`safer_jax.wrap`-ped or linen model, a plain apply function) is one
stage, 0, evaluated by full forwards.

This module is the public model-access API of :mod:`safer_jax.sweep`, of the
memory estimate (:mod:`safer_jax.memory`, which lowers the same
:func:`eval_program` the engine jits), of :mod:`safer_jax.search` and of the
benchmarks. Everything here is a pure function of its arguments; nothing is
compiled or cached here (the sweep engine owns its compiled programs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from safer_jax import data as data_lib
from safer_jax import layers as layers_lib
from safer_jax.train import cross_entropy


def apply_fn(model: Any) -> Callable:
  """``model.apply`` (a zoo, linen or wrapped model), else ``model`` (an apply function)."""
  return model.apply if hasattr(model, "apply") else model


def stage_of(model: Any, layer: str) -> int:
  """The stage (top-level block of a staged zoo model) holding ``layer``; 0 otherwise."""
  names = getattr(model, "stage_names", None)
  if not names:
    return 0
  head = layer.split("/")[0]
  return names.index(head) if head in names else 0


def suffix_fn(model: Any, stage: int) -> Callable:
  """``(variables, h) -> logits``: the network from ``stage`` on (``h`` enters ``stage``).

  A model without stages: its full forward (``stage`` must then be 0).
  """
  if getattr(model, "stage_names", None):
    return lambda v, h: model.apply(v, h, start=stage)
  return apply_fn(model)


def execution_order(model: Any, variables: Mapping[str, Any], images: np.ndarray) -> list[str]:
  """Every layer path in the order the network runs them (one traced forward of ``images[:1]``)."""
  return layers_lib.execution_order(apply_fn(model), variables, images[:1])


def execution_trace(model: Any, variables: Mapping[str, Any],
                    images: np.ndarray) -> tuple[list[str], dict[str, int]]:
  """:func:`execution_order` and each layer's multiply-adds per example (one trace).

  See :func:`safer_jax.layers.trace_layers`.
  """
  return layers_lib.trace_layers(apply_fn(model), variables, images[:1])


def stage_groups(model: Any, macs: Mapping[str, int], stages: Sequence[int],
                 slack: float = 0.05) -> dict[int, int]:
  """Which stage each of ``stages`` is evaluated from: its own, or an earlier one almost as cheap.

  The network from stage ``g`` on costs ``suffix(g)`` multiply-adds per example
  (the sum of ``macs`` over the layers of stages ``>= g``). Going through
  ``stages`` in order, a stage joins the group of the stage before it when
  ``suffix(start of that group) <= (1 + slack) * suffix(stage)``: one compiled
  program then serves both, and each of its copies costs at most ``slack`` more
  (resnet8's stem is 2% of a forward: its layers and the first block's share one
  program). A model without stages, or no counts: every stage its own.

  Args:
    model: a staged zoo model (else every stage is 0).
    macs: ``{layer: multiply-adds per example}`` of every layer
      (:func:`execution_trace`).
    stages: the stages to group.
    slack: the extra cost per copy a shared program may add, as a fraction.

  Returns:
    ``{stage: the stage its group starts at}`` for every one of ``stages``.
  """
  stages = sorted(set(stages))
  if not macs or not getattr(model, "stage_names", None):
    return {st: st for st in stages}
  per_stage: dict[int, int] = {}
  for name, count in macs.items():
    st = stage_of(model, name)
    per_stage[st] = per_stage.get(st, 0) + count
  suffix = lambda st: sum(c for s, c in per_stage.items() if s >= st)  # noqa: E731
  groups: dict[int, int] = {}
  start = None
  for st in stages:
    if start is None or suffix(start) > (1 + slack) * suffix(st):
      start = st
    groups[st] = start
  return groups


def ordered_layers(model: Any, variables: Mapping[str, Any], split: data_lib.Split,
                   patterns: Sequence[str] | None, *,
                   order: Sequence[str] | None = None) -> list[str]:
  """The layers ``patterns`` select, in the order the network runs them.

  Args:
    model, variables: as :func:`safer_jax.sweep.run_sweep` takes them (after
      :func:`safer_jax.wrapping.as_model`).
    split: data whose first image is traced to recover the order.
    patterns: regex patterns (``re.fullmatch``); None = every layer.
    order: a precomputed :func:`execution_order` of this model (skips the trace).

  Raises:
    ValueError: a pattern matching no layer (see :func:`safer_jax.layers.select_layers`).
  """
  selected = set(layers_lib.select_layers(variables, patterns))
  if order is None:
    order = execution_order(model, variables, split.images)
  return [name for name in order if name in selected]


def masked_scores(logits: jax.Array, labels: jax.Array, mask: jax.Array):
  """``(right answers, summed cross-entropy)`` over the unmasked examples of a batch."""
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  return jnp.sum(correct * mask), jnp.sum(cross_entropy(logits, labels) * mask)


def eval_batches(split: data_lib.Split,
                 batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """``(images, labels, mask)`` batches of ``split``, all of ``min(batch_size, N)`` examples.

  The last batch is zero padded; ``mask`` (B,) float32 is 1 on real examples.
  """
  n = len(split)
  bs = min(batch_size, n)
  for lo in range(0, n, bs):
    images, labels = split.images[lo:lo + bs], split.labels[lo:lo + bs]
    m = labels.shape[0]
    mask = np.zeros((bs,), np.float32)
    mask[:m] = 1.0
    if m < bs:
      images = np.concatenate([images, np.zeros((bs - m, *images.shape[1:]), images.dtype)])
      labels = np.concatenate([labels, np.zeros((bs - m,), labels.dtype)])
    yield images, labels, mask


def eval_program(model: Any, layer: str, stage: int, step: int | None = None) -> Callable:
  """The function the engine jits for ``layer`` (suffix from ``stage``), not yet jitted.

  ``(variables, kernels (P, *kernel.shape), h (B, ...), labels (B,) int, mask (B,) float32)
  -> (correct (P,), loss_sum (P,))``: ``h`` is the activation entering ``stage``
  (images for stage 0); per perturbed copy, ``correct`` counts right answers and
  ``loss_sum`` sums the cross-entropy (nats) over unmasked examples. ``step``:
  copies per ``lax.map`` step (None: all ``P`` in one ``vmap``). The memory
  estimate (:mod:`safer_jax.memory`) lowers this same function.
  """
  suffix = suffix_fn(model, stage)

  def one(variables, kernel, h, labels, mask):
    v = layers_lib.replace_kernel(variables, layer, kernel)
    logits = suffix(v, h)
    return masked_scores(logits, labels, mask)

  batched = jax.vmap(one, in_axes=(None, 0, None, None, None))

  def layer_copies(variables, kernels, h, labels, mask):
    if step is None or step >= kernels.shape[0]:
      return batched(variables, kernels, h, labels, mask)
    return jax.lax.map(lambda k: one(variables, k, h, labels, mask), kernels, batch_size=step)

  return layer_copies


SWITCHED_KERNEL_SIZE = 1 << 16  # weights: kernels up to this size are chosen by a switch


def stage_program(model: Any, stage: int, layers: Sequence[str]) -> Callable:
  """The function the ``'stage'`` strategy jits for ``stage``, not yet jitted.

  ``(variables, flats (P, N) (the kernels' widest dtype), which () int32, h (B, ...),
  labels (B,) int, mask (B,) float32) -> (correct (P,), loss_sum (P,))``: copy ``p`` is the model
  with the kernel of ``layers[which]`` replaced by ``flats[p, :size].reshape(shape)``
  (``N`` >= the largest kernel of ``layers``, zero padded), evaluated from ``h``
  (the activation entering ``stage``); copies run one after another
  (``lax.map``), so every kernel stays unbatched and each copy computes as a
  plain forward. Outputs as in :func:`eval_program`.

  Kernels of at most :data:`SWITCHED_KERNEL_SIZE` weights come out of one
  ``lax.switch`` on ``which`` (branch ``i`` returns them with layer ``i``'s taken
  from the row), not from a ``jnp.where`` each: XLA fuses such a select (and the
  row's slicing) into every consumer, and a depthwise convolution written as
  shifted multiply-adds (the zoo's mobilenet_v2) then recomputes it for every
  output element — 14 ms per copy instead of 7.7 ms on mobilenet_v2 with all 20
  layers selectable (2 CPU cores). A switch's outputs are buffers, copied once
  per copy, which larger kernels (consumed whole by library convolutions and
  matrix products) would pay for: they keep a ``jnp.where`` (resnet18's last
  stage, 4.7M weights: 7.6 ms per copy, 8.1 ms through a switch).
  """
  suffix = suffix_fn(model, stage)
  names = tuple(layers)

  def from_row(row, kernel):  # the copy's kernel: the first kernel.size weights of its row
    return row[:kernel.size].reshape(kernel.shape).astype(kernel.dtype)

  def one(variables, flat, which, h, labels, mask):
    kernels = [layers_lib.get_kernel(variables, name) for name in names]
    if len(names) == 1:
      chosen = [from_row(flat, kernels[0])]
    else:
      small = [i for i, k in enumerate(kernels) if k.size <= SWITCHED_KERNEL_SIZE]
      chosen = [kernel if i in small else jnp.where(which == i, from_row(flat, kernel), kernel)
                for i, kernel in enumerate(kernels)]
      if small:
        def taking(i):  # the branch where layer i (None: a larger one) is the perturbed layer
          return lambda row: tuple(from_row(row, kernels[j]) if j == i else kernels[j]
                                   for j in small)
        branch = jnp.asarray([small.index(i) if i in small else len(small)
                              for i in range(len(names))], jnp.int32)[which]
        picked = jax.lax.switch(branch, [taking(i) for i in small] + [taking(None)], flat)
        for i, kernel in zip(small, picked):
          chosen[i] = kernel
    v = variables
    for name, kernel in zip(names, chosen):
      v = layers_lib.replace_kernel(v, name, kernel)
    logits = suffix(v, h)
    return masked_scores(logits, labels, mask)

  def stage_copies(variables, flats, which, h, labels, mask):
    return jax.lax.map(lambda f: one(variables, f, which, h, labels, mask), flats)

  return stage_copies


def prefix_program(model: Any, stage: int) -> Callable:
  """``(variables, images) -> activation entering stage``, not yet jitted (a staged model)."""
  return lambda v, x: model.apply(v, x, stop=stage)


def prefixes_program(model: Any, stages: Sequence[int]) -> Callable:
  """``(variables, images) -> (activation entering stages[0], ...)`` in one forward, not jitted.

  ``stages``: ascending stages of a staged model, all > 0.
  """
  stages = tuple(stages)

  def run(v, x):
    out, h, at = [], x, 0
    for st in stages:
      h = model.apply(v, h, start=at, stop=st)
      out.append(h)
      at = st
    return tuple(out)

  return run
