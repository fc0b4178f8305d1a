"""Config fields and helpers shared by experiments."""

from __future__ import annotations

import ast

import ml_collections

from safer_jax import data, zoo


def base_config(**fields) -> ml_collections.ConfigDict:
  """Fields every experiment has: model, dataset, seed, data_dir, cache_dir, checkpoint.

  ``checkpoint``: a user checkpoint to load instead of training a zoo model (a
  torchvision ``.npz`` state dict or an orbax directory; see :func:`pretrained`).
  ``max_train``, ``max_eval``, ``image_size``: tfds datasets only (None: the
  dataset's default; for ImageNet-like names 1,024 / 2,000 images, 224x224 crops,
  see :func:`safer_jax.data.load_tfds`).
  """
  config = ml_collections.ConfigDict()
  config.model = "resnet8"
  config.dataset = "digits"
  config.seed = 0
  config.data_dir = ""
  config.cache_dir = ""
  config.checkpoint = ""
  config.max_train = None
  config.max_eval = None
  config.image_size = None
  config.progress = True
  config.update(fields)
  return config


def parse_value(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> None:
  """Applies ``key=value`` overrides (values parsed as Python literals, else strings).

  Raises:
    ValueError: malformed override, unknown key (lists valid keys) or a value of the wrong type.
  """
  for item in overrides:
    if "=" not in item:
      raise ValueError(f"Config override {item!r} must look like key=value.")
    key, text = item.split("=", 1)
    key = key.strip()
    target = config
    parts = key.split(".")
    for part in parts[:-1]:
      if part not in target:
        raise ValueError(f"Unknown config key {key!r}; valid keys: {sorted(config.keys())}")
      target = target[part]
    if parts[-1] not in target:
      raise ValueError(f"Unknown config key {key!r}; valid keys: {sorted(target.keys())}")
    value = parse_value(text)
    current = target[parts[-1]]
    if isinstance(current, tuple) and not isinstance(value, tuple):
      value = (value,)
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    if isinstance(current, str) and not isinstance(value, str):
      value = text
    try:
      target[parts[-1]] = value
    except TypeError as e:
      raise ValueError(f"Config override {item!r}: {e}") from e


def pretrained(config, *, model: str | None = None, recipe=None) -> zoo.ZooEntry:
  """The trained zoo model named by ``config`` (model, dataset, seed, cache_dir, data_dir).

  When ``config.checkpoint`` is set, the model's weights come from that file or
  directory (:func:`safer_jax.zoo.from_checkpoint`) and ``seed``/``cache_dir`` are unused.
  ``model`` overrides ``config.model``; ``recipe`` (a ``train.TrainConfig``) the zoo's
  training recipe.
  """
  model = model or config.model
  dataset = data.load_dataset(config.dataset, data_dir=config.data_dir or None,
                              max_train=config.get("max_train"), max_eval=config.get("max_eval"),
                              image_size=config.get("image_size"))
  if config.get("checkpoint"):
    return zoo.from_checkpoint(model, config.checkpoint, dataset)
  return zoo.pretrained(model, dataset, config.seed, config=recipe,
                        cache_dir=config.cache_dir or None, data_dir=config.data_dir or None,
                        progress=config.progress)
