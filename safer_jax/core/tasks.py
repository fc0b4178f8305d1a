"""Tasks: what a model is scored on — the arrays it takes, a per-example loss, metrics.

Every entry point that evaluates a model (``evaluate``, ``fit``, ``run_sweep``,
``mixed_precision.cost_tables`` / ``allocate``, ``search.AllocationEvaluator``,
the criteria's loss through :func:`loss_fn`) takes ``task=``. A task reads a
*batch*: the dict of a :class:`~safer_jax.core.data.Split`'s arrays for some
examples (``{'image', 'label'}``, ``{'tokens', 'targets', 'mask'}``,
``{'x', 'y'}``, ...), so no input is tied to one batch size.

* ``inputs`` says what the model is called with: one array name (``'image'``:
  ``model(variables, batch['image'])``), a tuple of names (positional
  arguments) or a dict ``{keyword: name}`` (keyword arguments), or a function
  ``batch -> x`` (return :class:`Call` for several arguments).
* ``loss(outputs, batch) -> (B,)`` is the per-example loss (nats for the
  cross-entropies and the KL, squared units for MSE); lower is better.
* ``metrics``: ``{name: (outputs, batch) -> (B,)}``, higher is better (a
  sweep's table gets ``name`` and ``name_drop`` columns for each).
* ``weight(batch) -> (B,)``: how much each example counts in an average (the
  number of real target tokens for a language model), default 1: the loss over
  a split is ``Σ w·loss / Σ w`` — a token-level mean for a language model.

Presets: :func:`classification` (the default everywhere: mean cross-entropy and
accuracy — the numbers every earlier version reported), :func:`token_cross_entropy`
(causal LMs, padding masked; perplexity = exp(loss)), :func:`mse`, and
:func:`kl_to_reference` (label-free: KL divergence from the float model's output
distribution, read from the split's ``'reference'`` array that
:func:`add_reference` computes).

>>> task = sj.tasks.mse(inputs="x", target="y")
>>> sj.evaluate(model, variables, split, task=task)
{'loss': 0.01..., 'num_examples': 256}
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from safer_jax.core import caches

Batch = Mapping[str, Any]
REFERENCE = "reference"  # the split array holding the float model's outputs (kl_to_reference)


@jax.tree_util.register_pytree_node_class
class Call:
  """Several model arguments: ``model(variables, *args, **kwargs)``.

  A pytree (it passes through ``jit`` and ``vmap``); :func:`forward` unpacks it.
  """

  def __init__(self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None):
    self.args = tuple(args)
    self.kwargs = dict(kwargs or {})

  def tree_flatten(self):
    keys = tuple(sorted(self.kwargs))
    return (self.args, tuple(self.kwargs[k] for k in keys)), keys

  @classmethod
  def tree_unflatten(cls, keys, children):
    args, values = children
    return cls(args, dict(zip(keys, values)))

  def __repr__(self) -> str:
    shape = lambda v: getattr(v, "shape", type(v).__name__)  # noqa: E731
    return (f"Call(args={[shape(a) for a in self.args]}, "
            f"kwargs={ {k: shape(v) for k, v in self.kwargs.items()} })")


def forward(apply: Callable, variables: Any, x: Any, **kwargs) -> Any:
  """``apply(variables, x)``, or ``apply(variables, *x.args, **x.kwargs)`` for a :class:`Call`."""
  if isinstance(x, Call):
    return apply(variables, *x.args, **{**x.kwargs, **kwargs})
  return apply(variables, x, **kwargs)


def first_example(x: Any) -> Any:
  """``x`` cut to its first example (every leaf ``[:1]``): what a trace of the model needs."""
  return jax.tree.map(lambda a: a[:1], x)


def signature(tree: Any, *, per_example: bool = False) -> tuple:
  """``(structure, ((shape, dtype), ...))`` of a pytree of arrays: a key of what a trace saw.

  ``per_example``: shapes without the leading (example) axis.
  """
  return (jax.tree.structure(tree),
          tuple((tuple(np.shape(x))[int(per_example):], str(getattr(x, "dtype", type(x))))
                for x in jax.tree.leaves(tree)))


def _names(inputs: Any) -> tuple[str, ...]:
  if isinstance(inputs, str):
    return (inputs,)
  if isinstance(inputs, Mapping):
    return tuple(inputs.values())
  if isinstance(inputs, (tuple, list)):
    return tuple(inputs)
  return ()


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
  """A loss, metrics and the model's inputs, all read from a batch dict.

  Compared by identity (it is a static argument of compiled programs): build a
  task once and reuse it; the presets return the same object for the same
  arguments.

  Attributes:
    name: shown in results (``'classification'``, ``'token_cross_entropy'``, ...).
    loss: ``(outputs, batch) -> (B,)`` per-example loss (lower is better).
    inputs: the model's arguments: an array name, a tuple of names
      (positional), a dict ``{keyword: name}``, or ``batch -> x``.
    metrics: ``{name: (outputs, batch) -> (B,)}``, higher is better.
    weight: ``batch -> (B,)`` example weights of every average (None: 1).
    needs: arrays the loss, metrics and weight read, e.g. ``('label',)``; a
      split must hold them. Empty: they get the whole batch.
    check: ``(outputs, batch) -> None`` run on the host on the first batch of
      an evaluation, raising ``ValueError`` on nonsense (labels out of range).
    suspect: ``(outputs, batch) -> (B,)`` 1 where an example's outputs look like
      nonsense that only their values show (classification: a row of
      probabilities, not logits), else 0. Computed inside the programs that
      already score the task (:meth:`sums` counts the examples that look
      fine), so it costs no compilation of its own; :meth:`check_sums` raises
      ``ValueError(f'{name}: {suspect_error}')`` when none does.
    suspect_error: what :meth:`check_sums` says.
    derived: ``{name: fn(means) -> float}`` reported by :func:`safer_jax.evaluate`
      (perplexity = exp(loss)).
    ground_truth: the sweep column that ranks layers for this task
      (``'accuracy_drop'`` for classification, ``'loss_increase'`` otherwise).
  """
  name: str
  loss: Callable[[Any, Batch], jax.Array]
  inputs: Any = "image"
  metrics: Mapping[str, Callable[[Any, Batch], jax.Array]] = dataclasses.field(
      default_factory=dict)
  weight: Callable[[Batch], jax.Array] | None = None
  needs: tuple[str, ...] = ()
  check: Callable[[Any, Batch], None] | None = None
  suspect: Callable[[Any, Batch], jax.Array] | None = None
  suspect_error: str = ""
  derived: Mapping[str, Callable[[Mapping[str, float]], float]] = dataclasses.field(
      default_factory=dict)
  ground_truth: str = "loss_increase"

  def __post_init__(self):
    reserved = {"loss", "num_examples"} & set(self.metrics)
    if reserved:
      raise ValueError(f"Task {self.name!r}: metric name(s) {sorted(reserved)} are reserved; "
                       f"rename them.")

  # -- the model's inputs ---------------------------------------------------------------------

  def model_inputs(self, batch: Batch) -> Any:
    """What the model is called with for ``batch`` (an array, a :class:`Call`, or a pytree)."""
    inputs = self.inputs
    if isinstance(inputs, str):
      return batch[inputs]
    if isinstance(inputs, Mapping):
      return Call((), {k: batch[v] for k, v in inputs.items()})
    if isinstance(inputs, (tuple, list)):
      return Call(tuple(batch[k] for k in inputs))
    return inputs(batch)

  @property
  def columns(self) -> tuple[str, ...]:
    """The scores of one evaluation, in order: ``('loss', *metrics)``."""
    return ("loss", *self.metrics)

  def required(self) -> tuple[str, ...]:
    """Array names a split must hold for this task."""
    return tuple(dict.fromkeys((*_names(self.inputs), *self.needs)))

  def validate_split(self, split: Any, what: str = "split") -> None:
    """Raises ``ValueError`` naming the arrays ``split`` lacks for this task."""
    arrays = getattr(split, "arrays", split)
    missing = [k for k in self.required() if k not in arrays]
    if missing:
      hint = (f" Add the float model's outputs with safer_jax.core.tasks.add_reference(model, "
              f"variables, {what}, task)." if REFERENCE in missing else "")
      raise ValueError(f"The {what} has no array(s) {missing} that task {self.name!r} reads; "
                       f"its arrays: {list(arrays)}. Name them in the task (e.g. "
                       f"safer_jax.core.tasks.{self.name}(inputs=..., ...)).{hint}")

  def loss_batch(self, batch: Batch) -> dict:
    """The arrays the loss, metrics and weights read: ``needs`` (all of ``batch`` if empty).

    What the compiled programs receive beside the model inputs, so inputs are not
    passed twice.
    """
    if not self.needs:
      return dict(batch)
    return {k: batch[k] for k in self.needs}

  # -- scores ---------------------------------------------------------------------------------

  def example_weights(self, batch: Batch, mask: jax.Array) -> jax.Array:
    """``(B,)`` weights of a batch's examples: ``weight(batch) * mask``."""
    return mask if self.weight is None else self.weight(batch) * mask

  @property
  def num_sums(self) -> int:
    """Entries of :meth:`sums`: ``2 + M``, one more with a :attr:`suspect` check."""
    return 2 + len(self.metrics) + (self.suspect is not None)

  def sums(self, outputs: Any, batch: Batch, mask: jax.Array) -> jax.Array:
    """``(num_sums,)``: Σ weight, Σ weight·score of the loss and each metric (padded rows 0).

    With a :attr:`suspect` check, last: the number of (unpadded) examples whose
    outputs look fine; a few reductions over the outputs in the same program.
    """
    w = self.example_weights(batch, mask)
    parts = [jnp.sum(w), jnp.sum(self.loss(outputs, batch) * w)]
    parts += [jnp.sum(fn(outputs, batch).astype(jnp.float32) * w)
              for fn in self.metrics.values()]
    if self.suspect is not None:
      fine = 1.0 - self.suspect(outputs, batch).astype(jnp.float32)
      parts.append(jnp.sum(fine * mask.astype(jnp.float32)))
    return jnp.stack(parts)

  def check_sums(self, sums: Any) -> None:
    """Raises ``ValueError`` when no example of summed :meth:`sums` looks fine (:attr:`suspect`).

    ``sums``: ``(..., num_sums)`` (several perturbed copies: raised only if no
    copy has an example that looks fine). On the host; nothing when the task
    has no ``suspect`` check.

    Raises:
      ValueError: ``f'{name}: {suspect_error}'``.
    """
    if self.suspect is None:
      return
    fine = np.asarray(sums)[..., -1]
    if fine.size and not np.any(fine > 0):
      raise ValueError(f"{self.name}: {self.suspect_error}")

  def means(self, sums: np.ndarray) -> dict[str, float]:
    """``{column: Σ w·score / Σ w}`` from summed :meth:`sums` (``(num_sums,)``)."""
    sums = np.asarray(sums, np.float64)
    total = sums[0] if sums[0] > 0 else np.nan
    return {name: float(s / total) for name, s in zip(self.columns, sums[1:])}

  def batch_loss(self, outputs: Any, batch: Batch) -> jax.Array:
    """The (weighted) mean loss of one unpadded batch: what the criteria differentiate."""
    if self.weight is None:
      return jnp.mean(self.loss(outputs, batch))
    n = jax.tree.leaves(batch)[0].shape[0]
    w = self.example_weights(batch, jnp.ones((n,), jnp.float32))
    return jnp.sum(self.loss(outputs, batch) * w) / jnp.maximum(jnp.sum(w), 1e-12)


