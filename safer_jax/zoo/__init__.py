"""Models to measure: the architectures, their trained weights and the text corpora.

* :mod:`~safer_jax.zoo.models` -- the zoo's Flax architectures, by name;
* :mod:`~safer_jax.zoo.cache` -- :func:`pretrained`: trained once (with
  :mod:`safer_jax.training`), then restored from an orbax cache;
* :mod:`~safer_jax.zoo.convert` -- weights from torchvision state dicts and orbax
  checkpoints (:func:`from_checkpoint`);
* :mod:`~safer_jax.zoo.text` -- the language-model corpora and tokenizer.

Imports :mod:`safer_jax.core` and :mod:`safer_jax.training` only.
"""

from safer_jax.zoo import cache, convert, models, text
from safer_jax.zoo.cache import ZooEntry, from_checkpoint, pretrained

__all__ = ["cache", "convert", "models", "text", "ZooEntry", "from_checkpoint", "pretrained"]
