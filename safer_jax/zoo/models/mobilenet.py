"""MobileNetV2 (Sandler et al. 2018), narrowed for small images.

Inverted residual blocks ``block{i}`` with layers ``expand`` (1x1), ``depthwise``
(3x3, one group per channel: kernel ``(3, 3, 1, C)``) and ``project`` (1x1,
linear), each followed by BatchNorm; residual when stride 1 and widths match.
Depthwise convolutions are a known quantization-sensitive case (few weights per
output channel, wide per-channel ranges).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn

from safer_jax.zoo.models import common

# (expansion t, output channels c, repeats n, first stride s), as in the paper's Table 2.
SMALL_CONFIG = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 2), (6, 64, 1, 1))


class InvertedResidual(nn.Module):
  features: int
  expansion: int
  strides: int = 1

  @nn.compact
  def __call__(self, x, train=False):
    hidden = x.shape[-1] * self.expansion
    y = x
    if self.expansion != 1:
      y = common.Conv(hidden, (1, 1), use_bias=False, name="expand")(y)
      y = nn.relu6(common.batch_norm(train, "expand_bn")(y))
    y = common.Conv(hidden, (3, 3), strides=self.strides, padding="SAME", feature_group_count=hidden,
                use_bias=False, name="depthwise")(y)
    y = nn.relu6(common.batch_norm(train, "depthwise_bn")(y))
    y = common.Conv(self.features, (1, 1), use_bias=False, name="project")(y)
    y = common.batch_norm(train, "project_bn")(y)
    if self.strides == 1 and x.shape[-1] == self.features:
      y = x + y
    return y


class MobileNetV2(common.StagedModel):
  num_classes: int = 10
  stem_width: int = 16
  blocks: Sequence[tuple[int, int, int, int]] = SMALL_CONFIG
  last_width: int = 128

  def stage_specs(self):
    specs = [("stem", functools.partial(common.ConvBN, self.stem_width, act="relu6"))]
    i = 0
    for t, c, n, s in self.blocks:
      for r in range(n):
        i += 1
        specs.append((f"block{i}", functools.partial(InvertedResidual, c, t, s if r == 0 else 1)))
    specs.append(("last", functools.partial(common.ConvBN, self.last_width, (1, 1), act="relu6")))
    specs.append(("head", functools.partial(common.PoolHead, self.num_classes)))
    return specs
