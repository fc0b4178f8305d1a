"""Datasets as in-memory NumPy arrays, with metadata.

``load_dataset('digits')`` is the embedded default: scikit-learn's 1,797 real
8x8 handwritten digits, shipped inside scikit-learn (no download), with a fixed
seeded stratified split. Any tensorflow-datasets name (``mnist``, ``cifar10``,
``imagenet2012``, ...) is read through ``tfds.data_source`` (no TensorFlow
needed) when the user has prepared it in ``data_dir``.

Images are float32, shape ``(N, H, W, C)``; labels int32 ``(N,)``. Pixel values
are in ``[0, 1]``, except for ImageNet-like datasets (:func:`is_imagenet_like`),
which get torchvision's standard eval transform per image (:func:`center_crop_resize`:
resize the shorter side to 256, center-crop 224, scale to [0, 1], normalise with
the ImageNet mean/std) so that torchvision-trained weights see what they expect.
ImageNet-scale splits are read as a bounded, seeded random subset
(:data:`IMAGENET_MAX_EVAL` / :data:`IMAGENET_MAX_TRAIN` examples by default).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import numpy as np

from safer_jax.core import progress as progress_lib

EMBEDDED = ("digits",)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
"""Per-channel RGB mean of ImageNet in [0, 1] units (torchvision's ``Normalize``)."""
IMAGENET_STD = (0.229, 0.224, 0.225)
"""Per-channel RGB standard deviation of ImageNet in [0, 1] units."""
IMAGENET_MAX_EVAL = 2000
"""Default eval examples kept for ImageNet-like datasets: 2,000 x 224x224x3 float32 = 1.2 GB."""
IMAGENET_MAX_TRAIN = 1024
"""Default train (calibration) examples for ImageNet-like datasets: 1,024 at 224 = 0.62 GB."""
SUBSET_METHODS = ("first", "even", "random")
TFDS_ONLY_OPTIONS = ("max_train", "max_eval", "image_size", "resize_size", "preprocessing",
                     "subset", "subset_seed")
"""Options of :func:`load_tfds` that :func:`load_dataset` drops for digits when None."""
PROGRESS_MIN_EXAMPLES = 256
"""Loads of more examples than this show a progress line."""


class Split:
  """One split: named arrays sharing their first (example) axis ``N``.

  Image classification (every bundled and tfds image dataset):
  ``Split(images, labels)`` with ``images`` float32 ``(N, H, W, C)`` and
  ``labels`` int32 ``(N,)``, stored as the arrays ``'image'`` and ``'label'``.
  Pixels are in [0, 1], or normalised with the dataset's ``mean``/``std`` when
  those are set (ImageNet-like datasets).

  Any other task: keyword arrays, e.g. a language model's
  ``Split(tokens=(N, T) int32, targets=(N, T) int32, mask=(N, T) float32)`` or
  a regression's ``Split(x=(N, D), y=(N,))``. A batch is the dict of the
  arrays' rows (:meth:`batch`); a :class:`safer_jax.core.tasks.Task` says which of
  them the model takes and how the loss reads the rest.

  Raises:
    ValueError: no arrays, a name given twice, or arrays whose first axes differ
      (each length is named).
  """

  def __init__(self, images: Any = None, labels: Any = None, /, **arrays: Any):
    named = {}
    if images is not None:
      named["image"] = images
    if labels is not None:
      named["label"] = labels
    for key, value in arrays.items():
      if key in named:
        raise ValueError(f"Split: array {key!r} given twice (positionally and by name).")
      named[key] = value
    if not named:
      raise ValueError("Split needs arrays: Split(images, labels) or Split(name=array, ...).")
    lengths = {}
    for key, value in named.items():
      if not hasattr(value, "shape"):
        value = np.asarray(value)
        named[key] = value
      if len(value.shape) == 0:
        raise ValueError(f"Split: array {key!r} is a scalar; every array needs an example axis.")
      lengths[key] = int(value.shape[0])
    if len(set(lengths.values())) > 1:
      raise ValueError(f"Split: arrays of different lengths {lengths}; every array's first axis "
                       f"counts the same examples.")
    object.__setattr__(self, "arrays", named)

  def __setattr__(self, name, value):
    raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")

  def __repr__(self) -> str:
    shapes = ", ".join(f"{k}={tuple(v.shape)} {v.dtype}" for k, v in self.arrays.items())
    return f"Split({shapes})"

  def __eq__(self, other) -> bool:
    return (isinstance(other, Split) and list(other.arrays) == list(self.arrays)
            and all(np.array_equal(other.arrays[k], v) for k, v in self.arrays.items()))

  __hash__ = object.__hash__

  def _get(self, key: str) -> np.ndarray:
    if key not in self.arrays:
      raise ValueError(f"This split has no {key!r} array (it is not an image classification "
                       f"split); its arrays: {list(self.arrays)}. Pass a task "
                       f"(safer_jax.core.tasks) that names the arrays to use.")
    return self.arrays[key]

  @property
  def images(self) -> np.ndarray:
    """The ``'image'`` array ``(N, H, W, C)`` (image classification splits)."""
    return self._get("image")

  @property
  def labels(self) -> np.ndarray:
    """The ``'label'`` array ``(N,)`` (image classification splits)."""
    return self._get("label")

  def __len__(self) -> int:
    return int(next(iter(self.arrays.values())).shape[0])

  def batch(self, lo: int, hi: int) -> dict[str, np.ndarray]:
    """``{name: array[lo:hi]}``: examples ``lo .. hi-1`` of every array."""
    return {k: v[lo:hi] for k, v in self.arrays.items()}

  def take(self, n: int | None) -> "Split":
    """The first ``n`` examples (all if ``n`` is None; ``n`` >= 0, at most all)."""
    if n is None:
      return self
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
      raise ValueError(f"take({n!r}): the number of examples must be an integer >= 0 "
                       f"(or None for all).")
    return Split(**self.batch(0, n))

  def with_arrays(self, **arrays: Any) -> "Split":
    """A new split with ``arrays`` added (or replaced), e.g. reference outputs."""
    return Split(**{**self.arrays, **arrays})

  def batches(self, batch_size: int, max_batches: int | None = None) -> list[dict[str, np.ndarray]]:
    """The first full batches, as the criteria take them (:func:`batches_from_split`)."""
    return batches_from_split(self, batch_size, max_batches)

  def as_batch(self) -> dict[str, np.ndarray]:
    """Every example as one batch: ``{name: array}``."""
    return dict(self.arrays)


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Train and eval splits plus metadata.

  Attributes:
    name: dataset name, e.g. ``'digits'`` or ``'mnist'``.
    train: training split.
    eval: held-out split (tfds ``test``/``validation``; a seeded split for digits).
    num_classes: number of classes.
    input_shape: shape of one image ``(H, W, C)``.
    mean: per-channel mean subtracted from [0, 1] pixels, or None (pixels in [0, 1]).
    std: per-channel standard deviation the pixels were divided by, or None.
    task: what a model of it is trained and scored on (a
      :class:`safer_jax.core.tasks.Task`); None: image classification. Text corpora
      (:mod:`safer_jax.zoo.text`): ``token_cross_entropy`` (``num_classes`` is then
      the vocabulary size, ``input_shape`` ``(seq_len,)``).
  """
  name: str
  train: Split
  eval: Split
  num_classes: int
  input_shape: tuple[int, int, int]
  mean: tuple[float, ...] | None = None
  std: tuple[float, ...] | None = None
  task: Any = None

  @property
  def is_text(self) -> bool:
    """A token corpus (model inputs are token ids), not images."""
    return "image" not in self.train.arrays

  def summary(self) -> str:
    if self.is_text:
      return (f"{self.name}: {len(self.train)} train / {len(self.eval)} eval sequences of "
              f"{self.input_shape[0]} tokens, vocabulary {self.num_classes}")
    return (f"{self.name}: {len(self.train)} train / {len(self.eval)} eval, "
            f"input {self.input_shape}, {self.num_classes} classes")


def batches_from_split(split: Split, batch_size: int,
                       max_batches: int | None = None) -> list[dict[str, np.ndarray]]:
  """The first full batches of a split, as dicts of its arrays (``{'image', 'label'}``, ...).

  Only full batches are returned (criteria weight batches equally), except that
  a split smaller than ``batch_size`` gives one batch holding all of it.

  Args:
    split: the data (e.g. the training split, as calibration data).
    batch_size: examples per batch.
    max_batches: at most this many batches (``None``: all full batches).

  Returns:
    A list of batches, in split order.

  Raises:
    ValueError: ``batch_size`` or ``max_batches`` < 1, or an empty split.
  """
  if batch_size < 1 or (max_batches is not None and max_batches < 1):
    raise ValueError(f"batch_size={batch_size} and max_batches={max_batches} must be >= 1.")
  n = len(split)
  if n == 0:
    raise ValueError("The split is empty.")
  count = max(1, n // batch_size)
  if max_batches is not None:
    count = min(count, max_batches)
  size = min(batch_size, n)
  return [split.batch(i * size, (i + 1) * size) for i in range(count)]


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


def is_imagenet_like(name: str) -> bool:
  """Whether ``name`` gets the ImageNet eval transform and bounded default sizes.

  True for tfds names starting with ``imagenet`` (``imagenet2012``,
  ``imagenet2012_real``, ``imagenet_v2``, ``imagenet_a``, ``imagenette``, ...),
  except ``imagenet_resized`` (already-downsampled 8..64 pixel images).
  """
  base = name.split(":")[0].split("/")[0]
  return base.startswith("imagenet") and base != "imagenet_resized"


def default_resize_size(image_size: int) -> int:
  """Shorter side before the center crop: 256 for 224 (crop fraction 0.875), floored."""
  return image_size * 256 // 224


def _check_size(name: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name}={value!r} must be a positive integer (pixels).")
  return int(value)


def _as_hwc_uint8(image: np.ndarray) -> np.ndarray:
  """``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3)`` integer image -> uint8 ``(H, W, 1|3)``."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(f"Image of shape {image.shape} is not supported; allowed: (H, W), "
                     f"(H, W, 1) greyscale or (H, W, 3) RGB.")
  if min(image.shape[:2]) < 1:
    raise ValueError(f"Image of shape {image.shape} is empty.")
  if image.dtype != np.uint8:
    if not np.issubdtype(image.dtype, np.integer) or image.min() < 0 or image.max() > 255:
      raise ValueError(f"Image of dtype {image.dtype} is not supported; allowed: uint8 "
                       f"(or integers in 0..255).")
    image = image.astype(np.uint8)
  return image