# ---------------------------------------------------------------------------------------------
# Presets.
# ---------------------------------------------------------------------------------------------


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Cross-entropy in nats; ``logits (..., K)``, ``labels (...)`` int -> ``(...)``."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def _check_labels(logits: Any, labels: np.ndarray, what: str, rank: int) -> None:
  shape = getattr(logits, "shape", None)
  if shape is None:
    raise ValueError(f"{what}: the model returned a {type(logits).__name__}, not an array of "
                     f"logits; pick them out with safer_jax.wrap(model, variables, "
                     f"output=lambda out: out.logits) (or out[0]).")
  if len(shape) != rank:
    raise ValueError(f"{what}: logits of shape {tuple(shape)[1:]} per example for labels "
                     f"of shape {tuple(np.shape(labels))[1:]} per example; expected logits "
                     f"(B, ..., K) with one more axis than the labels ({rank} axes).")
  k = shape[-1]
  labels = np.asarray(labels)
  if labels.size and (labels.min() < 0 or labels.max() >= k):
    raise ValueError(f"{what}: labels range over [{labels.min()}, {labels.max()}] but the model "
                     f"gives {k} logits per example; labels must be in [0, {k - 1}].")


def _frozen_args(preset):
  """``lru_cache`` of a preset whose ``inputs`` may be a list or dict (frozen first)."""
  cached_preset = functools.lru_cache(maxsize=None)(preset)

  @functools.wraps(preset)
  def build(*args, **kwargs):
    if args:
      args = (_freeze(args[0]), *args[1:])
    if "inputs" in kwargs:
      kwargs["inputs"] = _freeze(kwargs["inputs"])
    return cached_preset(*args, **kwargs)

  return build


