"""Measuring layer sensitivity (with :mod:`safer_jax.criteria`, the cheap estimates).

* :mod:`~safer_jax.measure.sweep` -- the ground truth: every layer perturbed alone,
  vectorised;
* :mod:`~safer_jax.measure.grids` -- magnitude grids calibrated per model and family;
* :mod:`~safer_jax.measure.agreement` -- rank agreement of criteria with the ground
  truth (Spearman, Kendall, top-k, bootstrap intervals);
* :mod:`~safer_jax.measure.activations` -- the sensitivity of each layer's input to
  activation quantization;
* :mod:`~safer_jax.measure.attribution` -- input attributions and Grad-CAM maps;
* :mod:`~safer_jax.measure.memory` -- the device memory a sweep needs, and chunk sizes
  that fit.

Imports :mod:`safer_jax.core` and :mod:`safer_jax.training` (evaluation) only.
"""

from safer_jax.measure import activations, agreement, attribution, grids, memory, sweep

__all__ = ["activations", "agreement", "attribution", "grids", "memory", "sweep"]
