"""Attribution-preserving fine-tuning of compressed models (WCAM; Park et al., NeurIPS 2020).

The student (compressed model) is fine-tuned with ``task loss + β · L_att``,
where ``L_att`` (:func:`wcam_loss`) matches the student's collapsed Grad-CAM
map (:func:`safer_jax.measure.attribution.gradcam`) to the teacher's (original model),
both for the teacher's predicted class. The student's map is a gradient, so the
training gradient is a double backprop; the teacher is wrapped in
``stop_gradient`` and gets no gradient. ``β = 0`` is plain fine-tuning.

Compression (the two settings of the official code that fit our zoo):

* ``'prune'`` -- iterative global magnitude pruning: the sparsity grows by
  removing 20% of the remaining weights per round (the last round lands on the
  target), each round followed by fine-tuning with the masks fixed: the masks
  are re-applied after every optimizer step, so pruned weights stay exactly 0.
* ``'quantize'`` -- quantization-aware fine-tuning: kernels are quantized in
  the forward pass (:func:`safer_jax.core.perturb.quantize`, symmetric, per output
  channel) with a straight-through estimator; the returned model holds the
  quantized kernels.

Our choices: the model runs in inference mode during fine-tuning (BatchNorm
statistics frozen), biases are neither pruned nor quantized.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from safer_jax.budgeting import budget
from safer_jax.core import data as data_lib
from safer_jax.core import layers, perturb
from safer_jax.core.progress import Progress
from safer_jax.measure import attribution
from safer_jax.training import train

Array = jax.Array
Variables = Mapping[str, Any]
COMPRESSIONS = ("prune", "quantize")


def normalize_maps(maps: Array, eps: float = 1e-12) -> Array:
  """Flattens ``(B, h, w)`` maps to ``(B, h*w)`` and L2-normalises each row."""
  flat = maps.reshape(maps.shape[0], -1)
  return flat / jnp.maximum(jnp.linalg.norm(flat, axis=1, keepdims=True), eps)


def wcam_loss(student_maps: Array, teacher_maps: Array) -> Array:
  """``mean_{b, p} (M_T/‖M_T‖₂ - M_S/‖M_S‖₂)²``: scalar; maps ``(B, h, w)``.

  The teacher maps are wrapped in ``stop_gradient``.
  """
  t = jax.lax.stop_gradient(normalize_maps(teacher_maps))
  return jnp.mean((t - normalize_maps(student_maps)) ** 2)


def channel_drop_mask(key: Array, batch: int, channels: int, rate: float = 0.3) -> Array:
  """``(B, c)`` 0/1 mask dropping ``round(rate * c)`` random channels per example."""
  n_drop = int(round(rate * channels))
  u = jax.random.uniform(key, (batch, channels))
  ranks = jnp.argsort(jnp.argsort(u, axis=1), axis=1)
  return (ranks >= n_drop).astype(jnp.float32)


def attribution_loss(model: nn.Module, student: Variables, teacher: Variables, x: Array,
                     layer: str, *, key: Array | None = None,
                     channel_drop: float = 0.0) -> tuple[Array, Array]:
  """The WCAM loss of ``student`` against ``teacher`` on images ``x (B, H, W, C)``.

  Both maps are built for the teacher's predicted class at ``layer``. With
  ``channel_drop > 0`` (stochastic matching; 0.3 in the source) that fraction
  of the teacher's channels is dropped at random when computing ``M_T``.
  Gradients flow to ``student`` only.

  Returns:
    ``(loss, classes (B,))``.
  """
  teacher = jax.lax.stop_gradient(teacher)
  classes = jax.lax.stop_gradient(attribution.predict(model, teacher, x))
  mask = None
  if channel_drop > 0:
    if key is None:
      raise ValueError("channel_drop > 0 needs a PRNG key.")
    c = attribution.layer_activation(model, teacher, x[:1], layer).shape[-1]
    mask = channel_drop_mask(key, x.shape[0], c, channel_drop)
  m_t = attribution.gradcam(model, teacher, x, layer, classes, channel_mask=mask)
  m_s = attribution.gradcam(model, student, x, layer, classes)
  return wcam_loss(m_s, m_t), classes


# ---------------------------------------------------------------------------
# Compression.
# ---------------------------------------------------------------------------


def kernels(variables: Variables) -> dict[str, Array]:
  """Layer path -> kernel of every layer (:func:`safer_jax.core.layers.find_layers`)."""
  return layers.get_kernels(variables)


def global_magnitude_masks(variables: Variables, sparsity: float) -> dict[str, Array]:
  """Kernel masks (1 = kept) of one global magnitude threshold at ``sparsity`` (fraction removed).

  Uses :func:`safer_jax.budgeting.budget.global_magnitude_ratios` and
  :func:`safer_jax.core.perturb.prune`; weights already 0 count as smallest.
  """
  ks = kernels(variables)
  ratios = budget.global_magnitude_ratios(ks, sparsity)
  return {n: (perturb.prune(w, ratios[n]) != 0).astype(w.dtype) for n, w in ks.items()}


def apply_masks(variables: Variables, masks: Mapping[str, Array]) -> dict:
  """A new ``variables`` with each masked layer's kernel multiplied by its mask."""
  return layers.map_kernels(variables, lambda _, w, m: w * m, masks)


