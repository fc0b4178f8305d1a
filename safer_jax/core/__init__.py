"""The machinery every other part builds on; imports nothing else of safer_jax.

* :mod:`~safer_jax.core.layers` -- finding, reading and replacing layer kernels;
* :mod:`~safer_jax.core.perturb`, :mod:`~safer_jax.core.norms` -- the perturbation
  families (quantize, prune, bit flips, noise, worst-case corruption) and their norms;
* :mod:`~safer_jax.core.tasks`, :mod:`~safer_jax.core.wrapping` -- what a model is
  measured on (loss, metrics) and how any linen/nnx/apply-function model is called;
* :mod:`~safer_jax.core.data` -- :class:`~safer_jax.core.data.Dataset` /
  :class:`~safer_jax.core.data.Split` and the dataset loaders;
* :mod:`~safer_jax.core.staged` -- running a model from one of its stages;
* :mod:`~safer_jax.core.distributed` -- devices, meshes, several processes;
* :mod:`~safer_jax.core.io`, :mod:`~safer_jax.core.checkpoints` -- atomic result
  files and orbax checkpoints with checksums;
* :mod:`~safer_jax.core.errors`, :mod:`~safer_jax.core.progress` -- configuration
  errors and progress lines;
* :mod:`~safer_jax.core.caches` -- :func:`~safer_jax.core.caches.clear_caches`.
"""

from safer_jax.core import (caches, checkpoints, data, distributed, errors, io, layers, norms,
                            perturb, progress, staged, tasks, wrapping)

__all__ = ["caches", "checkpoints", "data", "distributed", "errors", "io", "layers", "norms",
           "perturb", "progress", "staged", "tasks", "wrapping"]
