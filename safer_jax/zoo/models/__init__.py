"""The model zoo: Flax models selected by name, with stable, explicit layer names.

>>> model = get_model('resnet8', num_classes=10)
>>> variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
>>> logits = model.apply(variables, images)            # eval mode, (B, num_classes)
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn

from safer_jax.zoo.models.common import StagedModel
from safer_jax.zoo.models.imagenet import TorchMobileNetV2, TorchResNet
from safer_jax.zoo.models.lenet import LeNet
from safer_jax.zoo.models.lm import TransformerLM, lm_tiny
from safer_jax.zoo.models.mlp import MLP
from safer_jax.zoo.models.mobilenet import MobileNetV2
from safer_jax.zoo.models.resnet import ResNet
from safer_jax.zoo.models.vit import ViT

MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "lenet": LeNet,
    "resnet8": functools.partial(ResNet, depth=8),
    "resnet20": functools.partial(ResNet, depth=20),
    "mobilenet_v2": MobileNetV2,
    "vit_tiny": ViT,
    "resnet18": functools.partial(TorchResNet, depth=18),
    "resnet34": functools.partial(TorchResNet, depth=34),
    "resnet50": functools.partial(TorchResNet, depth=50),
    "mobilenet_v2_imagenet": TorchMobileNetV2,
    "lm_tiny": lm_tiny,  # causal byte-level LM: num_classes = vocab size (safer_jax.zoo.text)
}
# torchvision-compatible ImageNet architectures (safer_jax.zoo.models.imagenet): weights convert
# from torchvision state dicts (safer_jax.zoo.convert); too large to train on the embedded digits.
IMAGENET_MODELS = ("resnet18", "resnet34", "resnet50", "mobilenet_v2_imagenet")
# Language models (safer_jax.zoo.models.lm): token ids (B, T) in, logits (B, T, vocab) out; trained
# on a text corpus (safer_jax.zoo.text), not on images.
TEXT_MODELS = ("lm_tiny",)
ALIASES = {"resnet": "resnet8"}


def list_models() -> list[str]:
  return sorted(MODELS)


def get_model(name: str, num_classes: int = 10, **kwargs) -> nn.Module:
  """Returns an (uninitialised) zoo model by name.

  Args:
    name: one of :func:`list_models` (``'resnet'`` is an alias of ``'resnet8'``).
    num_classes: size of the output layer.
    **kwargs: model fields (e.g. ``hidden=(256,)`` for ``'mlp'``).

  Raises:
    ValueError: unknown name (the message lists the valid names).
  """
  key = ALIASES.get(name, name)
  if key not in MODELS:
    raise ValueError(f"Unknown model {name!r}; valid names: {list_models()} "
                     f"(aliases: {ALIASES}).")
  return MODELS[key](num_classes=num_classes, **kwargs)


__all__ = ["MODELS", "get_model", "list_models", "StagedModel", "MLP", "LeNet", "ResNet",
           "MobileNetV2", "TransformerLM", "ViT", "IMAGENET_MODELS", "TEXT_MODELS", "TorchResNet", "TorchMobileNetV2"]
