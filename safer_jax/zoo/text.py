"""Text corpora for language models, as byte-level next-token splits.

``load_text_corpus('pydoc')`` is the embedded default: the English text of
CPython's ``pydoc_data.topics`` (the help topics shipped inside every Python
installation, so nothing is downloaded), concatenated in sorted topic order and
UTF-8 encoded. Prepared tensorflow-datasets text datasets (``tiny_shakespeare``,
``lm1b``) are read through ``tfds.data_source`` with ``download=False``
(:func:`load_tfds_text`). :func:`load` dispatches by name.

Every split has the same layout (see :class:`safer_jax.core.data.Split`)::

  Split(tokens=(N, T) int32, targets=(N, T) int32, mask=(N, T) float32)

with ``T = seq_len``: ``targets[i, t]`` is the token that follows
``tokens[i, t]`` and ``mask[i, t]`` is 1 where that target is real text and 0 on
padding (tokens and targets :data:`PAD_ID` there). Token ids are bytes
(:data:`VOCAB_SIZE` = 256), so any text round-trips through :func:`encode` /
:func:`decode` and there is no unknown token. ``Dataset.num_classes`` is the
vocabulary size and ``Dataset.input_shape`` is ``(seq_len,)``.

A *stream* (one long text: pydoc, tiny_shakespeare) is cut into windows of
``seq_len + 1`` bytes that overlap by one (stride ``seq_len``), so the rows of
``tokens`` laid end to end are the stream minus its last byte, and those of
``targets`` the stream minus its first: every byte but the first is predicted
exactly once. The last, short window is padded. A *corpus of sentences* (lm1b)
gives one row per sentence (its first ``seq_len + 1`` bytes), padded; sentences
of fewer than 2 bytes (nothing to predict) are dropped.

Sizes are capped by default (:data:`DEFAULT_MAX_TRAIN` = 4,096 train rows,
:data:`DEFAULT_MAX_EVAL` = 512 eval rows: 262,144 and 32,768 predicted bytes at
``seq_len=64``), the first rows of each split, so a small model trains in a
minute or two on 2 CPU cores. With Python 3.11.7 the pydoc corpus is 466,117
bytes (79 topics): 419,505 train / 46,612 eval bytes at ``eval_fraction=0.1``,
6,555 + 729 windows of 64 before the caps. The text differs between Python
versions, and so do these numbers.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from safer_jax.core import data as data_lib
from safer_jax.core import tasks

VOCAB_SIZE = 256
"""Byte-level vocabulary: token id = byte value."""
PAD_ID = 0
"""Token and target id of padding positions (their mask is 0)."""
DEFAULT_SEQ_LEN = 64
DEFAULT_MAX_TRAIN = 4096
"""Default cap on train rows (windows or sentences); ``max_train=0`` keeps all."""
DEFAULT_MAX_EVAL = 512
"""Default cap on eval rows; ``max_eval=0`` keeps all."""
EMBEDDED = ("pydoc",)
LEVELS = ("byte",)
TFDS_TEXT = {
    # name: (layout, default (train, eval) splits)
    "tiny_shakespeare": ("stream", ("train", "validation")),
    "lm1b": ("rows", ("train", "test")),
}
"""The tfds text datasets :func:`load_tfds_text` reads, with their layout and default splits."""


def text_datasets() -> list[str]:
  """Names :func:`load` accepts: the embedded corpus first, then the tfds ones."""
  return [*EMBEDDED, *sorted(TFDS_TEXT)]


def corpus_text(name: str = "pydoc") -> str:
  """The raw text of an embedded corpus (``'pydoc'``: ``pydoc_data.topics`` in sorted key order)."""
  if name not in EMBEDDED:
    raise ValueError(f"Unknown embedded text corpus {name!r}; embedded: {list(EMBEDDED)} "
                     f"(tfds text datasets: {sorted(TFDS_TEXT)}, see load_tfds_text).")
  from pydoc_data import topics  # pylint: disable=import-outside-toplevel
  return "".join(topics.topics[key] for key in sorted(topics.topics))


def encode(text: str | bytes) -> np.ndarray:
  """UTF-8 bytes of ``text`` as int32 token ids ``(len,)`` in ``[0, 256)``."""
  raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
  return np.frombuffer(raw, np.uint8).astype(np.int32)


def decode(ids: Iterable[int] | np.ndarray) -> str:
  """Token ids (bytes) -> text; invalid UTF-8 (e.g. a window cut inside a character) -> U+FFFD."""
  arr = np.asarray(ids).reshape(-1)
  if arr.size and (arr.min() < 0 or arr.max() >= VOCAB_SIZE):
    raise ValueError(f"Token ids must be bytes in [0, {VOCAB_SIZE}); got "
                     f"[{arr.min()}, {arr.max()}].")
  return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def _check_seq_len(seq_len: Any) -> int:
  if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
    raise ValueError(f"seq_len={seq_len!r} must be a positive integer (tokens per row).")
  return int(seq_len)


def _resolve_cap(value: int | None, default: int, what: str) -> int | None:
  """None -> ``default``; 0 -> no cap (None); else the positive integer."""
  if value is None:
    return default
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
    raise ValueError(f"{what}={value!r} must be an integer >= 0 (0: the whole split) or None "
                     f"(the default, {default}).")
  return int(value) or None


def windows(stream: Sequence[int] | np.ndarray, seq_len: int = DEFAULT_SEQ_LEN,
            max_rows: int | None = None) -> data_lib.Split:
  """A token stream cut into next-token rows of ``seq_len`` (stride ``seq_len``; last one padded).

  Row ``i`` holds ``tokens = stream[i*T : i*T + T]`` and ``targets =
  stream[i*T + 1 : i*T + T + 1]`` (``T = seq_len``); past the stream's end both
  are :data:`PAD_ID` with mask 0.

  Args:
    stream: token ids ``(L,)``, ``L >= 2``.
    seq_len: tokens per row.
    max_rows: keep only the first rows (None: all).

  Raises:
    ValueError: a stream of fewer than 2 tokens, or a bad ``seq_len``.
  """
  t = _check_seq_len(seq_len)
  stream = np.asarray(stream, np.int32).reshape(-1)
  n_pred = stream.size - 1
  if n_pred < 1:
    raise ValueError(f"A stream of {stream.size} token(s) has nothing to predict (needs >= 2).")
  rows = -(-n_pred // t)
  if max_rows is not None:
    rows = min(rows, int(max_rows))
  size = rows * t
  used = min(n_pred, size)
  tokens = np.full((size,), PAD_ID, np.int32)
  targets = np.full((size,), PAD_ID, np.int32)
  tokens[:used] = stream[:used]
  targets[:used] = stream[1:used + 1]
  mask = (np.arange(size) < used).astype(np.float32)
  return data_lib.Split(tokens=tokens.reshape(rows, t), targets=targets.reshape(rows, t),
                        mask=mask.reshape(rows, t))


def sentence_rows(sentences: Iterable[Sequence[int] | np.ndarray],
                  seq_len: int = DEFAULT_SEQ_LEN) -> data_lib.Split:
  """One row per sentence: its first ``seq_len + 1`` tokens, shifted by one, padded.

  ``tokens[i, :n] = s[:n]``, ``targets[i, :n] = s[1:n + 1]`` with
  ``n = min(len(s) - 1, seq_len)``; mask 1 there, 0 (and :data:`PAD_ID`) after.
  Sentences of fewer than 2 tokens are dropped.

  Raises:
    ValueError: no sentence of 2 or more tokens.
  """
  t = _check_seq_len(seq_len)
  kept = [np.asarray(s, np.int32).reshape(-1)[:t + 1] for s in sentences]
  kept = [s for s in kept if s.size >= 2]
  if not kept:
    raise ValueError("No sentence of 2 or more tokens: nothing to predict.")
  tokens = np.full((len(kept), t), PAD_ID, np.int32)
  targets = np.full((len(kept), t), PAD_ID, np.int32)
  mask = np.zeros((len(kept), t), np.float32)
  for i, s in enumerate(kept):
    n = s.size - 1
    tokens[i, :n] = s[:n]
    targets[i, :n] = s[1:]
    mask[i, :n] = 1.0
  return data_lib.Split(tokens=tokens, targets=targets, mask=mask)


def load_text_corpus(name: str = "pydoc", *, seq_len: int = DEFAULT_SEQ_LEN,
                     max_train: int | None = None, max_eval: int | None = None,
                     eval_fraction: float = 0.1, level: str = "byte") -> data_lib.Dataset:
  """The embedded corpus as a byte-level next-token :class:`~safer_jax.core.data.Dataset`.

  Deterministic (no randomness at all): the text of :func:`corpus_text` is
  encoded; the last ``eval_fraction`` of the byte stream (rounded) is the eval
  stream, the rest the train stream (disjoint: no byte is a token or target of
  both), and each is cut by :func:`windows`.

  Args:
    name: ``'pydoc'``.
    seq_len: tokens per row (the model's input length).
    max_train: keep the first ``max_train`` train windows; None:
      :data:`DEFAULT_MAX_TRAIN` (4,096); 0: all.
    max_eval: likewise for eval (default :data:`DEFAULT_MAX_EVAL`, 512).
    eval_fraction: share of the stream held out, in (0, 1).
    level: ``'byte'`` (the only level: vocabulary 256, no unknown token).

  Returns:
    ``Dataset(name, train, eval, num_classes=256, input_shape=(seq_len,))``.

  Raises:
    ValueError: unknown name or level, bad sizes or fraction.
  """
  if level not in LEVELS:
    raise ValueError(f"level={level!r} is not supported; allowed: {list(LEVELS)}.")
  if not 0.0 < eval_fraction < 1.0:
    raise ValueError(f"eval_fraction={eval_fraction} must be in (0, 1).")
  seq_len = _check_seq_len(seq_len)
  max_train = _resolve_cap(max_train, DEFAULT_MAX_TRAIN, "max_train")
  max_eval = _resolve_cap(max_eval, DEFAULT_MAX_EVAL, "max_eval")
  stream = encode(corpus_text(name))
  cut = stream.size - int(round(eval_fraction * stream.size))
  train = windows(stream[:cut], seq_len, max_train)
  evals = windows(stream[cut:], seq_len, max_eval)
  return data_lib.Dataset(name, train, evals, VOCAB_SIZE, (seq_len,),
                          task=tasks.token_cross_entropy())


def _record_bytes(value: Any) -> bytes:
  """A tfds ``Text`` feature value (str, bytes, or a NumPy scalar/0-d array of either) as bytes."""
  if isinstance(value, np.ndarray):
    value = value.item()
  if isinstance(value, str):
    return value.encode("utf-8")
  return bytes(value)


def load_tfds_text(name: str, *, data_dir: str | None = None, seq_len: int = DEFAULT_SEQ_LEN,
                   max_train: int | None = None, max_eval: int | None = None,
                   split_names: tuple[str, str] | None = None,
                   text_key: str = "text") -> data_lib.Dataset:
  """A *prepared* tfds text dataset as a byte-level next-token Dataset (no TensorFlow, no download).

  ``tiny_shakespeare`` (each split one long text; eval split ``'validation'``)
  is read as a stream (:func:`windows`; the records of a split concatenated);
  ``lm1b`` (one sentence per record; eval split ``'test'``) as one row per
  sentence (:func:`sentence_rows`), only the first ``max_*`` records being read.

  Args:
    name: ``'tiny_shakespeare'`` or ``'lm1b'``, optionally with config/version.
    data_dir: where it was prepared (default: tfds' default dir).
    seq_len: tokens per row.
    max_train: at most this many train rows; None: :data:`DEFAULT_MAX_TRAIN`; 0: all
      (lm1b's train split has ~30M sentences).
    max_eval: likewise for eval (default :data:`DEFAULT_MAX_EVAL`).
    split_names: ``(train_split, eval_split)``; default per dataset (:data:`TFDS_TEXT`).
    text_key: the feature holding the text.

  Raises:
    ValueError: a name that is not a supported text dataset, a dataset not
      prepared in ``data_dir`` (the message names it, the directory and the
      ``tfds build`` command that prepares it), an unknown split, bad sizes.
  """
  base = name.split(":")[0].split("/")[0]
  if base not in TFDS_TEXT:
    raise ValueError(f"Unknown text dataset {name!r}; supported: {text_datasets()} "
                     f"('pydoc' is embedded, the others are tensorflow-datasets names).")
  seq_len = _check_seq_len(seq_len)
  max_train = _resolve_cap(max_train, DEFAULT_MAX_TRAIN, "max_train")
  max_eval = _resolve_cap(max_eval, DEFAULT_MAX_EVAL, "max_eval")
  layout, default_splits = TFDS_TEXT[base]
  train_split, eval_split = tuple(split_names) if split_names is not None else default_splits
  _, known = data_lib.tfds_builder(name, data_dir)
  sources = data_lib.tfds_sources(name, data_dir, (train_split, eval_split), known)
  splits = []
  for source, split, cap in ((sources[0], train_split, max_train),
                             (sources[1], eval_split, max_eval)):
    if len(source) == 0:
      raise ValueError(f"Split {split!r} of {name!r} in data_dir={data_dir!r} is empty.")
    if layout == "stream":
      stream = np.concatenate([encode(_record_bytes(source[i][text_key]))
                               for i in range(len(source))])
      splits.append(windows(stream, seq_len, cap))
    else:
      count = len(source) if cap is None else min(cap, len(source))
      splits.append(sentence_rows(
          (encode(_record_bytes(source[i][text_key])) for i in range(count)), seq_len))
  return data_lib.Dataset(base, splits[0], splits[1], VOCAB_SIZE, (seq_len,),
                          task=tasks.token_cross_entropy())


def load(name: str = "pydoc", *, data_dir: str | None = None, **kwargs: Any) -> data_lib.Dataset:
  """A text Dataset by name: ``'pydoc'`` (embedded) or a prepared tfds text dataset.

  Args:
    name: one of :func:`text_datasets`.
    data_dir: tfds data directory (tfds datasets only); defaults to the
      ``TFDS_DATA_DIR`` environment variable, then tfds' own default.
    **kwargs: passed to :func:`load_text_corpus` or :func:`load_tfds_text`.

  Raises:
    ValueError: unknown name, an option the chosen loader does not take, or
      what the loader raises.
  """
  if name in EMBEDDED:
    if data_dir is not None or kwargs.get("split_names") is not None:
      raise ValueError(f"data_dir and split_names apply to tfds text datasets only, not to the "
                       f"embedded {name!r}.")
    kwargs.pop("split_names", None)
    return load_text_corpus(name, **kwargs)
  extra = sorted(k for k in ("eval_fraction", "level") if k in kwargs)
  if extra:
    raise ValueError(f"Options {extra} apply to the embedded corpora {list(EMBEDDED)} only, "
                     f"not to {name!r}.")
  data_dir = data_dir or os.environ.get("TFDS_DATA_DIR") or None
  return load_tfds_text(name, data_dir=data_dir, **kwargs)


def unigram_loss(train: data_lib.Split, evals: data_lib.Split, vocab_size: int = VOCAB_SIZE,
                 smoothing: float = 1.0) -> float:
  """Baseline: mean cross-entropy (nats per target) of ``evals`` under ``train``'s byte frequencies.

  Frequencies of the masked ``train`` targets with add-``smoothing`` counts; the
  loss a model that ignores context would reach. ``exp`` of it is the unigram
  perplexity.
  """
  counts = np.bincount(train.arrays["targets"][train.arrays["mask"] > 0],
                       minlength=vocab_size).astype(np.float64) + smoothing
  logp = np.log(counts / counts.sum())
  keep = evals.arrays["mask"] > 0
  return float(-logp[evals.arrays["targets"][keep]].mean())


def _load_registered(name: str, *, data_dir: str | None = None, **kwargs: Any) -> data_lib.Dataset:
  return load(name, data_dir=data_dir if name not in EMBEDDED else None, **kwargs)


for _name in text_datasets():  # sj.load_dataset("pydoc"), --dataset=tiny_shakespeare, ...
  data_lib.register_loader(_name, _load_registered)