def looks_like_probabilities(outputs: jax.Array) -> jax.Array:
  """``(B, ..., K) -> (B,)`` bool: every row of the example lies in [0, 1] and sums to 1.

  What a final softmax gives. Log-probabilities (``log_softmax``: entries <= 0,
  summing to less than 1) are never flagged, nor is ``K == 1``; logits only
  by chance (every row within [0, 1] and summing to 1). The sum may be
  ``max(1e-3, 4 eps)`` off 1 (``eps`` of the outputs' dtype: 0.03 for bfloat16).
  """
  k = outputs.shape[-1]
  if k < 2:
    return jnp.zeros(outputs.shape[:1], bool)
  tol = max(1e-3, 4 * float(jnp.finfo(outputs.dtype).eps)) if jnp.issubdtype(
      outputs.dtype, jnp.floating) else 1e-3
  x = outputs.astype(jnp.float32)
  rows = (jnp.all((x >= 0) & (x <= 1), axis=-1)
          & (jnp.abs(jnp.sum(x, axis=-1) - 1) <= tol))
  return jnp.all(rows.reshape(rows.shape[0], -1), axis=1)


PROBABILITIES_ERROR = (
    "every row of the model's outputs lies in [0, 1] and sums to 1: these look like "
    "probabilities, but the task takes logits (or log-probabilities). Drop the final softmax, or "
    "pass its logarithm: safer_jax.wrap(model, variables, output=jnp.log).")


