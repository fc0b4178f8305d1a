"""Running a model from one of its stages: the programs the sweep engine compiles.

A *staged* model (every zoo model, see :mod:`safer_jax.zoo.models.common`) has
``stage_names`` (its top-level blocks, in network order) and
``apply(variables, h, start=i, stop=j)`` running stages ``[i, j)``: the
activation entering the stage that holds a perturbed layer can be computed once
and only the rest of the network re-run per perturbed copy. Any other model (a
:func:`safer_jax.wrap`-ped or linen model, a plain apply function) is one
stage, 0, evaluated by full forwards.

This module is the public model-access API of :mod:`safer_jax.measure.sweep`, of the
memory estimate (:mod:`safer_jax.measure.memory`, which lowers the same
:func:`eval_program` the engine jits), of :mod:`safer_jax.budgeting.search` and of the
benchmarks. Everything here is a pure function of its arguments; nothing is
compiled or cached here (the sweep engine owns its compiled programs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from safer_jax.core import data as data_lib
from safer_jax.core import layers as layers_lib
from safer_jax.core import tasks as tasks_lib


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
  """``(variables, h) -> outputs``: the network from ``stage`` on (``h`` enters ``stage``).

  Stage 0 takes the model's inputs (an array, or a :class:`safer_jax.core.tasks.Call`
  of several). A model without stages: its full forward (``stage`` must then be 0).
  """
  if getattr(model, "stage_names", None) and stage > 0:
    return lambda v, h: model.apply(v, h, start=stage)
  apply = apply_fn(model)
  return lambda v, x: tasks_lib.forward(apply, v, x)


def _forward_fn(model: Any) -> Callable:
  apply = apply_fn(model)
  return lambda v, x, **kw: tasks_lib.forward(apply, v, x, **kw)


def execution_order(model: Any, variables: Mapping[str, Any], inputs: Any) -> list[str]:
  """Every layer path in the order the network runs them (one traced forward of one example).

  ``inputs``: model inputs of a batch (images, or a :class:`safer_jax.core.tasks.Call`).
  """
  return layers_lib.execution_order(_forward_fn(model), variables,
                                    tasks_lib.first_example(inputs))


def execution_trace(model: Any, variables: Mapping[str, Any],
                    inputs: Any) -> tuple[list[str], dict[str, int]]:
  """:func:`execution_order` and each layer's multiply-adds per example (one trace).

  See :func:`safer_jax.core.layers.trace_layers`.
  """
  return layers_lib.trace_layers(_forward_fn(model), variables, tasks_lib.first_example(inputs))


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
                   order: Sequence[str] | None = None,
                   task: tasks_lib.Task | None = None) -> list[str]:
  """The layers ``patterns`` select, in the order the network runs them.

  Args:
    model, variables: as :func:`safer_jax.measure.sweep.run_sweep` takes them (after
      :func:`safer_jax.core.wrapping.as_model`).
    split: data whose first example is traced to recover the order.
    patterns: regex patterns (``re.fullmatch``); None = every layer.
    order: a precomputed :func:`execution_order` of this model (skips the trace).

  Raises:
    ValueError: a pattern matching no layer (see :func:`safer_jax.core.layers.select_layers`).
  """
  selected = set(layers_lib.select_layers(variables, patterns))
  if order is None:
    order = execution_order(model, variables, split_inputs(split, task))
  return [name for name in order if name in selected]


def split_inputs(split: data_lib.Split, task: tasks_lib.Task | None = None, n: int = 1) -> Any:
  """The model inputs of ``split``'s first ``n`` examples under ``task`` (default: images)."""
  return tasks_lib.get(task).model_inputs(split.batch(0, n))


def masked_scores(logits: jax.Array, labels: jax.Array, mask: jax.Array):
  """``(right answers, summed cross-entropy)`` over the unmasked examples of a batch."""
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  return jnp.sum(correct * mask), jnp.sum(tasks_lib.cross_entropy(logits, labels) * mask)