def resize_shorter_side(image: np.ndarray, size: int) -> np.ndarray:
  """Resizes so the shorter side is ``size`` pixels, keeping the aspect ratio.

  Matches torchvision's ``Resize(size)`` on a PIL image exactly: the longer side
  becomes ``int(size * long / short)`` (truncated) and pixels are resampled with
  PIL's antialiased bilinear filter, rounded to uint8.

  Args:
    image: uint8 ``(H, W, C)`` with C = 1 or 3 (or ``(H, W)``).
    size: target length of the shorter side, in pixels.

  Returns:
    uint8 ``(H', W', C)`` with ``min(H', W') == size``.
  """
  from PIL import Image  # pylint: disable=import-outside-toplevel
  size = _check_size("resize_size", size)
  image = _as_hwc_uint8(image)
  h, w = image.shape[:2]
  short, long = (w, h) if w <= h else (h, w)
  new_long = int(size * long / short)
  new_w, new_h = (size, new_long) if w <= h else (new_long, size)
  if (new_h, new_w) == (h, w):
    return image
  channels = image.shape[-1]
  pil = Image.fromarray(image[..., 0] if channels == 1 else image, "L" if channels == 1 else "RGB")
  out = np.asarray(pil.resize((new_w, new_h), Image.BILINEAR))
  return out.reshape(new_h, new_w, channels)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """The central ``size`` x ``size`` window of ``(H, W, C)`` (torchvision's ``CenterCrop``).

  Offsets are ``int(round((H - size) / 2))`` (and likewise for W), with Python's
  round-half-to-even, exactly as torchvision computes them.

  Raises:
    ValueError: the image is smaller than ``size`` on either side.
  """
  size = _check_size("image_size", size)
  h, w = image.shape[:2]
  if h < size or w < size:
    raise ValueError(f"Cannot center-crop {size}x{size} from an image of {h}x{w} pixels; "
                     f"resize_size must be >= image_size.")
  top = int(round((h - size) / 2.0))
  left = int(round((w - size) / 2.0))
  return image[top:top + size, left:left + size]


