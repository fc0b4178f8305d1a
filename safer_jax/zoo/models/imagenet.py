"""ImageNet-resolution models with torchvision's architectures, as staged models.

The layer layout and numerics follow ``torchvision.models`` exactly, so published
weights convert one-to-one (see :mod:`safer_jax.zoo.convert`):

* ``resnet18`` / ``resnet34`` / ``resnet50``: ResNet v1.5 (stride on the 3x3
  convolution of the bottleneck). Stages ``stem`` (layers ``stem/conv``,
  ``stem/bn``: 7x7/2 conv + BN + ReLU + 3x3/2 max-pool), ``layer{i}_block{j}``
  (layers ``conv1``/``bn1``, ``conv2``/``bn2``, ``conv3``/``bn3`` for the
  bottleneck, and ``downsample``/``downsample_bn`` (1x1 conv + BN) where the shape
  changes) and ``head`` (global average pool + ``head/fc``).
* ``mobilenet_v2_imagenet``: MobileNetV2 width 1.0. Stages ``stem`` (3x3/2 conv,
  32 channels), ``block1`` .. ``block17`` (layers ``expand``, ``depthwise``,
  ``project`` each with ``<layer>_bn``; no ``expand`` in ``block1``, t = 1),
  ``last`` (1x1 conv to 1280) and ``head`` (``head/fc``; torchvision's dropout is
  an identity in eval mode and is left out).

Every convolution pads explicitly as PyTorch does (``padding=k // 2`` on each
side) rather than ``'SAME'``, which pads asymmetrically for stride 2 and would
shift the sampling grid by one pixel. Max-pooling pads with ``-inf``. BatchNorm
uses epsilon 1e-5. Convolutions are initialised as torchvision does (Kaiming
normal, fan-out); the models accept any input size >= 1 pixel (default
ImageNet input ``(224, 224, 3)``; tests use 32x32).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax

from safer_jax.zoo.models import common

IMAGENET_INPUT_SHAPE = (224, 224, 3)

# Kaiming normal, mode='fan_out', nonlinearity='relu' (torchvision's conv init).
_CONV_INIT = jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# Blocks per stage of torchvision's ResNets, and whether they are bottlenecks.
RESNET_LAYERS: dict[int, tuple[tuple[int, int, int, int], bool]] = {
    18: ((2, 2, 2, 2), False),
    34: ((3, 4, 6, 3), False),
    50: ((3, 4, 6, 3), True),
}

# MobileNetV2 (expansion t, output channels c, repeats n, first stride s), paper Table 2.
MOBILENET_V2_CONFIG = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                       (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def torch_padding(kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
  """PyTorch's symmetric ``padding=kernel_size // 2``: ``((top, bottom), (left, right))`` pixels."""
  p = kernel_size // 2
  return ((p, p), (p, p))


def conv(features: int, kernel_size: int, strides: int = 1, groups: int = 1,
         name: str | None = None) -> nn.Conv:
  """A bias-free square convolution padded like PyTorch.

  Its kernel is HWIO, ``(kernel_size, kernel_size, cin / groups, features)``.
  """
  return common.Conv(features, (kernel_size, kernel_size), strides=strides,
                     padding=torch_padding(kernel_size), feature_group_count=groups,
                     use_bias=False, kernel_init=_CONV_INIT, name=name)


class ResNetStem(nn.Module):
  """7x7/2 conv (``conv``, 64 channels) + BN (``bn``) + ReLU + 3x3/2 max-pool (padding 1).

  Maps ``(B, H, W, 3)`` to ``(B, ceil(ceil(H/2)/2), ceil(ceil(W/2)/2), 64)``.
  """
  features: int = 64

  @nn.compact
  def __call__(self, x, train=False):
    x = conv(self.features, 7, strides=2, name="conv")(x)
    x = nn.relu(common.batch_norm(train, "bn")(x))
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class BasicBlock(nn.Module):
  """torchvision ``BasicBlock``: 3x3 (stride) + BN + ReLU, 3x3 + BN, + shortcut, ReLU."""
  planes: int
  strides: int = 1
  expansion = 1

  @nn.compact
  def __call__(self, x, train=False):
    y = conv(self.planes, 3, self.strides, name="conv1")(x)
    y = nn.relu(common.batch_norm(train, "bn1")(y))
    y = conv(self.planes, 3, name="conv2")(y)
    y = common.batch_norm(train, "bn2")(y)
    return nn.relu(_shortcut(x, self.planes, self.strides, train) + y)