@_frozen_args
def classification(inputs: Any = "image", label: str = "label") -> Task:
  """Classifiers: mean cross-entropy (nats) and accuracy; ``logits (B, K)``, ``labels (B,)`` int.

  Outputs that are probabilities (a final softmax, :func:`looks_like_probabilities`
  on every example) are refused with a ``ValueError`` after the first compiled
  call (see :attr:`Task.suspect`); log-probabilities are valid logits.
  """

  def loss(logits, batch):
    return cross_entropy(logits, batch[label])

  def accuracy(logits, batch):
    return (jnp.argmax(logits, -1) == batch[label]).astype(jnp.float32)

  def check(logits, batch):
    _check_labels(logits, batch[label], "classification", 2)

  def suspect(logits, batch):
    del batch
    return looks_like_probabilities(logits)

  return Task("classification", loss, _freeze(inputs), {"accuracy": accuracy}, needs=(label,),
              check=check, suspect=suspect, suspect_error=PROBABILITIES_ERROR,
              ground_truth="accuracy_drop")


def _token_weights(mask_key):
  def weight(batch):
    m = batch[mask_key].astype(jnp.float32)
    return jnp.sum(m.reshape(m.shape[0], -1), axis=1)
  return weight


def _masked_mean(values, batch, mask_key):
  """Per-example mean of ``values (B, ...)`` over the positions ``batch[mask_key]`` keeps."""
  values = values.reshape(values.shape[0], -1)
  if mask_key is None:
    return jnp.mean(values, axis=1)
  m = batch[mask_key].astype(values.dtype).reshape(values.shape[0], -1)
  count = jnp.sum(m, axis=1)
  return jnp.where(count > 0, jnp.sum(values * m, axis=1) / jnp.maximum(count, 1), 0.0)


@_frozen_args
def token_cross_entropy(inputs: Any = "tokens", targets: str = "targets",
                        mask: str | None = "mask") -> Task:
  """Language models: token-level cross-entropy (nats/token) with a padding mask.

  ``logits (B, T, V)``, ``batch[targets] (B, T)`` int, ``batch[mask] (B, T)``
  (1 = a real target token; None: every token counts). Each example weighs
  its number of real tokens, so a split's loss is the mean over all its
  tokens; ``perplexity`` = exp(loss) is reported by ``evaluate``, and
  ``token_accuracy`` (next token right) is a metric.
  """

  def kept_targets(batch):  # padding targets (e.g. -100) read as 0: masked out anyway
    t = batch[targets]
    return t if mask is None else jnp.where(batch[mask] > 0, t, 0)

  def loss(logits, batch):
    return _masked_mean(cross_entropy(logits, kept_targets(batch)), batch, mask)

  def token_accuracy(logits, batch):
    right = (jnp.argmax(logits, -1) == kept_targets(batch)).astype(jnp.float32)
    return _masked_mean(right, batch, mask)

  def check(logits, batch):
    kept = batch[targets] if mask is None else np.asarray(batch[targets])[
        np.asarray(batch[mask]) > 0]
    _check_labels(logits, kept, "token_cross_entropy", np.ndim(batch[targets]) + 1)

  return Task("token_cross_entropy", loss, _freeze(inputs), {"token_accuracy": token_accuracy},
              weight=None if mask is None else _token_weights(mask),
              needs=(targets,) + (() if mask is None else (mask,)), check=check,
              derived={"perplexity": lambda m: float(np.exp(m["loss"]))})