def normalize(image: np.ndarray, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
  """uint8 ``(..., C)`` -> float32 ``(x / 255 - mean) / std`` per channel (``C == len(mean)``)."""
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  return ((np.asarray(image, np.float32) / np.float32(255.0)) - mean) / std


def center_crop_resize(image: np.ndarray, image_size: int = 224, resize_size: int | None = None,
                       *, mean: Sequence[float] = IMAGENET_MEAN,
                       std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
  """torchvision's standard ImageNet eval transform of one image, in NumPy + PIL.

  ``Resize(resize_size)`` (shorter side, aspect kept, antialiased bilinear) ->
  ``CenterCrop(image_size)`` -> ``ToTensor()`` (scale to [0, 1]) ->
  ``Normalize(mean, std)``, but channels-last. Greyscale images are broadcast to
  3 channels (as ``PIL.Image.convert('RGB')`` does).

  Args:
    image: uint8 ``(H, W, 3)`` RGB, or greyscale ``(H, W)`` / ``(H, W, 1)``.
    image_size: side of the square crop, in pixels (224 for ImageNet models).
    resize_size: shorter side before cropping, in pixels; default
      :func:`default_resize_size` (256 for 224). Must be >= ``image_size``.
    mean: per-channel mean of [0, 1] pixels (3 values).
    std: per-channel standard deviation (3 values).

  Returns:
    float32 ``(image_size, image_size, 3)``, normalised (zero-mean, unit-std units).

  Raises:
    ValueError: unsupported image shape/dtype, non-positive sizes, or
      ``resize_size < image_size``.
  """
  image_size = _check_size("image_size", image_size)
  resize_size = default_resize_size(image_size) if resize_size is None else resize_size
  resize_size = _check_size("resize_size", resize_size)
  if resize_size < image_size:
    raise ValueError(f"resize_size={resize_size} must be >= image_size={image_size}.")
  image = center_crop(resize_shorter_side(image, resize_size), image_size)
  if image.shape[-1] == 1:
    image = np.broadcast_to(image, image.shape[:2] + (3,))
  return normalize(image, mean, std)


def subset_indices(length: int, n: int | None, method: str = "random",
                   seed: int = 0) -> np.ndarray:
  """Which records of a split of ``length`` examples to read, at most ``n`` of them.

  Args:
    length: number of examples in the split.
    n: how many to keep; None or >= ``length``: all.
    method: ``'first'``: ``0..n-1`` (fine for splits stored in random order);
      ``'even'``: ``n`` evenly spaced indices ``floor(i * length / n)``, ascending
      (exactly stratified when the split is stored ordered by class, but a
      *prefix* of them covers only the first classes); ``'random'``: ``n``
      distinct indices drawn with ``seed``, kept in random order, so every
      prefix (``Split.take(k)``) is itself a uniform random subset that mixes
      classes.
    seed: seed of ``'random'``.

  Returns:
    int64 ``(min(n, length),)`` distinct indices in ``[0, length)``.

  Raises:
    ValueError: unknown ``method`` or negative ``n``.
  """
  if method not in SUBSET_METHODS:
    raise ValueError(f"subset={method!r} is not a subset method; allowed: {list(SUBSET_METHODS)}")
  if n is not None and n < 0:
    raise ValueError(f"n={n} examples must be >= 0 (or None for all).")
  count = length if n is None else min(int(n), length)
  if method == "random":
    return np.random.default_rng(seed).permutation(length)[:count].astype(np.int64)
  if method == "even" and count:
    return (np.arange(count, dtype=np.int64) * length) // count
  return np.arange(count, dtype=np.int64)


def _materialise(source, indices: np.ndarray, image_key: str, label_key: str,
                 image_size: int | None, *, imagenet: bool, resize_size: int | None = None,
                 label: str = "", progress: bool = True) -> Split:
  """Reads ``source[i]`` for ``i in indices`` into a Split, one record at a time.

  ImageNet-like: each image goes through :func:`center_crop_resize` into a
  preallocated float32 ``(N, S, S, 3)`` array (decoded full-size images are
  never all held at once). Otherwise images are stacked, scaled to [0, 1] if
  integer, and bilinearly resized to ``image_size`` if given.
  """
  count = int(indices.size)
  bar = progress_lib.Progress(count, label, enabled=progress and count > PROGRESS_MIN_EXAMPLES,
                              unit="img")
  labels = np.empty((count,), np.int32)
  if imagenet:
    images = np.empty((count, image_size, image_size, 3), np.float32)
    for k, i in enumerate(indices):
      record = source[int(i)]
      images[k] = center_crop_resize(record[image_key], image_size, resize_size)
      labels[k] = record[label_key]
      bar.update()
    bar.close()
    return Split(images, labels)
  raw = []
  for k, i in enumerate(indices):
    record = source[int(i)]
    raw.append(np.asarray(record[image_key]))
    labels[k] = record[label_key]
    bar.update()
  bar.close()
  if not raw:
    raise ValueError(f"No examples to read from {label or 'the split'}.")
  shapes = {r.shape for r in raw}
  if len(shapes) > 1:
    raise ValueError(f"Images of {label or 'the split'} have different shapes "
                     f"({sorted(shapes)[:3]}...): they cannot be stacked. Images of differing "
                     f"sizes are supported for ImageNet-like datasets (preprocessing='imagenet').")
  images = np.stack(raw)
  integer = np.issubdtype(images.dtype, np.integer)
  if images.ndim == 3:
    images = images[..., None]
  images = images.astype(np.float32)
  if integer:
    images /= 255.0
  if image_size is not None and images.shape[1:3] != (image_size, image_size):
    import jax  # pylint: disable=import-outside-toplevel
    images = np.asarray(jax.image.resize(
        images, (images.shape[0], image_size, image_size, images.shape[3]), "bilinear"))
  return Split(images, labels)


def _read_error(tfds, name: str, data_dir: str | None, error: Exception) -> ValueError:
  """The ValueError for a tfds dataset that cannot be opened: unprepared, or unreadable."""
  try:
    prepared = tfds.builder(name, data_dir=data_dir).is_prepared()
  except Exception:  # pylint: disable=broad-except
    prepared = False
  if not prepared:
    return ValueError(f"Dataset {name!r} is not prepared in data_dir={data_dir!r} (nothing is "
                      f"downloaded at run time).\n" + _prepare_hint(name, data_dir))
  return ValueError(f"Dataset {name!r} in data_dir={data_dir!r} could not be read with random "
                    f"access ({type(error).__name__}: {error}).\n" + _prepare_hint(name, data_dir))


def tfds_builder(name: str, data_dir: str | None) -> tuple[Any, set[str]]:
  """The tfds builder of a prepared dataset and the names of its splits (empty if unknown).

  Raises:
    ValueError: the dataset cannot be opened (the message says how to prepare it).
  """
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  try:
    builder = tfds.builder(name, data_dir=data_dir)
    return builder, set(builder.info.splits.keys()) if builder.info.splits else set()
  except Exception as e:  # pylint: disable=broad-except
    raise _read_error(tfds, name, data_dir, e) from e


def tfds_sources(name: str, data_dir: str | None, splits: Sequence[str],
                 known: set[str]) -> list:
  """Random-access sources (``tfds.data_source``, no download) of ``splits``.

  Raises:
    ValueError: a split not among ``known`` (when known), or the dataset cannot
      be read (the message says how to prepare it).
  """
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  for split in splits:
    if known and split not in known:
      raise ValueError(f"Split {split!r} is not in dataset {name!r}; available splits: "
                       f"{sorted(known)}.")
  try:
    return tfds.data_source(name, split=list(splits), data_dir=data_dir, download=False)
  except Exception as e:  # pylint: disable=broad-except
    raise _read_error(tfds, name, data_dir, e) from e


def _resolve_max(value: int | None, imagenet: bool, default: int, what: str) -> int | None:
  """None -> the dataset default (``default`` for ImageNet-like, else all); 0 -> all."""
  if value is None:
    return default if imagenet else None
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
    raise ValueError(f"{what}={value!r} must be an integer >= 0 (0: the whole split) or None "
                     f"(the dataset's default).")
  return int(value) or None


def load_tfds(name: str, *, data_dir: str | None = None, max_train: int | None = None,
              max_eval: int | None = None, image_size: int | None = None,
              resize_size: int | None = None, preprocessing: str | None = None,
              subset: str | None = None, subset_seed: int | None = None,
              image_key: str = "image", label_key: str = "label", train_split: str = "train",
              eval_split: str | None = None, progress: bool = True) -> Dataset:
  """Loads a *prepared* tensorflow-datasets dataset into memory, without TensorFlow.

  Uses ``tfds.data_source`` (random access over array_record files) with
  ``download=False``: nothing is fetched from the network.

  ImageNet-like datasets (:func:`is_imagenet_like`, e.g. ``imagenet2012``,
  ``imagenet_v2``, ``imagenette``) get :func:`center_crop_resize` per image
  (torchvision's eval transform; ``image_size`` default 224) and, unless told
  otherwise, read :data:`IMAGENET_MAX_EVAL` = 2,000 eval and
  :data:`IMAGENET_MAX_TRAIN` = 1,024 train examples (the train split only serves
  as calibration data when weights come from a checkpoint), a seeded random
  subset (``subset='random'``) since some preparations store the validation
  split ordered by class. Memory: ``N * S * S * 3 * 4`` bytes, i.e. 602 kB per
  224x224 image: 1.20 GB eval + 0.62 GB train by default (the whole 50,000-image
  validation split would need 30 GB).

  Args:
    name: tfds name, optionally with config/version (``'cifar10'``, ``'mnist:3.*.*'``).
    data_dir: where the dataset was prepared (default: tfds' default dir).
    max_train: keep at most this many training examples; None: the dataset's
      default (1,024 for ImageNet-like, else all); 0: all.
    max_eval: likewise for the eval split (default 2,000 for ImageNet-like).
    image_size: side of the square images, in pixels. ImageNet-like: the center
      crop (default 224); otherwise resize to it (bilinear; default: native size).
    resize_size: ImageNet-like only: shorter side before the crop (default
      :func:`default_resize_size`, 256 for 224).
    preprocessing: None or ``'auto'`` (ImageNet transform for ImageNet-like
      names, else ``'unit'``), ``'imagenet'`` or ``'unit'`` (pixels / 255 in [0, 1]; all
      images of a split must share one shape).
    subset: which examples when a split is capped (:func:`subset_indices`):
      ``'first'``, ``'even'`` or ``'random'``; default ``'random'`` for
      ImageNet-like datasets and ``'first'`` otherwise.
    subset_seed: seed of ``subset='random'`` (None: 0); the eval split uses ``subset_seed + 1``.
    image_key: feature holding the image.
    label_key: feature holding the (ClassLabel) label.
    train_split: tfds split used for training (and calibration).
    eval_split: held-out split; default ``'validation'`` if the dataset has one
      (always assumed for ``imagenet*`` names whose splits are unknown), else ``'test'``.
    progress: show a progress line when reading more than
      :data:`PROGRESS_MIN_EXAMPLES` examples of a split.

  Raises:
    ValueError: unknown tfds name, dataset not prepared in ``data_dir`` (the
      message says how to prepare it), unknown split, or a bad option value.
  """
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  base = name.split(":")[0].split("/")[0]
  if base not in tfds.list_builders(with_community_datasets=False):
    raise ValueError(f"Unknown dataset {name!r}: it is neither embedded ({list(EMBEDDED)}) "
                     f"nor a tensorflow-datasets name (see `tfds.list_builders()`).")
  preprocessing = preprocessing or "auto"
  subset_seed = 0 if subset_seed is None else int(subset_seed)
  if preprocessing not in ("auto", "imagenet", "unit"):
    raise ValueError(f"preprocessing={preprocessing!r} is not supported; allowed: "
                     f"'auto', 'imagenet', 'unit'.")
  imagenet = (is_imagenet_like(name) if preprocessing == "auto" else preprocessing == "imagenet")
  max_train = _resolve_max(max_train, imagenet, IMAGENET_MAX_TRAIN, "max_train")
  max_eval = _resolve_max(max_eval, imagenet, IMAGENET_MAX_EVAL, "max_eval")
  subset = subset or ("random" if imagenet else "first")
  subset_indices(0, 0, subset)  # validates the method name before any reading
  if image_size is not None:
    image_size = _check_size("image_size", image_size)
  if imagenet:
    image_size = image_size or 224
    resize_size = _check_size("resize_size", resize_size or default_resize_size(image_size))
    if resize_size < image_size:
      raise ValueError(f"resize_size={resize_size} must be >= image_size={image_size}.")
  builder, known = tfds_builder(name, data_dir)
  if eval_split is None:
    eval_split = ("validation" if "validation" in known or (not known and base.startswith(
        "imagenet")) else "test")
  sources = tfds_sources(name, data_dir, (train_split, eval_split), known)
  features = builder.info.features
  num_classes = int(features[label_key].num_classes)
  splits = []
  for source, split, n, seed in ((sources[0], train_split, max_train, subset_seed),
                                 (sources[1], eval_split, max_eval, subset_seed + 1)):
    indices = subset_indices(len(source), n, subset, seed)
    splits.append(_materialise(source, indices, image_key, label_key, image_size,
                               imagenet=imagenet, resize_size=resize_size,
                               label=f"{base} {split}", progress=progress))
  train, evals = splits
  mean, std = (IMAGENET_MEAN, IMAGENET_STD) if imagenet else (None, None)
  return Dataset(base, train, evals, num_classes, tuple(int(s) for s in train.images.shape[1:]),
                 mean=mean, std=std)


LOADERS: dict[str, Any] = {}
"""Datasets other modules load: ``{name: fn(name, data_dir=..., max_train=..., max_eval=...)}``
(:mod:`safer_jax.zoo.text` registers its corpora; see :func:`register_loader`)."""


def register_loader(name: str, loader: Any) -> None:
  """Makes :func:`load_dataset` (and ``--dataset=name``) load ``name`` with ``loader``."""
  LOADERS[name] = loader


def load_dataset(name: str = "digits", *, data_dir: str | None = None, split_seed: int = 0,
                 **kwargs: Any) -> Dataset:
  """Returns a :class:`Dataset` by name: ``'digits'`` (embedded) or any prepared tfds name.

  Text (language modelling, :mod:`safer_jax.zoo.text`): ``'pydoc'`` (embedded:
  CPython's own documentation text, byte level) and the tfds text datasets
  ``'tiny_shakespeare'`` and ``'lm1b'``.

  Args:
    name: ``'digits'``, ``'pydoc'`` or a tensorflow-datasets name.
    data_dir: tfds data directory (ignored for ``'digits'``); defaults to the
      ``TFDS_DATA_DIR`` environment variable, then tfds' own default.
    split_seed: seed of the digits train/eval split.
    **kwargs: passed to :func:`load_digits` or :func:`load_tfds`. The tfds-only
      options :data:`TFDS_ONLY_OPTIONS` (``max_train``, ``max_eval``,
      ``image_size``, ...) may be passed as None for ``'digits'`` and are then
      ignored, so callers can always forward their config fields.

  Raises:
    ValueError: unknown name, unprepared tfds dataset, or a tfds-only option set for digits.
  """
  if name in LOADERS:  # e.g. the text corpora of safer_jax.zoo.text
    given = sorted(k for k in TFDS_ONLY_OPTIONS if kwargs.get(k) is not None
                   and k not in ("max_train", "max_eval"))
    if given:
      raise ValueError(f"Options {given} apply to image datasets, not to {name!r}; leave them "
                       f"unset (None).")
    opts = {k: kwargs[k] for k in ("max_train", "max_eval") if kwargs.get(k) is not None}
    return LOADERS[name](name, data_dir=data_dir, **opts)
  if name == "digits":
    given = sorted(k for k in TFDS_ONLY_OPTIONS if kwargs.get(k) is not None)
    if given:
      raise ValueError(f"Options {given} apply to tfds datasets only, not to the embedded "
                       f"'digits' (8x8 images, all 1,797 loaded); leave them unset (None).")
    kwargs = {k: v for k, v in kwargs.items() if k not in TFDS_ONLY_OPTIONS}
    return load_digits(split_seed=split_seed, **kwargs)
  data_dir = data_dir or os.environ.get("TFDS_DATA_DIR") or None
  return load_tfds(name, data_dir=data_dir, **kwargs)
