"""Training and evaluation of classifiers (optax, jit-compiled steps, BatchNorm state).

``evaluate(apply_fn, variables, split)`` is the pure evaluation that every later
experiment reuses on perturbed variables.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from safer_jax.core import caches
from safer_jax.core import data as data_lib
from safer_jax.core import distributed
from safer_jax.core import layers as layers_lib
from safer_jax.core import tasks as tasks_lib
from safer_jax.core import wrapping
from safer_jax.core.progress import Progress

Variables = Mapping[str, Any]
ApplyFn = Callable[[Variables, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Hyper-parameters of :func:`train`.

  Attributes:
    epochs: passes over the training split.
    batch_size: examples per step (the last partial batch of an epoch is dropped).
    learning_rate: peak learning rate of Adam(W), cosine-decayed to 0 after a
      one-epoch linear warm-up.
    weight_decay: decoupled weight decay (AdamW).
    seed: seeds parameter init and the data order.
  """
  epochs: int = 30
  batch_size: int = 64
  learning_rate: float = 3e-3
  weight_decay: float = 1e-4
  seed: int = 0


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example cross-entropy in nats; ``logits (B, K)``, ``labels (B,)`` int -> ``(B,)``."""
  return tasks_lib.cross_entropy(logits, labels)


def task_loss_fn(model: Any, variables: Mapping[str, Any] | None,
                 task: tasks_lib.Task | str | None = None) -> Callable[[Any, Any], jax.Array]:
  """``loss_fn(params, batch) -> the task's weighted mean loss`` of one batch, for the criteria.

  Every collection other than ``params`` (e.g. BatchNorm ``batch_stats``) is
  closed over and held fixed; the model runs in inference mode. Classification
  (the default): the mean cross-entropy, :func:`classifier_loss_fn`.

  Args:
    model: a model or apply function (see :func:`safer_jax.wrap`).
    variables: its variables (None for a wrapped or nnx model).
    task: :mod:`safer_jax.core.tasks` task or preset name (None: classification).

  Returns:
    ``loss_fn(params, batch)`` with ``batch`` a dict of a split's arrays for
    some examples (``{'image', 'label'}``, ``{'tokens', 'targets', 'mask'}``, ...).
  """
  task = tasks_lib.get(task)
  model, variables = wrapping.as_model(model, variables)
  apply = model.apply if hasattr(model, "apply") else model
  rest = {name: value for name, value in variables.items() if name != "params"}

  def loss_fn(params, batch):
    outputs = tasks_lib.forward(apply, {**rest, "params": params}, task.model_inputs(batch))
    return task.batch_loss(outputs, batch)

  return loss_fn


def classifier_loss_fn(model: Any, variables: Mapping[str, Any]) -> Callable[[Any, Any], jax.Array]:
  """``loss_fn(params, batch) -> mean cross-entropy`` of a classifier, for the criteria.

  Every collection other than ``params`` (e.g. BatchNorm ``batch_stats``) is
  closed over and held fixed; the model runs in inference mode.

  Args:
    model: a Flax module (``model.apply(variables, images) -> logits (B, K)``),
      a :func:`safer_jax.wrap`-ped model, an ``nnx.Module``, or an
      ``apply_fn`` with that signature.
    variables: the model variables (``None`` for a wrapped or nnx model).

  Returns:
    ``loss_fn(params, batch)`` with ``batch = {'image': (B, H, W, C) float32,
    'label': (B,) int}``; the value is in nats per example.
  """
  return task_loss_fn(model, variables, tasks_lib.classification())


def _init(model: nn.Module, key: jax.Array, input_shape: tuple[int, ...]) -> dict:
  # A required mode flag (``train`` without a default) is set to inference, as when applied.
  return dict(model.init(key, jnp.zeros((1, *input_shape), jnp.float32),
                         **wrapping.inference_kwargs(model)))


_jitted_init = jax.jit(_init, static_argnums=(0, 2))


def _init_inputs(model: nn.Module, key: jax.Array, inputs: Any) -> dict:
  init = functools.partial(model.init, **wrapping.inference_kwargs(model))
  return dict(tasks_lib.forward(init, key, inputs))


_jitted_init_inputs = jax.jit(_init_inputs, static_argnums=0)


def init_from_inputs(model: nn.Module, inputs: Any, seed: int) -> dict:
  """Initialises a linen ``model`` on example ``inputs`` (an array or a
  :class:`safer_jax.core.tasks.Call`).

  For models whose input is not a float image (token ids, several inputs); one
  compiled program when the module can be hashed.
  """
  inputs = tasks_lib.first_example(inputs)
  try:
    hash(model)
  except TypeError:
    return _init_inputs(model, jax.random.key(seed), inputs)
  return _jitted_init_inputs(model, jax.random.key(seed), inputs)


def init_variables(model: nn.Module, input_shape: tuple[int, ...], seed: int) -> dict:
  """Initialises ``model`` on a dummy batch of shape ``(1, *input_shape)``.

  One compiled program (per model configuration and shape), not op by op: on 2
  CPU cores a first init took 6.0 -> 2.9 s (resnet8), 8.5 -> 3.7 s
  (mobilenet_v2), and a later process loads it from the persistent compilation
  cache. The values are those of ``model.init`` (bit for bit on the zoo's
  convolutional models; ``vit_tiny``'s position embedding differs in the last
  bit). Dicts come back in pytree (sorted key) order, as after training or a
  restore. A module that cannot be hashed (a static argument) is initialised
  op by op.
  """
  input_shape = tuple(int(d) for d in input_shape)
  try:
    hash(model)
  except TypeError:
    return _init(model, jax.random.key(seed), input_shape)
  return _jitted_init(model, jax.random.key(seed), input_shape)


def _as_split(split: data_lib.Split | data_lib.Dataset) -> data_lib.Split:
  return split.eval if isinstance(split, data_lib.Dataset) else split


EVAL_BATCH_SIZE = 1024  # examples per compiled call of evaluate (its default) and of train's


@functools.partial(jax.jit, static_argnums=(0, 1))
def _eval_sums(apply_fn: ApplyFn, task: tasks_lib.Task, variables, inputs, batch, mask):
  return task.sums(tasks_lib.forward(apply_fn, variables, inputs), batch, mask)


# Compiled per model (a static argument): safer_jax.clear_caches() forgets them.
caches.register(_jitted_init.clear_cache)
caches.register(_jitted_init_inputs.clear_cache)
caches.register(_eval_sums.clear_cache)


def evaluate(apply_fn: ApplyFn | Any, variables: Variables | None,
             split: data_lib.Split | data_lib.Dataset, batch_size: int = EVAL_BATCH_SIZE, *,
             shard: bool = True, check_finite: bool = True,
             task: tasks_lib.Task | str | None = None) -> dict[str, float]:
  """The task's loss and metrics of ``apply_fn(variables, inputs)`` on a split.

  Classification (the default): accuracy and mean cross-entropy of
  ``apply_fn(variables, images)``; any other :mod:`safer_jax.core.tasks` task: its
  weighted mean loss, metrics and derived values (perplexity, RMSE).

  Pure: reads ``variables`` only. ``apply_fn`` is a static argument of a cached
  jit (pass the same function object each time, e.g. ``model.apply``) and must
  run the model in inference mode. The last batch is zero-padded and masked, so
  there is one compilation per ``(apply_fn, shapes)``.

  With several devices (all of ``jax.devices()``, every host under
  ``jax.distributed``) each batch is split along the examples over the
  ``'data'`` mesh and ``variables`` are replicated: the batch size is rounded
  up to a multiple of the device count (extra rows padded and masked). The
  accuracy is the single-device one exactly, the loss up to float summation
  order. Multi-host: every process passes the same full split and gets the
  same result.

  Args:
    apply_fn: ``(variables, images (B, H, W, C)) -> logits (B, K)`` (or what
      ``task`` feeds it), or a model: a :func:`safer_jax.wrap`-ped one, an
      ``nnx.Module`` or a linen module (run in inference mode; wrap an nnx
      module once and reuse it, so the compiled evaluation is reused too).
    variables: model variables (``params`` and, if any, ``batch_stats``);
      ``None`` for a wrapped or nnx model (its own variables).
    split: a :class:`~safer_jax.core.data.Split` (or a Dataset: its eval split).
    batch_size: examples per compiled call (a positive integer).
    shard: split batches over the devices (when there are several and
      :func:`safer_jax.core.distributed.use_data_sharding` has not turned it off);
      ``False`` evaluates on the default device.
    check_finite: refuse ``variables`` holding NaN or inf (one check per call,
      :func:`safer_jax.core.layers.check_finite`); ``False`` to evaluate deliberately
      damaged weights (e.g. float32 bit flips).
    task: :mod:`safer_jax.core.tasks` task or preset name (None: classification).

  Returns:
    Classification: ``{'accuracy': fraction in [0, 1], 'loss': nats per example,
    'num_examples': N}``; another task: ``{metric: ..., 'loss': ..., derived:
    ..., 'num_examples': N}``.

  Raises:
    ValueError: an empty split, a bad ``batch_size``, a split without the
      task's arrays, outputs that do not fit the task (labels out of the logits'
      range, ... before any batch; probabilities where the task takes logits,
      after the first batch, from a flag computed in the evaluation's own
      program), or (``check_finite``) a parameter holding NaN or inf (the leaf
      is named).
  """
  task = tasks_lib.get(task)
  if wrapping.is_model(apply_fn):
    model, variables = wrapping.as_model(apply_fn, variables)
    apply_fn = model.apply
  split = _as_split(split)
  n = len(split)
  if n == 0:
    raise ValueError("Cannot evaluate on an empty split.")
  if (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
      or batch_size < 1):
    raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
  if check_finite:
    layers_lib.check_finite(variables)
  task.validate_split(split)
  tasks_lib.check_outputs(apply_fn, variables, split, task)
  shards = distributed.num_data_shards() if shard else 1
  bs = min(int(batch_size), n)
  bs = -(-bs // shards) * shards  # Round up to a multiple of the device count.
  if shards > 1:
    mesh = distributed.data_mesh()
    variables = distributed.replicate(variables, mesh)
  total = np.zeros(task.num_sums, np.float64)
  for i, (batch, mask) in enumerate(tasks_lib.padded_batches(split, bs, rows=bs)):
    if shards > 1:
      batch, mask = distributed.shard_batch((batch, mask), mesh)
    sums = _eval_sums(apply_fn, task, variables, task.model_inputs(batch),
                      task.loss_batch(batch), mask)
    total += [float(x) for x in np.asarray(sums)]
    if i == 0:  # e.g. probabilities for logits: refused after the first batch
      task.check_sums(total)
  if not total[0] > 0:
    raise ValueError(f"Nothing to evaluate: the split's {n} examples weigh 0 under task "
                     f"{task.name!r} (e.g. every token masked).")
  means = task.means(total)
  out = {**{m: means[m] for m in task.metrics}, "loss": means["loss"]}
  out.update({name: fn(means) for name, fn in task.derived.items()})
  out["num_examples"] = n
  return out


def recalibrate_bn(model: Any, variables: Variables, images: Any, *,
                   momentum: float = 0.9) -> Variables:
  """``variables`` whose BatchNorm statistics are those of ``images`` (B, H, W, C).

  One train-mode forward of a zoo model (``train=True``, ``batch_stats``
  mutable); running averages start from zero, so the updated value is ``(1 -
  momentum) * batch statistic`` and is divided back. ``momentum`` is the
  model's BatchNorm momentum: the default is the zoo's
  (:data:`safer_jax.zoo.models.common.BN_MOMENTUM`, checked equal by the
  tests). No weight changes; traceable (usable inside ``jit``/``vmap``).
  Models without ``batch_stats``: unchanged.
  """
  if "batch_stats" not in variables:
    return variables
  zero = jax.tree.map(jnp.zeros_like, variables["batch_stats"])
  _, state = model.apply({**variables, "batch_stats": zero}, jnp.asarray(images), train=True,
                         mutable=["batch_stats"])
  return {**variables,
          "batch_stats": jax.tree.map(lambda x: x / (1 - momentum), state["batch_stats"])}


def make_optimizer(config: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
  total = max(config.epochs * steps_per_epoch, 1)
  warmup = min(steps_per_epoch, total // 2)
  schedule = optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, warmup, total)
  return optax.adamw(schedule, weight_decay=config.weight_decay)


def make_task_step(model: Any, tx: optax.GradientTransformation, task: tasks_lib.Task):
  """A jitted ``step(variables, opt_state, batch) -> (variables, opt_state, loss)`` for any task.

  The loss is the task's weighted mean over the batch
  (:meth:`safer_jax.core.tasks.Task.batch_loss`).
  """
  forward = wrapping.training_apply(model)

  @jax.jit
  def step(variables, opt_state, batch):
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}

    def loss_fn(p):
      outputs, new_state = tasks_lib.forward(forward, {"params": p, **state},
                                             task.model_inputs(batch))
      return task.batch_loss(outputs, batch), new_state

    (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return {"params": params, **new_state}, opt_state, loss

  return step


def make_train_step(model: nn.Module, tx: optax.GradientTransformation):
  """Returns a jitted ``step(variables, opt_state, images, labels) -> (variables, opt_state, loss)``."""

  forward = wrapping.training_apply(model)

  @jax.jit
  def step(variables, opt_state, images, labels):
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}

    def loss_fn(p):
      logits, new_state = forward({"params": p, **state}, images)
      return jnp.mean(cross_entropy(logits, labels)), new_state

    (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return {"params": params, **new_state}, opt_state, loss

  return step


def train(model: nn.Module, dataset: data_lib.Dataset, config: TrainConfig = TrainConfig(), *,
          progress: bool = True, variables: Variables | None = None,
          make_steps: Callable[[nn.Module, optax.GradientTransformation],
                               Callable[[int], Callable]] | None = None,
          label: str = "train", task: tasks_lib.Task | str | None = None) -> tuple[dict, dict]:
  """Trains ``model`` on ``dataset.train`` with AdamW; deterministic given ``config.seed``.

  Args:
    model: a Flax module called as ``model.apply(variables, x, train=...)``, or
      a :func:`safer_jax.wrap`-ped model (with ``variables``).
    dataset: a :class:`~safer_jax.core.data.Dataset`.
    config: hyper-parameters.
    progress: print a progress line per epoch (loss, eval accuracy).
    variables: start from these instead of a fresh init (a wrapped model
      starts from its own variables).
    make_steps: ``make_steps(model, tx) -> steps`` where ``steps(epoch)`` is the
      jitted step of that epoch (default: :func:`make_train_step` every epoch);
      used by adversarial corruption-resistant training.
    label: progress-line label.
    task: what to minimise (:mod:`safer_jax.core.tasks`; None: classification's
      cross-entropy); ``make_steps`` is for classification only.

  Returns:
    ``(variables, history)``; ``history`` holds per-epoch ``train_loss`` and
    the final ``eval`` metrics from :func:`evaluate`.

  Raises:
    ValueError: an empty training split, ``batch_size`` < 1 or ``epochs`` < 0,
      a split without the task's arrays, or outputs that do not fit the task
      (labels of either split out of the logits' range, probabilities where the
      task takes logits, ...: :func:`evaluate`'s checks), all before any step.
      These checks run the final evaluation's first batch (at most
      :data:`EVAL_BATCH_SIZE` examples of ``dataset.eval``) first: the same
      compiled program, so they cost one batch of inference and no compilation.
  """
  task = tasks_lib.get(task)
  generic = task is not tasks_lib.classification()
  if generic and make_steps is not None:
    raise ValueError(f"train(make_steps=...) steps take images and labels; task "
                     f"{task.name!r} needs the default steps (make_steps=None).")
  n = len(dataset.train)
  if n == 0:
    raise ValueError(f"Cannot train on an empty training split (dataset {dataset.name!r}).")
  if config.batch_size < 1 or config.epochs < 0:
    raise ValueError(f"TrainConfig batch_size={config.batch_size} must be >= 1 and "
                     f"epochs={config.epochs} >= 0.")
  bs = min(config.batch_size, n)
  steps_per_epoch = n // bs
  task.validate_split(dataset.train, "training split")
  if wrapping.is_model(model) and not isinstance(model, (wrapping.WrappedModel, nn.Module)):
    model = wrapping.wrap(model)  # an nnx.Module: its variables (the module is not changed)
  if variables is None and isinstance(model, wrapping.WrappedModel):
    variables = model.variables
  elif variables is None and generic:
    variables = init_from_inputs(model, task.model_inputs(dataset.train.batch(0, 1)),
                                 config.seed)
  elif variables is None:
    variables = init_variables(model, dataset.input_shape, config.seed)
  variables = dict(variables)
  # Nonsense refused before any step: labels out of the logits' range (the training split's,
  # traced shapes only), then the final evaluation's first batch (probabilities for logits).
  scorer = wrapping.as_model(model, variables)[0] if wrapping.is_model(model) else model
  tasks_lib.check_outputs(scorer.apply if hasattr(scorer, "apply") else scorer, variables,
                          dataset.train, task)
  evaluate(scorer, variables, dataset.eval.take(min(EVAL_BATCH_SIZE, len(dataset.eval))),
           task=task)
  tx = make_optimizer(config, steps_per_epoch)
  opt_state = tx.init(variables["params"])
  if generic:
    generic_step = make_task_step(model, tx, task)
    steps = lambda epoch: generic_step  # pylint: disable=unnecessary-lambda-assignment
  elif make_steps is None:
    plain = make_train_step(model, tx)
    steps = lambda epoch: plain  # pylint: disable=unnecessary-lambda-assignment
  else:
    steps = make_steps(model, tx)
  rng = np.random.default_rng(config.seed)
  bar = Progress(config.epochs, f"{label} {type(model).__name__}", enabled=progress, unit="epoch")
  history: dict[str, Any] = {"train_loss": []}
  for epoch in range(config.epochs):
    step = steps(epoch)
    order = rng.permutation(n)
    losses = []
    for i in range(steps_per_epoch):
      idx = order[i * bs:(i + 1) * bs]
      if generic:
        batch = {k: v[idx] for k, v in dataset.train.arrays.items()}
        variables, opt_state, loss = step(variables, opt_state, batch)
      else:
        variables, opt_state, loss = step(variables, opt_state, dataset.train.images[idx],
                                          dataset.train.labels[idx])
      losses.append(loss)
    epoch_loss = float(np.mean(jax.device_get(losses)))
    history["train_loss"].append(epoch_loss)
    bar.update(1, postfix=f"loss {epoch_loss:.4f}")
  history["train_seconds"] = bar.close()
  history["eval"] = evaluate(scorer, variables, dataset.eval, EVAL_BATCH_SIZE, task=task)
  return variables, history


def finetune(model: nn.Module, variables: Variables, split: data_lib.Split, steps: int, *,
             masks: Mapping[str, Any] | None = None, learning_rate: float = 1e-3,
             batch_size: int = 64, seed: int = 0) -> dict:
  """A short fine-tune (AdamW, constant ``learning_rate``) with optional fixed pruning masks.

  Args:
    model: a Flax module or :func:`safer_jax.wrap`-ped model (train mode
      updates ``batch_stats``).
    variables: starting variables (e.g. a pruned model).
    split: training data.
    steps: optimizer steps (batches drawn in a seeded random order).
    masks: ``{layer: bool array of the kernel's shape}``; after every step each
      listed kernel is multiplied by its mask, so pruned weights stay exactly 0.
    learning_rate: AdamW learning rate.
    batch_size: examples per step.
    seed: data order.

  Returns:
    The fine-tuned variables.
  """
  from safer_jax.core import layers as layers_lib  # pylint: disable=import-outside-toplevel
  tx = optax.adamw(learning_rate, weight_decay=0.0)
  step = make_train_step(model, tx)
  masks = {name: jnp.asarray(m, jnp.float32) for name, m in (masks or {}).items()}

  @jax.jit
  def apply_masks(v):
    return layers_lib.map_kernels(v, lambda _, w, m: w * m, masks)

  variables = apply_masks(dict(variables))
  opt_state = tx.init(variables["params"])
  rng = np.random.default_rng(seed)
  n = len(split)
  bs = min(batch_size, n)
  order = np.array([], np.int64)
  for _ in range(steps):
    if order.size < bs:
      order = np.concatenate([order, rng.permutation(n)])
    idx, order = order[:bs], order[bs:]
    variables, opt_state, _ = step(variables, opt_state, split.images[idx], split.labels[idx])
    variables = apply_masks(variables)
  return variables