def eval_batches(split: data_lib.Split, batch_size: int,
                 task: tasks_lib.Task | None = None) -> Iterator[tuple[Any, dict, np.ndarray]]:
  """``(inputs, batch, mask)`` batches of ``split``, all of ``min(batch_size, N)`` examples.

  ``batch``: the arrays the task's loss reads (:meth:`safer_jax.core.tasks.Task.loss_batch`)
  for those rows; ``inputs``: what the model takes (``task.model_inputs(batch)``; the images by default). The last batch is
  zero padded; ``mask`` (B,) float32 is 1 on real examples.
  """
  task = tasks_lib.get(task)
  for batch, mask in tasks_lib.padded_batches(split, batch_size):
    yield task.model_inputs(batch), task.loss_batch(batch), mask


def eval_program(model: Any, layer: str, stage: int, step: int | None = None,
                 task: tasks_lib.Task | None = None) -> Callable:
  """The function the engine jits for ``layer`` (suffix from ``stage``), not yet jitted.

  ``(variables, kernels (P, *kernel.shape), h (B, ...), batch {name: (B, ...)},
  mask (B,) float32) -> sums (P, num_sums)``: ``h`` is the activation entering
  ``stage`` (the model's inputs for stage 0); per perturbed copy, ``sums`` holds
  :meth:`safer_jax.core.tasks.Task.sums` over the unmasked examples (Σ weight, Σ
  weight·loss, Σ weight·metric for each of the task's M metrics; classification:
  examples, summed cross-entropy in nats, right answers, then the examples whose
  outputs do not look like probabilities). ``step``: copies per
  ``lax.map`` step (None: all ``P`` in one ``vmap``). The memory estimate
  (:mod:`safer_jax.measure.memory`) lowers this same function.
  """
  suffix = suffix_fn(model, stage)
  task = tasks_lib.get(task)

  def one(variables, kernel, h, batch, mask):
    v = layers_lib.replace_kernel(variables, layer, kernel)
    logits = suffix(v, h)
    return task.sums(logits, batch, mask)

  batched = jax.vmap(one, in_axes=(None, 0, None, None, None))

  def layer_copies(variables, kernels, h, batch, mask):
    if step is None or step >= kernels.shape[0]:
      return batched(variables, kernels, h, batch, mask)
    return jax.lax.map(lambda k: one(variables, k, h, batch, mask), kernels, batch_size=step)

  return layer_copies


SWITCHED_KERNEL_SIZE = 1 << 16  # weights: kernels up to this size are chosen by a switch


def stage_program(model: Any, stage: int, layers: Sequence[str],
                  task: tasks_lib.Task | None = None) -> Callable:
  """The function the ``'stage'`` strategy jits for ``stage``, not yet jitted.

  ``(variables, flats (P, N) (the kernels' widest dtype), which () int32, h (B, ...),
  batch {name: (B, ...)}, mask (B,) float32) -> sums (P, num_sums)``: copy ``p`` is the model
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
  task = tasks_lib.get(task)

  def from_row(row, kernel):  # the copy's kernel: the first kernel.size weights of its row
    return row[:kernel.size].reshape(kernel.shape).astype(kernel.dtype)

  def one(variables, flat, which, h, batch, mask):
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
    return task.sums(logits, batch, mask)

  def stage_copies(variables, flats, which, h, batch, mask):
    return jax.lax.map(lambda f: one(variables, f, which, h, batch, mask), flats)

  return stage_copies


def prefix_program(model: Any, stage: int) -> Callable:
  """``(variables, inputs) -> activation entering stage``, not yet jitted (a staged model)."""
  return lambda v, x: tasks_lib.forward(model.apply, v, x, stop=stage)


def prefixes_program(model: Any, stages: Sequence[int]) -> Callable:
  """``(variables, images) -> (activation entering stages[0], ...)`` in one forward, not jitted.

  ``stages``: ascending stages of a staged model, all > 0.
  """
  stages = tuple(stages)

  def run(v, x):
    out, h, at = [], x, 0
    for st in stages:
      h = (tasks_lib.forward(model.apply, v, h, stop=st) if at == 0
           else model.apply(v, h, start=at, stop=st))
      out.append(h)
      at = st
    return tuple(out)

  return run
