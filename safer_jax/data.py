"""Datasets as in-memory NumPy arrays, with metadata.

``load_dataset('digits')`` is the embedded default: scikit-learn's 1,797 real
8x8 handwritten digits, shipped inside scikit-learn (no download), with a fixed
seeded stratified split. Any tensorflow-datasets name (``mnist``, ``cifar10``,
``imagenet2012``, ...) is read through ``tfds.data_source`` (no TensorFlow
needed) when the user has prepared it in ``data_dir``.

Images are float32 in ``[0, 1]``, shape ``(N, H, W, C)``; labels int32 ``(N,)``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

EMBEDDED = ("digits",)


@dataclasses.dataclass(frozen=True)
class Split:
  """One split: ``images`` float32 ``(N, H, W, C)`` in [0, 1], ``labels`` int32 ``(N,)``."""
  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return int(self.labels.shape[0])

  def take(self, n: int | None) -> "Split":
    """The first ``n`` examples (all if ``n`` is None)."""
    if n is None:
      return self
    return Split(self.images[:n], self.labels[:n])

  def as_batch(self) -> dict[str, np.ndarray]:
    return {"image": self.images, "label": self.labels}


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Train and eval splits plus metadata.

  Attributes:
    name: dataset name, e.g. ``'digits'`` or ``'mnist'``.
    train: training split.
    eval: held-out split (tfds ``test``/``validation``; a seeded split for digits).
    num_classes: number of classes.
    input_shape: shape of one image ``(H, W, C)``.
  """
  name: str
  train: Split
  eval: Split
  num_classes: int
  input_shape: tuple[int, int, int]

  def summary(self) -> str:
    return (f"{self.name}: {len(self.train)} train / {len(self.eval)} eval, "
            f"input {self.input_shape}, {self.num_classes} classes")


def _stratified_split(labels: np.ndarray, eval_fraction: float, seed: int):
  rng = np.random.default_rng(seed)
  train_idx, eval_idx = [], []
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    rng.shuffle(idx)
    n_eval = int(round(eval_fraction * idx.size))
    eval_idx.append(idx[:n_eval])
    train_idx.append(idx[n_eval:])
  train_idx = np.sort(np.concatenate(train_idx))
  eval_idx = np.sort(np.concatenate(eval_idx))
  rng.shuffle(train_idx)
  return train_idx, eval_idx


def load_digits(*, eval_fraction: float = 0.2, split_seed: int = 0) -> Dataset:
  """scikit-learn's digits: 1,797 8x8 greyscale digits, values 0..16 scaled to [0, 1].

  The split is stratified by class and fixed by ``split_seed`` (default 0):
  1,437 train / 360 eval with the default ``eval_fraction=0.2``.
  """
  if not 0.0 < eval_fraction < 1.0:
    raise ValueError(f"eval_fraction={eval_fraction} must be in (0, 1).")
  from sklearn import datasets as sk_datasets  # pylint: disable=import-outside-toplevel
  raw = sk_datasets.load_digits()
  images = (raw.images.astype(np.float32) / 16.0)[..., None]
  labels = raw.target.astype(np.int32)
  train_idx, eval_idx = _stratified_split(labels, eval_fraction, split_seed)
  return Dataset("digits", Split(images[train_idx], labels[train_idx]),
                 Split(images[eval_idx], labels[eval_idx]), 10, (8, 8, 1))


def _prepare_hint(name: str, data_dir: str | None) -> str:
  where = data_dir or "~/tensorflow_datasets"
  return (f"Prepare it once on a machine with the data, in array_record format, e.g.\n"
          f"  tfds build {name} --data_dir={where} --file_format=array_record\n"
          f"(for manual-download datasets such as imagenet2012, put the archives in "
          f"{where}/downloads/manual first), then pass --data_dir={where}.")