def quantize_kernels(variables: Variables, bits: int, *, ste: bool = False) -> dict:
  """Every kernel quantized to ``bits`` (symmetric, per output channel).

  With ``ste`` the result is ``w + stop_gradient(q(w) - w)``: forward value
  ``q(w)``, gradient identity (straight-through estimator).
  """
  def quantize(_, w, b):
    q = perturb.quantize(w, b)
    return w + jax.lax.stop_gradient(q - w) if ste else q

  return layers.map_kernels(variables, quantize, [(".*", bits)])


def sparsity_schedule(target: float, per_round: float = 0.2) -> list[float]:
  """Sparsities of iterative pruning: ``1 - (1 - per_round)^r`` until ``target`` (last = target)."""
  if not 0 <= target < 1:
    raise ValueError(f"target sparsity {target} must be in [0, 1).")
  rounds = max(1, math.ceil(math.log(1 - target) / math.log(1 - per_round) - 1e-9))
  return [min(target, 1 - (1 - per_round) ** r) for r in range(1, rounds)] + [target]


def compress(variables: Variables, method: str, level: float) -> dict:
  """One-shot compression without fine-tuning.

  Args:
    variables: the model's variables.
    method: ``'prune'`` (``level`` = global sparsity in [0, 1)) or
      ``'quantize'`` (``level`` = bits).
  """
  if method == "prune":
    return apply_masks(variables, global_magnitude_masks(variables, level))
  if method == "quantize":
    return quantize_kernels(variables, int(level))
  raise ValueError(f"Unknown compression {method!r}; valid: {list(COMPRESSIONS)}")