@_frozen_args
def mse(inputs: Any = "x", target: str = "y") -> Task:
  """Regression: per-example mean squared error over the output's non-batch axes."""

  def loss(outputs, batch):
    y = batch[target]
    return _masked_mean(jnp.square(outputs - y.reshape(outputs.shape).astype(outputs.dtype)),
                        batch, None)

  def check(outputs, batch):
    y = np.asarray(batch[target])
    if not hasattr(outputs, "shape") or int(np.prod(outputs.shape[1:])) != int(
        np.prod(y.shape[1:])):
      raise ValueError(f"mse: outputs of shape {tuple(np.shape(outputs))} for targets of shape "
                       f"{y.shape}; they must hold as many values.")

  return Task("mse", loss, _freeze(inputs), needs=(target,), check=check,
              derived={"rmse": lambda m: float(np.sqrt(m["loss"]))})


@_frozen_args
def kl_to_reference(inputs: Any = "image", mask: str | None = None) -> Task:
  """Label-free: KL(p_float || p_model) in nats, over the last (class/vocab) axis.

  ``batch['reference']`` holds the float model's logits (:func:`add_reference`);
  the KL is averaged over the other non-batch axes (positions kept by
  ``batch[mask]`` for a sequence model, which then weighs its token count).
  0 for the unperturbed model. ``agreement``: the top-1 class (token) equals
  the float model's.
  """

  def loss(logits, batch):
    ref = jax.nn.log_softmax(batch[REFERENCE].astype(jnp.float32))
    log_q = jax.nn.log_softmax(logits.astype(jnp.float32))
    kl = jnp.sum(jnp.exp(ref) * (ref - log_q), axis=-1)
    return _masked_mean(kl, batch, mask)

  def agreement(logits, batch):
    same = (jnp.argmax(logits, -1) == jnp.argmax(batch[REFERENCE], -1)).astype(jnp.float32)
    return _masked_mean(same, batch, mask)

  def check(logits, batch):
    if tuple(np.shape(logits))[1:] != tuple(np.shape(batch[REFERENCE]))[1:]:
      raise ValueError(f"kl_to_reference: outputs of shape {tuple(np.shape(logits))[1:]} per "
                       f"example but the reference outputs are "
                       f"{tuple(np.shape(batch[REFERENCE]))[1:]}.")

  return Task("kl_to_reference", loss, _freeze(inputs), {"agreement": agreement},
              weight=None if mask is None else _token_weights(mask),
              needs=(REFERENCE,) + (() if mask is None else (mask,)), check=check)


PRESETS = {"classification": classification, "token_cross_entropy": token_cross_entropy,
           "mse": mse, "kl_to_reference": kl_to_reference}


def _freeze(inputs: Any) -> Any:
  if isinstance(inputs, list):
    return tuple(inputs)
  if isinstance(inputs, Mapping):
    return _FrozenDict(inputs)
  return inputs


class _FrozenDict(dict):
  """A dict usable as an ``lru_cache`` key (preset arguments)."""

  def __hash__(self):
    return hash(tuple(sorted(self.items())))


def get(task: Task | str | None) -> Task:
  """A task: ``None`` -> :func:`classification`; a preset name -> that preset's defaults.

  Raises:
    ValueError: an unknown name (lists the presets) or another type.
  """
  if task is None:
    return classification()
  if isinstance(task, Task):
    return task
  if isinstance(task, str):
    if task not in PRESETS:
      raise ValueError(f"Unknown task {task!r}; presets: {sorted(PRESETS)} (or a "
                       f"safer_jax.core.tasks.Task).")
    return PRESETS[task]()
  raise ValueError(f"task must be a safer_jax.core.tasks.Task, a preset name {sorted(PRESETS)} or "
                   f"None; got a {type(task).__name__}.")


# ---------------------------------------------------------------------------------------------
# Batches.
# ---------------------------------------------------------------------------------------------


