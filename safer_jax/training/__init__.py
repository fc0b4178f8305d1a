"""Training and evaluating models.

* :mod:`~safer_jax.training.train` -- :func:`~safer_jax.training.train.train`
  (``safer_jax.fit``), :func:`~safer_jax.training.train.evaluate`, initialisation,
  fine-tuning, BatchNorm recalibration and the criteria's
  :func:`~safer_jax.training.train.task_loss_fn`;
* :mod:`~safer_jax.training.acr` -- adversarial corruption-resistant training.

Imports :mod:`safer_jax.core` only.
"""

from safer_jax.training import acr, train

__all__ = ["acr", "train"]