# ---------------------------------------------------------------------------
# Fine-tuning.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  """Hyper-parameters of :func:`finetune`.

  Attributes:
    layer: the conv layer whose Grad-CAM map is matched.
    beta: weight of the attribution loss (100 in the official code; 0: plain FT).
    channel_drop: fraction of teacher channels dropped per example (0: none; 0.3 in the source).
    steps: total optimizer steps (split evenly over the pruning rounds).
    batch_size: examples per step.
    learning_rate: Adam learning rate (constant).
    per_round: fraction of the remaining weights removed per pruning round.
    seed: data order and channel dropping.
  """
  layer: str = "conv2/conv"
  beta: float = 100.0
  channel_drop: float = 0.0
  steps: int = 300
  batch_size: int = 64
  learning_rate: float = 1e-3
  per_round: float = 0.2
  seed: int = 0


def make_step(model: nn.Module, teacher: Variables, tx: optax.GradientTransformation,
              config: FinetuneConfig, forward: Callable[[dict], dict]):
  """A jitted ``step(variables, opt_state, x, y, key, masks) -> (variables, opt_state, metrics)``.

  ``forward`` maps the trained variables to the ones the model runs with (e.g.
  the STE-quantized kernels). ``masks`` (layer -> 0/1 kernel mask, may be
  empty) are re-applied after the update.
  """

  @jax.jit
  def step(variables, opt_state, x, y, key, masks):
    def loss_fn(params):
      v = forward({**variables, "params": params})
      logits = attribution.logits(model, v, x)
      task = jnp.mean(train.cross_entropy(logits, y))
      att = jnp.zeros(())
      if config.beta:
        att, _ = attribution_loss(model, v, teacher, x, config.layer, key=key,
                                  channel_drop=config.channel_drop)
      return task + config.beta * att, (task, att)

    (loss, (task, att)), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
    updates, opt_state = tx.update(grads, opt_state, variables["params"])
    new = {**variables, "params": optax.apply_updates(variables["params"], updates)}
    new = apply_masks(new, masks)
    return new, opt_state, {"loss": loss, "task": task, "att": att}

  return step


def finetune(model: nn.Module, teacher: Variables, dataset: data_lib.Dataset | data_lib.Split,
             method: str, level: float, config: FinetuneConfig = FinetuneConfig(), *,
             progress: bool = False) -> tuple[dict, dict]:
  """Compresses ``teacher`` and fine-tunes it with ``task + β · L_att``.

  Args:
    model: the Flax module (teacher and student share the architecture).
    teacher: the original model's variables (not modified, no gradient).
    dataset: a Dataset (its train split is used) or a Split of training images.
    method: ``'prune'`` (``level`` = final global sparsity) or ``'quantize'``
      (``level`` = bits).
    config: hyper-parameters.
    progress: print a progress bar.

  Returns:
    ``(variables, history)``: the compressed fine-tuned variables (pruned
    kernels with exact zeros, or quantized kernels) and per-step ``loss``,
    ``task``, ``att``, plus ``sparsities`` (prune: per round) and ``masks``.
  """
  if method not in COMPRESSIONS:
    raise ValueError(f"Unknown compression {method!r}; valid: {list(COMPRESSIONS)}")
  split = dataset.train if isinstance(dataset, data_lib.Dataset) else dataset
  teacher = jax.device_get(dict(teacher))
  n = len(split)
  bs = min(config.batch_size, n)
  if method == "prune":
    stages: list[float | None] = list(sparsity_schedule(level, config.per_round))
    forward: Callable[[dict], dict] = dict
  else:
    stages = [None]
    forward = functools.partial(quantize_kernels, bits=int(level), ste=True)
  per = [config.steps // len(stages) + (i < config.steps % len(stages))
         for i in range(len(stages))]
  tx = optax.adam(config.learning_rate)
  step = make_step(model, teacher, tx, config, forward)
  rng = np.random.default_rng(config.seed)
  key = jax.random.key(config.seed)
  variables = dict(teacher)
  opt_state = tx.init(variables["params"])
  masks: dict[str, Array] = {}
  history: dict[str, Any] = {"loss": [], "task": [], "att": [], "sparsities": []}
  bar = Progress(config.steps, f"finetune {method} {level:g} beta={config.beta:g}",
                 enabled=progress, unit="step")
  order, pos = rng.permutation(n), 0
  for stage, count in zip(stages, per):
    if stage is not None:
      masks = global_magnitude_masks(variables, stage)
      variables = apply_masks(variables, masks)
      history["sparsities"].append(stage)
    for _ in range(count):
      if pos + bs > n:
        order, pos = rng.permutation(n), 0
      idx = order[pos:pos + bs]
      pos += bs
      key, sub = jax.random.split(key)
      variables, opt_state, m = step(variables, opt_state, split.images[idx], split.labels[idx],
                                     sub, masks)
      for k in ("loss", "task", "att"):
        history[k].append(m[k])
      bar.update(1)
  bar.close()
  for k in ("loss", "task", "att"):
    history[k] = [float(v) for v in jax.device_get(history[k])]
  if method == "quantize":
    variables = quantize_kernels(variables, int(level))
  history["masks"] = masks
  return jax.device_get(variables), history