def padded_batches(split: Any, batch_size: int, *, rows: int | None = None):
  """``(batch dict, mask (B,) float32)`` of ``split``, every batch ``min(batch_size, N)`` rows.

  The last batch is zero padded (every array) and masked. ``rows``: the rows of
  every batch instead (>= ``min(batch_size, N)``, e.g. rounded up to a multiple
  of the device count), the extra ones padded and masked too.
  """
  n = len(split)
  step = min(batch_size, n)
  bs = step if rows is None else rows
  for lo in range(0, n, step):
    batch = split.batch(lo, lo + step)
    m = min(step, n - lo)
    mask = np.zeros((bs,), np.float32)
    mask[:m] = 1.0
    if m < bs:
      batch = {k: np.concatenate([v, np.zeros((bs - m, *v.shape[1:]), v.dtype)])
               for k, v in batch.items()}
    yield batch, mask


@functools.partial(jax.jit, static_argnums=(0, 1))
def _outputs(apply, task, variables, batch):
  return forward(apply, variables, task.model_inputs(batch))


def add_reference(model: Any, variables: Any, split: Any, task: Task | None = None, *,
                  batch_size: int = 256) -> Any:
  """``split`` with a ``'reference'`` array: the (float) model's outputs on every example.

  What :func:`kl_to_reference` compares a perturbed model with. Run it with the
  unperturbed model; the split then serves every later evaluation.

  Args:
    model: a model or apply function (see :func:`safer_jax.wrap`).
    variables: its variables (None for a wrapped or nnx model).
    split: a :class:`~safer_jax.core.data.Split` holding the task's inputs.
    task: says which arrays are the inputs (default :func:`kl_to_reference`'s
      ``'image'``).
    batch_size: examples per compiled forward.

  Returns:
    A new split with ``reference`` float32 ``(N, ...)`` (the outputs' shape).
  """
  from safer_jax.core import wrapping  # pylint: disable=import-outside-toplevel
  task = kl_to_reference() if task is None else get(task)
  model, variables = wrapping.as_model(model, variables)
  apply = model.apply if hasattr(model, "apply") else model
  outs = []
  for batch, mask in padded_batches(split, batch_size):
    batch = {k: v for k, v in batch.items() if k != REFERENCE}
    out = np.asarray(_outputs(apply, task, variables, batch), np.float32)
    outs.append(out[:int(mask.sum())])
  return split.with_arrays(**{REFERENCE: np.concatenate(outs)})


def prepare_split(task: Task, model: Any, variables: Any, split: Any, what: str = "split",
                  batch_size: int = 256) -> Any:
  """``split`` ready for ``task``: reference outputs added when the task needs them and it has none.

  Used by entry points that hold the float model (the sweep, cost tables,
  search): the reference is the model they were given.
  """
  arrays = getattr(split, "arrays", {})
  if REFERENCE in task.needs and REFERENCE not in arrays:
    split = add_reference(model, variables, split, task, batch_size=batch_size)
  task.validate_split(split, what)
  return split


def check_outputs(model: Any, variables: Any, split: Any, task: Task) -> None:
  """Runs ``task.check`` on the model's outputs before any work (nothing computed).

  The outputs' shapes come from one traced forward of one example (cached per
  model, task, weight shapes and input shapes: a new split of the same shapes
  costs only the host-side checks); the check reads the whole split's arrays.
  Catches nonsense: labels out of the logits' range, logits of the wrong rank,
  an output object where logits are expected.

  Raises:
    ValueError: from the task's check (naming the values and what is allowed).
  """
  if task.check is None:
    return
  apply = model.apply if hasattr(model, "apply") else model
  batch = split.as_batch() if hasattr(split, "as_batch") else dict(split)
  one = task.model_inputs({k: v[:1] for k, v in batch.items()})
  try:
    key = (apply, task, signature(variables), signature(one, per_example=True))
    out = _shapes.get(key)
  except TypeError:  # (an unhashable model: traced every time)
    key, out = None, None
  if out is None:
    try:
      out = jax.eval_shape(lambda v, x: forward(apply, v, x), variables, one)
    except TypeError as e:
      if "not a valid JAX type" not in str(e):
        raise
      raise ValueError(f"{task.name}: the model returns an object JAX cannot hold ({e}); pick "
                       f"the array out of it with safer_jax.wrap(model, variables, "
                       f"output=lambda out: out.logits).") from None
    if key is not None:
      if len(_shapes) > 256:
        _shapes.clear()
      _shapes[key] = out
  task.check(out, batch)


_shapes: dict = {}  # check_outputs: (model, task, shapes) -> the outputs' ShapeDtypeStruct tree
caches.register(_shapes.clear)
caches.register(_outputs.clear_cache)  # (compiled per model: the model is a static argument)