def _materialise(source, n: int | None, image_key: str, label_key: str,
                 image_size: int | None) -> Split:
  count = len(source) if n is None else min(n, len(source))
  records = [source[i] for i in range(count)]
  images = np.stack([np.asarray(r[image_key]) for r in records])
  labels = np.asarray([r[label_key] for r in records], dtype=np.int32)
  if images.ndim == 3:
    images = images[..., None]
  images = images.astype(np.float32)
  if np.issubdtype(np.asarray(records[0][image_key]).dtype, np.integer):
    images /= 255.0
  if image_size is not None and images.shape[1:3] != (image_size, image_size):
    import jax  # pylint: disable=import-outside-toplevel
    images = np.asarray(jax.image.resize(
        images, (images.shape[0], image_size, image_size, images.shape[3]), "bilinear"))
  return Split(images, labels)


def load_tfds(name: str, *, data_dir: str | None = None, max_train: int | None = None,
              max_eval: int | None = None, image_size: int | None = None,
              image_key: str = "image", label_key: str = "label", train_split: str = "train",
              eval_split: str | None = None) -> Dataset:
  """Loads a *prepared* tensorflow-datasets dataset into memory, without TensorFlow.

  Uses ``tfds.data_source`` (random access over array_record files) with
  ``download=False``: nothing is fetched from the network.

  Args:
    name: tfds name, optionally with config/version (``'cifar10'``, ``'mnist:3.*.*'``).
    data_dir: where the dataset was prepared (default: tfds' default dir).
    max_train: keep at most this many training examples (the first ones).
    max_eval: likewise for the eval split.
    image_size: resize images to ``image_size`` x ``image_size`` (bilinear).
    image_key: feature holding the image.
    label_key: feature holding the (ClassLabel) label.
    train_split: tfds split used for training.
    eval_split: held-out split; default ``'test'`` (``'validation'`` for imagenet).

  Raises:
    ValueError: unknown tfds name, or dataset not prepared in ``data_dir`` (the
      message says how to prepare it).
  """
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  base = name.split(":")[0].split("/")[0]
  if base not in tfds.list_builders(with_community_datasets=False):
    raise ValueError(f"Unknown dataset {name!r}: it is neither embedded ({list(EMBEDDED)}) "
                     f"nor a tensorflow-datasets name (see `tfds.list_builders()`).")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
    if eval_split is None:
      eval_split = "validation" if base.startswith("imagenet") else "test"
    sources = tfds.data_source(name, split=[train_split, eval_split], data_dir=data_dir,
                               download=False)
  except Exception as e:  # pylint: disable=broad-except
    try:
      prepared = tfds.builder(name, data_dir=data_dir).is_prepared()
    except Exception:  # pylint: disable=broad-except
      prepared = False
    if not prepared:
      raise ValueError(f"Dataset {name!r} is not prepared in data_dir={data_dir!r} (nothing is "
                       f"downloaded at run time).\n" + _prepare_hint(name, data_dir)) from e
    raise ValueError(f"Dataset {name!r} in data_dir={data_dir!r} could not be read with random "
                     f"access ({type(e).__name__}: {e}).\n" + _prepare_hint(name, data_dir)) from e
  features = builder.info.features
  num_classes = int(features[label_key].num_classes)
  train = _materialise(sources[0], max_train, image_key, label_key, image_size)
  evals = _materialise(sources[1], max_eval, image_key, label_key, image_size)
  return Dataset(base, train, evals, num_classes, tuple(int(s) for s in train.images.shape[1:]))


def load_dataset(name: str = "digits", *, data_dir: str | None = None, split_seed: int = 0,
                 **kwargs: Any) -> Dataset:
  """Returns a :class:`Dataset` by name: ``'digits'`` (embedded) or any prepared tfds name.

  Args:
    name: ``'digits'`` or a tensorflow-datasets name.
    data_dir: tfds data directory (ignored for ``'digits'``); defaults to the
      ``TFDS_DATA_DIR`` environment variable, then tfds' own default.
    split_seed: seed of the digits train/eval split.
    **kwargs: passed to :func:`load_digits` or :func:`load_tfds`.

  Raises:
    ValueError: unknown name or unprepared tfds dataset.
  """
  if name == "digits":
    return load_digits(split_seed=split_seed, **kwargs)
  data_dir = data_dir or os.environ.get("TFDS_DATA_DIR") or None
  return load_tfds(name, data_dir=data_dir, **kwargs)
