"""CIFAR-style ResNet (He et al. 2016, §4.2): 6n+2 layers, widths 16/32/64.

Layers: ``stem/conv``; per block ``stage{s}_block{b}/conv1``, ``.../conv2`` and,
where the shape changes, ``.../shortcut`` (1x1 conv); ``head/fc``. Every conv is
followed by BatchNorm (``bn1``, ``bn2``, ``shortcut_bn``, ``stem/bn``).
"""

from __future__ import annotations

import functools

import flax.linen as nn

from safer_jax.zoo.models import common


class BasicBlock(nn.Module):
  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x, train=False):
    y = common.Conv(self.features, (3, 3), strides=self.strides, padding="SAME", use_bias=False,
                name="conv1")(x)
    y = nn.relu(common.batch_norm(train, "bn1")(y))
    y = common.Conv(self.features, (3, 3), padding="SAME", use_bias=False, name="conv2")(y)
    y = common.batch_norm(train, "bn2")(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = common.Conv(self.features, (1, 1), strides=self.strides, use_bias=False,
                  name="shortcut")(x)
      x = common.batch_norm(train, "shortcut_bn")(x)
    return nn.relu(x + y)


class ResNet(common.StagedModel):
  """``depth`` = 6n + 2 (8, 14, 20, 32, ...)."""
  num_classes: int = 10
  depth: int = 8
  widths: tuple[int, int, int] = (16, 32, 64)

  def stage_specs(self):
    if (self.depth - 2) % 6 != 0 or self.depth < 8:
      raise ValueError(f"ResNet depth={self.depth} must be 6n+2 with n >= 1 (8, 14, 20, ...).")
    n = (self.depth - 2) // 6
    specs = [("stem", functools.partial(common.ConvBN, self.widths[0]))]
    for s, width in enumerate(self.widths):
      for b in range(n):
        strides = 2 if (s > 0 and b == 0) else 1
        specs.append((f"stage{s + 1}_block{b + 1}",
                      functools.partial(BasicBlock, width, strides)))
    specs.append(("head", functools.partial(common.PoolHead, self.num_classes)))
    return specs
