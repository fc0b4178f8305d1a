"""Building blocks shared by the zoo, and the *staged model* protocol.

Every zoo model is a sequence of named stages (top-level submodules). Calling
``model.apply(variables, x, train=False, start=i, stop=j)`` runs stages
``i .. j-1`` only, so a sensitivity sweep that perturbs a layer inside stage
``k`` can compute the activations entering stage ``k`` once and re-run only the
suffix ``k..`` for every perturbed copy (prefix reuse). ``model.stage_names``
lists the stages; a layer path ``'stage/.../conv'`` belongs to the stage named by
its first component.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

StageSpec = tuple[str, Callable[[str], nn.Module]]


def batch_norm(train: bool, name: str) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


class StagedModel(nn.Module):
  """Base class: subclasses implement ``stage_specs()`` -> ``[(name, make_module)]``.

  Each stage module is called as ``stage(x, train)``.
  """

  def stage_specs(self) -> Sequence[StageSpec]:
    raise NotImplementedError  # abstract

  @property
  def stage_names(self) -> tuple[str, ...]:
    return tuple(name for name, _ in self.stage_specs())

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, start: int = 0,
               stop: int | None = None) -> jax.Array:
    """Runs stages ``start .. stop-1``.

    Args:
      x: images ``(B, H, W, C)`` float32 when ``start == 0``, else the
        activations entering stage ``start``.
      train: BatchNorm uses batch statistics (and updates ``batch_stats``).
      start: index of the first stage to run.
      stop: one past the last stage to run (``None``: to the end).

    Returns:
      Logits ``(B, num_classes)`` when ``stop`` is None, else the activations
      leaving stage ``stop - 1``.
    """
    specs = self.stage_specs()
    stop = len(specs) if stop is None else stop
    for name, make in specs[start:stop]:
      x = make(name=name)(x, train)
    return x


class DenseAct(nn.Module):
  """Flatten + ``Dense(features)`` (layer ``<stage>/fc``) + optional ReLU."""
  features: int
  relu: bool = True

  @nn.compact
  def __call__(self, x, train=False):
    del train
    x = x.reshape((x.shape[0], -1))
    x = nn.Dense(self.features, name="fc")(x)
    return nn.relu(x) if self.relu else x


class ConvPool(nn.Module):
  """``Conv 3x3`` (layer ``<stage>/conv``) + ReLU + 2x2 max-pool when the map is ≥ 4 wide."""
  features: int

  @nn.compact
  def __call__(self, x, train=False):
    del train
    x = nn.relu(nn.Conv(self.features, (3, 3), padding="SAME", name="conv")(x))
    if x.shape[1] >= 4 and x.shape[2] >= 4:
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    return x


class ConvBN(nn.Module):
  """``Conv`` (``<stage>/conv``, no bias) + BatchNorm (``<stage>/bn``) + activation."""
  features: int
  kernel_size: tuple[int, int] = (3, 3)
  strides: int = 1
  groups: int = 1
  act: str = "relu"  # 'relu', 'relu6' or 'none'

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(self.features, self.kernel_size, strides=self.strides, padding="SAME",
                feature_group_count=self.groups, use_bias=False, name="conv")(x)
    x = batch_norm(train, "bn")(x)
    return activation(self.act)(x)


class PoolHead(nn.Module):
  """Global average pool + ``Dense(num_classes)`` (layer ``<stage>/fc``)."""
  num_classes: int

  @nn.compact
  def __call__(self, x, train=False):
    del train
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="fc")(x)


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  return {"relu": nn.relu, "relu6": nn.relu6, "none": lambda x: x}[name]
