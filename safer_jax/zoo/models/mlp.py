"""Multi-layer perceptron: layers ``dense1/fc``, ``dense2/fc``, ``head/fc``."""

from __future__ import annotations

import functools
from collections.abc import Sequence

from safer_jax.zoo.models import common


class MLP(common.StagedModel):
  num_classes: int = 10
  hidden: Sequence[int] = (128, 64)

  def stage_specs(self):
    specs = [(f"dense{i + 1}", functools.partial(common.DenseAct, width))
             for i, width in enumerate(self.hidden)]
    specs.append(("head", functools.partial(common.DenseAct, self.num_classes, relu=False)))
    return specs
