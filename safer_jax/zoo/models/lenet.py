"""LeNet-style CNN: ``conv1/conv``, ``conv2/conv``, ``dense1/fc``, ``head/fc``."""

from __future__ import annotations

import functools

from safer_jax.zoo.models import common


class LeNet(common.StagedModel):
  num_classes: int = 10
  channels: tuple[int, int] = (16, 32)
  hidden: int = 64

  def stage_specs(self):
    return [
        ("conv1", functools.partial(common.ConvPool, self.channels[0])),
        ("conv2", functools.partial(common.ConvPool, self.channels[1])),
        ("dense1", functools.partial(common.DenseAct, self.hidden)),
        ("head", functools.partial(common.DenseAct, self.num_classes, relu=False)),
    ]
