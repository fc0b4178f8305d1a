"""Adversarial corruption-resistant (ACR) training (Zhang et al., AAAI 2021, arXiv 2006.05620).

Each training step:

1. Clean pass at the weights ``w`` in train mode: loss, gradient ``g_clean``
   and the new BatchNorm statistics (the *only* state update of the step).
2. Worst corruption ``a*`` of the kernels within the eps-ball
   ``||a||_p <= eps * ||W||_p`` (relative radius), per layer (one ball per
   kernel) or global (one ball for all kernels flattened together): the
   first-order closed form (``steps = 0``,
   :func:`safer_jax.core.perturb.corruption_direction`) or ``steps`` of projected
   gradient ascent from it (:func:`safer_jax.core.norms.project`),
   keeping the best iterate.
3. ``g_adv = grad_w L(w + a*)`` with ``a*`` held fixed (train mode; the batch
   statistics computed at ``w + a*`` are discarded).
4. ``g = (1 - mix) * g_clean + mix * g_adv`` and an optax update of the clean
   weights ``w``.

Only kernels are corrupted (biases and BatchNorm scales are not). The
``warmup_epochs`` first epochs use the plain step of
:func:`safer_jax.training.train.make_train_step` with the same optimizer, so ACR and
plain training see the same data order and number of steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from safer_jax.core import data as data_lib
from safer_jax.core import layers as layers_lib
from safer_jax.core import norms
from safer_jax.core import wrapping
from safer_jax.core.errors import check_nonneg_float
from safer_jax.core.perturb import corruption_direction
from safer_jax.training import train as train_lib

Kernels = Mapping[str, jax.Array]
SCOPES = ("layer", "global")


@dataclasses.dataclass(frozen=True)
class ACRConfig:
  """Options of ACR training.

  Attributes:
    eps: corruption radius relative to ``||W||_p`` (per layer, or of all
      kernels together for ``scope='global'``); >= 0.
    p: norm of the ball, 2 or inf (``'inf'``); 1 also works.
    steps: K, projected-ascent steps after the closed-form start (0: closed form).
    step_size: ascent step as a fraction of the radius.
    mix: lambda in [0, 1]; ``g = (1 - mix) g_clean + mix g_adv``.
    scope: ``'layer'`` (one ball per kernel) or ``'global'``.
    warmup_epochs: epochs of plain training before ACR starts.
    n_sparse: optional maximum number of corrupted weights per ball.
  """
  eps: float = 0.05
  p: Any = 2
  steps: int = 0
  step_size: float = 0.25
  mix: float = 0.5
  scope: str = "layer"
  warmup_epochs: int = 0
  n_sparse: int | None = None

  def __post_init__(self):
    norms.normalize_p(self.p)
    check_nonneg_float("eps", self.eps)
    check_nonneg_float("step_size", self.step_size)
    if isinstance(self.steps, bool) or int(self.steps) != self.steps or self.steps < 0:
      raise ValueError(f"steps={self.steps!r} must be a non-negative integer.")
    if not 0.0 <= float(self.mix) <= 1.0:
      raise ValueError(f"mix={self.mix!r} must be in [0, 1].")
    if self.scope not in SCOPES:
      raise ValueError(f"Unknown scope {self.scope!r}; valid scopes: {list(SCOPES)}")
    if self.warmup_epochs < 0:
      raise ValueError(f"warmup_epochs={self.warmup_epochs!r} must be >= 0.")
    norms.check_sparsity(self.n_sparse, "n_sparse")


class Corruption(NamedTuple):
  """Outcome of :func:`adversarial_corruption`.

  Attributes:
    corruption: ``{layer: a}``, same shapes as the kernels.
    loss: the loss at the returned corruption (the best iterate).
    start_loss: the loss at the closed-form start.
    losses: ``(steps + 1,)`` loss of every iterate ``a_0 .. a_K``.
  """
  corruption: dict[str, jax.Array]
  loss: jax.Array
  start_loss: jax.Array
  losses: jax.Array


def _groups(tree: Kernels, scope: str):
  """``({group: array}, ungroup)``: the kernels per layer, or all raveled into ``'all'``."""
  if scope == "layer":
    return dict(tree), dict
  flat, unravel = ravel_pytree(dict(tree))
  return {"all": flat}, lambda g: unravel(g["all"])


def corruption_radius(kernels: Kernels, eps: float, p: Any = 2,
                      scope: str = "layer") -> dict[str, jax.Array]:
  """Absolute radii ``eps * ||W||_p``: ``{layer: r}`` or ``{'all': r}`` (weight units)."""
  p = norms.normalize_p(p)
  groups, _ = _groups(kernels, scope)
  return {k: eps * norms.vector_norm(w, p) for k, w in groups.items()}


def first_order_corruption(grads: Kernels, kernels: Kernels, *, eps: float, p: Any = 2,
                           scope: str = "layer",
                           n_sparse: int | None = None) -> dict[str, jax.Array]:
  """Closed-form maximiser of ``<g, a>`` in the ball(s), e.g. ``eps ||W||_2 g / ||g||_2``.

  Args:
    grads: ``{layer: dL/dW}``, same shapes as ``kernels``.
    kernels: ``{layer: W}``.
    eps: relative radius (>= 0).
    p: 1, 2 or inf.
    scope: ``'layer'`` (a ball per kernel) or ``'global'`` (one ball).
    n_sparse: at most this many non-zeros per ball.

  Returns:
    ``{layer: a}`` with ``||a||_p = eps ||W||_p`` per ball (unless g = 0).
    Works under ``jax.jit``.
  """
  p = norms.normalize_p(p)
  gg, _ = _groups(grads, scope)
  ww, ungroup = _groups(kernels, scope)
  radii = corruption_radius(kernels, eps, p, scope)
  return ungroup({k: corruption_direction(gg[k], radii[k], p=p, n_sparse=n_sparse) for k in ww})


def adversarial_corruption(loss_of_corruption: Callable[[Kernels], jax.Array], kernels: Kernels,
                           *, eps: float, p: Any = 2, steps: int = 0, step_size: float = 0.25,
                           scope: str = "layer", n_sparse: int | None = None,
                           grads: Kernels | None = None) -> Corruption:
  """Worst corruption of ``kernels`` in the eps-ball(s): closed form + ``steps`` of PGA.

  ``a_0`` is the first-order maximiser; ``a_{t+1} = Proj(a_t + d_t)`` where
  ``d_t`` is the steepest-ascent step of length ``step_size * radius`` for the
  p-norm (normalised gradient for p=2, sign for p=inf) and ``Proj`` the exact
  projection onto the ball (``n_sparse`` included). The iterate of largest loss
  is returned, so the result is never worse than the start and never leaves the
  ball (up to float rounding). Works under ``jax.jit`` (``steps`` is unrolled).

  Args:
    loss_of_corruption: ``f({layer: a}) -> scalar`` loss at ``W + a``.
    kernels: ``{layer: W}`` (only their norms are used).
    eps, p, scope, n_sparse: see :func:`first_order_corruption`.
    steps: number of ascent steps K >= 0.
    step_size: step length, fraction of the radius.
    grads: optional ``grad f`` at ``a = 0`` (saves one backward pass).

  Returns:
    A :class:`Corruption`. COST: ``steps + 1`` forward+backward passes (+1
    backward without ``grads``).
  """
  p = norms.normalize_p(p)
  kernels = dict(kernels)
  value_and_grad = jax.value_and_grad(loss_of_corruption)
  if grads is None:
    grads = jax.grad(loss_of_corruption)({k: jnp.zeros_like(w) for k, w in kernels.items()})
  radii = corruption_radius(kernels, eps, p, scope)
  a = first_order_corruption(grads, kernels, eps=eps, p=p, scope=scope, n_sparse=n_sparse)
  a = _project(a, radii, p, scope, n_sparse)
  best_a, best_loss, losses = a, None, []
  for t in range(steps + 1):
    if t < steps:
      loss, ga = value_and_grad(a)
    else:
      loss = loss_of_corruption(a)
    losses.append(loss)
    if best_loss is None:
      best_a, best_loss = a, loss
    else:
      better = loss > best_loss
      best_a = jax.tree.map(lambda x, y: jnp.where(better, x, y), a, best_a)
      best_loss = jnp.where(better, loss, best_loss)
    if t < steps:
      aa, ungroup = _groups(a, scope)
      gg, _ = _groups(ga, scope)
      a = ungroup({k: aa[k] + corruption_direction(gg[k], step_size * radii[k], p=p)
                   for k in aa})
      a = _project(a, radii, p, scope, n_sparse)
  return Corruption(best_a, best_loss, losses[0], jnp.stack(losses))


def _project(a, radii, p, scope, n_sparse):
  aa, ungroup = _groups(a, scope)
  return ungroup({k: norms.project(aa[k], radii[k], p, n_sparse) for k in aa})


def add_corruption(params: Any, corruption: Kernels) -> Any:
  """``params`` with ``kernel <- kernel + corruption[layer]`` for each layer (pure)."""
  return layers_lib.map_kernels(params, lambda _, w, a: w + a, corruption)


def _train_loss(model: nn.Module):
  """``f(params, state, images, labels) -> (mean CE, new_state)`` in train mode."""

  forward = wrapping.training_apply(model)

  def f(params, state, images, labels):
    logits, new_state = forward({"params": params, **state}, images)
    return jnp.mean(train_lib.cross_entropy(logits, labels)), dict(new_state)

  return f


def acr_gradients(model: nn.Module, variables: Mapping[str, Any], images: jax.Array,
                  labels: jax.Array, config: ACRConfig) -> tuple[Any, dict, dict[str, jax.Array]]:
  """The mixed ACR gradient of one batch.

  Args:
    model: Flax module called as ``model.apply(variables, x, train=True)``.
    variables: ``params`` and any state collections (``batch_stats``).
    images: ``(B, H, W, C)`` float32.
    labels: ``(B,)`` int.
    config: an :class:`ACRConfig`.

  Returns:
    ``(grads, new_state, metrics)``: the params-shaped gradient
    ``(1 - mix) g_clean + mix g_adv``, the state from the clean train-mode pass,
    and ``{'loss': clean loss, 'adv_loss': loss at w + a*}`` (nats).
  """
  params = variables["params"]
  state = {k: v for k, v in variables.items() if k != "params"}
  f = _train_loss(model)
  (loss, new_state), g_clean = jax.value_and_grad(f, has_aux=True)(params, state, images, labels)
  names = layers_lib.find_layers(params)
  kernels = layers_lib.get_kernels(params, names)
  kgrads = layers_lib.get_kernels(g_clean, names)

  def loss_of_corruption(a):
    return f(add_corruption(params, a), state, images, labels)[0]

  adv = adversarial_corruption(loss_of_corruption, kernels, eps=config.eps, p=config.p,
                               steps=int(config.steps), step_size=config.step_size,
                               scope=config.scope, n_sparse=config.n_sparse, grads=kgrads)
  a = jax.lax.stop_gradient(adv.corruption)
  adv_loss, g_adv = jax.value_and_grad(
      lambda q: f(add_corruption(q, a), state, images, labels)[0])(params)
  mix = config.mix
  grads = jax.tree.map(lambda c, d: (1.0 - mix) * c + mix * d, g_clean, g_adv)
  return grads, new_state, {"loss": loss, "adv_loss": adv_loss}


def make_acr_step(model: nn.Module, tx: optax.GradientTransformation, config: ACRConfig):
  """Returns a jitted ``step(variables, opt_state, images, labels) -> (vars, opt_state, loss)``.

  Same signature as :func:`safer_jax.training.train.make_train_step` (``loss`` is the
  clean loss), so the two steps share one optimizer state.
  """

  @jax.jit
  def step(variables, opt_state, images, labels):
    params = variables["params"]
    grads, new_state, metrics = acr_gradients(model, variables, images, labels, config)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return {"params": params, **new_state}, opt_state, metrics["loss"]

  return step


def train_acr(model: nn.Module, dataset: data_lib.Dataset,
              config: train_lib.TrainConfig = train_lib.TrainConfig(),
              acr: ACRConfig = ACRConfig(), *, progress: bool = True,
              variables: Mapping[str, Any] | None = None) -> tuple[dict, dict]:
  """ACR training; identical to :func:`safer_jax.training.train.train` except for the step.

  Same optimizer (:func:`safer_jax.training.train.make_optimizer`), init, data order and
  number of steps as plain training with the same ``config``; the first
  ``acr.warmup_epochs`` epochs use the plain step.

  Args:
    model: a Flax module.
    dataset: a :class:`~safer_jax.core.data.Dataset`.
    config: training hyper-parameters (epochs, batch size, lr, seed).
    acr: ACR options.
    progress: print a progress line per epoch.
    variables: start from these instead of a fresh init.

  Returns:
    ``(variables, history)`` with per-epoch ``train_loss``, ``train_seconds``
    and the final ``eval`` metrics.
  """
  def make_steps(net, tx):
    plain_step = train_lib.make_train_step(net, tx)
    acr_step = make_acr_step(net, tx, acr)
    return lambda epoch: plain_step if epoch < acr.warmup_epochs else acr_step

  return train_lib.train(model, dataset, config, progress=progress, variables=variables,
                         make_steps=make_steps, label="acr")