class Bottleneck(nn.Module):
  """torchvision ``Bottleneck`` (v1.5): 1x1, 3x3 (stride), 1x1 to ``4 * planes``; + shortcut."""
  planes: int
  strides: int = 1
  expansion = 4

  @nn.compact
  def __call__(self, x, train=False):
    y = conv(self.planes, 1, name="conv1")(x)
    y = nn.relu(common.batch_norm(train, "bn1")(y))
    y = conv(self.planes, 3, self.strides, name="conv2")(y)
    y = nn.relu(common.batch_norm(train, "bn2")(y))
    y = conv(self.planes * self.expansion, 1, name="conv3")(y)
    y = common.batch_norm(train, "bn3")(y)
    return nn.relu(_shortcut(x, self.planes * self.expansion, self.strides, train) + y)


def _shortcut(x, features: int, strides: int, train: bool):
  """Identity, or ``downsample`` (1x1 conv, stride) + ``downsample_bn`` where the shape changes."""
  if strides == 1 and x.shape[-1] == features:
    return x
  x = conv(features, 1, strides, name="downsample")(x)
  return common.batch_norm(train, "downsample_bn")(x)


class TorchResNet(common.StagedModel):
  """torchvision ResNet ``depth`` in (18, 34, 50) with ``num_classes`` outputs."""
  num_classes: int = 1000
  depth: int = 50

  def stage_specs(self):
    if self.depth not in RESNET_LAYERS:
      raise ValueError(f"ResNet depth={self.depth} is not supported; "
                       f"valid depths: {sorted(RESNET_LAYERS)}.")
    layers, bottleneck = RESNET_LAYERS[self.depth]
    block = Bottleneck if bottleneck else BasicBlock
    specs = [("stem", ResNetStem)]
    for i, blocks in enumerate(layers):
      planes = 64 * 2**i
      for j in range(blocks):
        strides = 2 if (i > 0 and j == 0) else 1
        specs.append((f"layer{i + 1}_block{j + 1}", functools.partial(block, planes, strides)))
    specs.append(("head", functools.partial(common.PoolHead, self.num_classes)))
    return specs


class ConvBNAct(nn.Module):
  """PyTorch-padded conv (``conv``) + BN (``bn``) + activation (``'relu6'`` or ``'relu'``)."""
  features: int
  kernel_size: int = 3
  strides: int = 1
  act: str = "relu6"

  @nn.compact
  def __call__(self, x, train=False):
    x = conv(self.features, self.kernel_size, self.strides, name="conv")(x)
    return common.activation(self.act)(common.batch_norm(train, "bn")(x))


class InvertedResidual(nn.Module):
  """torchvision ``InvertedResidual``: [1x1 expand] + 3x3 depthwise (stride) + 1x1 linear project.

  The depthwise kernel is ``(3, 3, 1, hidden)``; ``expand`` is absent when
  ``expansion == 1``; residual when ``strides == 1`` and the widths match.
  """
  features: int
  expansion: int
  strides: int = 1

  @nn.compact
  def __call__(self, x, train=False):
    hidden = int(round(x.shape[-1] * self.expansion))
    y = x
    if self.expansion != 1:
      y = conv(hidden, 1, name="expand")(y)
      y = nn.relu6(common.batch_norm(train, "expand_bn")(y))
    y = conv(hidden, 3, self.strides, groups=hidden, name="depthwise")(y)
    y = nn.relu6(common.batch_norm(train, "depthwise_bn")(y))
    y = conv(self.features, 1, name="project")(y)
    y = common.batch_norm(train, "project_bn")(y)
    if self.strides == 1 and x.shape[-1] == self.features:
      y = x + y
    return y


class TorchMobileNetV2(common.StagedModel):
  """torchvision MobileNetV2 (width 1.0 by default) with ``num_classes`` outputs."""
  num_classes: int = 1000
  stem_width: int = 32
  blocks: Sequence[tuple[int, int, int, int]] = MOBILENET_V2_CONFIG
  last_width: int = 1280

  def stage_specs(self):
    specs = [("stem", functools.partial(ConvBNAct, self.stem_width, 3, 2))]
    i = 0
    for t, c, n, s in self.blocks:
      for r in range(n):
        i += 1
        specs.append((f"block{i}", functools.partial(InvertedResidual, c, t, s if r == 0 else 1)))
    specs.append(("last", functools.partial(ConvBNAct, self.last_width, 1)))
    specs.append(("head", functools.partial(common.PoolHead, self.num_classes)))
    return specs
