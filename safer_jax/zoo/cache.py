"""Trained-model cache: the first request for (model, dataset, seed) trains and saves with orbax;
later requests restore in seconds.

Each entry lives in ``<cache_dir>/<model>-<dataset>-seed<seed>-<config hash>/`` as an
orbax ``CheckpointManager`` step holding the variables and a JSON record with a
SHA-256 checksum of every parameter leaf. A checkpoint that fails to restore,
has the wrong structure or whose checksum differs (truncated or corrupted
files) is reported, deleted and retrained — never silently loaded. Orbax
writes to a temporary directory and renames it when complete, so a half-written
save is never seen as a finished step.

Concurrent processes (several experiments started together on an empty cache)
share the cache safely: a finished entry is restored without any lock; to
train, a process takes ``<entry>.lock`` (:class:`EntryLock`, created with
``O_CREAT | O_EXCL``), so exactly one trains and saves each entry while the
others print that they wait and then restore it. A lock left by a crashed
process is broken when its process is gone (same host) or it has not been
refreshed for :data:`LOCK_STALE_SECONDS`. A cache that cannot be written is
reported (:class:`~safer_jax.core.errors.ConfigError`) before any training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from safer_jax.core import checkpoints
from safer_jax.core import data as data_lib
from safer_jax.core import distributed
from safer_jax.core import errors
from safer_jax.core import layers as layers_lib
from safer_jax.core import tasks as tasks_lib
from safer_jax.training import train as train_lib
from safer_jax.zoo import convert
from safer_jax.zoo import models as models_lib

log = logging.getLogger(__name__)

ZOO_VERSION = 3  # bump when a zoo model or the training recipe changes (2: im2col tiny convs;
# 3: depthwise convolutions as shifted multiply-adds).

# Per-model training recipes (epochs on the embedded digits dataset; < 1 min on 2 CPU cores).
RECIPES: dict[str, train_lib.TrainConfig] = {
    "mlp": train_lib.TrainConfig(epochs=30),
    "lenet": train_lib.TrainConfig(epochs=30),
    "resnet8": train_lib.TrainConfig(epochs=20),
    "resnet20": train_lib.TrainConfig(epochs=15),
    "mobilenet_v2": train_lib.TrainConfig(epochs=15),
    # No inductive bias and no dropout: a ViT overfits 1,438 digits (train loss -> 0, ~93% eval
    # at the default weight decay); strong decoupled weight decay regularises it.
    "vit_tiny": train_lib.TrainConfig(epochs=100, weight_decay=1.0),
    # 4,096 windows of 64 bytes of the pydoc corpus: 6 epochs x 128 steps (~1 min on 2 CPU cores)
    # reach ~1.7 nats/byte on the held-out text (unigram: 3.27).
    "lm_tiny": train_lib.TrainConfig(epochs=6, batch_size=32, learning_rate=3e-3,
                                     weight_decay=1e-2),
}
DEFAULT_TEXT_DATASET = "pydoc"  # the embedded corpus text models train on by default


def default_cache_dir() -> str:
  """``$SAFER_JAX_CACHE`` or ``~/.cache/safer_jax/zoo``."""
  return os.environ.get("SAFER_JAX_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "safer_jax", "zoo")


@dataclasses.dataclass
class ZooEntry:
  """A trained model: the module, its variables and how they were obtained.

  Attributes:
    name: zoo model name.
    model: the Flax module (``model.apply(variables, images)`` gives logits).
    variables: ``{'params': ..., 'batch_stats': ...}`` as NumPy-backed jax arrays.
    dataset: the dataset it was trained on.
    metrics: eval metrics right after training (``accuracy``, ``loss``).
    path: checkpoint directory.
    restored: True when loaded from the cache, False when trained now.
  """
  name: str
  model: nn.Module
  variables: dict
  dataset: data_lib.Dataset
  metrics: dict
  path: str
  restored: bool

  @property
  def apply_fn(self):
    return self.model.apply

  @property
  def task(self):
    """What the model is scored on: its dataset's task (classification for image datasets)."""
    return tasks_lib.get(self.dataset.task)


def _entry_dir(cache_dir: str, model: str, dataset: str, seed: int,
               config: train_lib.TrainConfig, input_shape: tuple[int, ...]) -> str:
  record = json.dumps({"v": ZOO_VERSION, "cfg": dataclasses.asdict(config),
                       "input": list(input_shape)}, sort_keys=True)
  tag = hashlib.sha256(record.encode()).hexdigest()[:8]
  return os.path.join(os.path.abspath(cache_dir), f"{model}-{dataset}-seed{seed}-{tag}")


def pretrained(model: str = "resnet8", dataset: str | data_lib.Dataset | None = None,
               seed: int = 0,
               *, cache_dir: str | None = None, config: train_lib.TrainConfig | None = None,
               data_dir: str | None = None, retrain: bool = False,
               progress: bool = True, train_from_scratch: bool = False) -> ZooEntry:
  """Returns a trained zoo model, training and caching it on first use.

  The ImageNet-size architectures (:data:`safer_jax.zoo.models.IMAGENET_MODELS`) are
  refused unless ``train_from_scratch=True``: they take their weights from a
  checkpoint (:func:`from_checkpoint`), and training millions of parameters on
  a small dataset such as the digits is almost never what was meant.

  Under ``jax.distributed`` (several processes; every process calls this in
  the same order) process 0 alone restores, or trains on its default device
  and saves, in its ``cache_dir``; the others wait at a barrier and receive its
  variables bit for bit (:func:`safer_jax.core.distributed.broadcast_from_primary`),
  so every process holds identical weights and never touches its own cache.

  Args:
    model: zoo model name (see :func:`safer_jax.zoo.models.list_models`).
    dataset: dataset name (``'digits'``, ``'pydoc'`` or a prepared tfds name) or a
      loaded Dataset; None: ``'digits'`` for image models, ``'pydoc'`` (the
      embedded text corpus) for language models
      (:data:`safer_jax.zoo.models.TEXT_MODELS`).
    seed: training seed (init and data order).
    cache_dir: cache root (default :func:`default_cache_dir`).
    config: training recipe; default ``RECIPES[model]`` with ``seed``.
    data_dir: tfds data directory for non-embedded datasets.
    retrain: ignore and overwrite any cached checkpoint.
    progress: show training progress.
    train_from_scratch: allow an ImageNet-size architecture to be trained (or
      restored from the cache) like the small zoo models.

  Returns:
    A :class:`ZooEntry`.

  Raises:
    ValueError: an unknown model; :class:`safer_jax.core.errors.ConfigError` (a
      ValueError) for an ImageNet-size one without ``train_from_scratch=True`` (raised before any data loading or training).
  """
  name = models_lib.ALIASES.get(model, model)
  if name in models_lib.IMAGENET_MODELS and not train_from_scratch:
    raise errors.ConfigError(
        f"Model {name!r} is an ImageNet-size architecture; the zoo does not train it on first "
        f"use. Load its weights with --config.checkpoint=PATH (a torchvision state_dict .npz "
        f"or an orbax checkpoint directory; safer_jax.zoo.from_checkpoint in Python), or train "
        f"it from scratch anyway with --config.train_from_scratch=True "
        f"(zoo.pretrained(..., train_from_scratch=True)).")
  ds = _dataset_for(name, dataset, data_dir)
  net = models_lib.get_model(model, num_classes=ds.num_classes)
  if config is None:
    config = dataclasses.replace(RECIPES.get(name, train_lib.TrainConfig()), seed=seed)
  path = _entry_dir(cache_dir or default_cache_dir(), name, ds.name, seed, config,
                    ds.input_shape)  # image_size changes the model's input: another entry
  abstract = layers_lib.abstract_variables(net, ds.input_shape, config.seed)
  if checkpoints.process_local():
    return _shared_entry(name, net, ds, abstract, lambda: _restore_or_train(
        name, net, ds, seed, config, path, abstract, retrain, progress))
  return _restore_or_train(name, net, ds, seed, config, path, abstract, retrain, progress)


def _shared_entry(name: str, net: nn.Module, ds: data_lib.Dataset, abstract: Any,
                  make: Callable[[], ZooEntry]) -> ZooEntry:
  """Process 0's ``make()`` entry in every process (``jax.distributed``; see :func:`pretrained`)."""
  entry = make() if distributed.is_primary() else None
  distributed.wait_for_all(f"zoo:{name}")  # No device collective while process 0 trains.
  info = b"" if entry is None else json.dumps(
      {"metrics": entry.metrics, "path": entry.path, "restored": entry.restored}).encode()
  size = int(distributed.broadcast_from_primary(np.asarray(len(info), np.int64)))
  info = distributed.broadcast_from_primary(
      np.frombuffer(info.ljust(size, b"\0"), np.uint8)).tobytes()
  record = json.loads(info.decode())
  zeros = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract)
  variables = distributed.broadcast_from_primary(zeros if entry is None else entry.variables)
  return ZooEntry(name, net, variables, ds, record["metrics"], record["path"],
                  restored=record["restored"])


LOCK_STALE_SECONDS = 600.0  # default; $SAFER_JAX_LOCK_STALE_S overrides it.
_LOCK_REFRESH_SECONDS = 15.0  # how often the holder refreshes its lock file's mtime


class EntryLock:
  """An exclusive, cross-process lock on one cache entry: the file ``<entry>.lock``.

  Taken with ``os.open(O_CREAT | O_EXCL)`` (atomic on local and NFS file
  systems); the file holds the holder's pid, host, start time and a random
  token. While held, a daemon thread refreshes its mtime every few seconds. A
  lock is *stale* when its holder is a dead process on this host, or when the
  file was not refreshed for ``stale_seconds`` (default :data:`LOCK_STALE_SECONDS`,
  ``$SAFER_JAX_LOCK_STALE_S``): it is then broken (renamed away, checked to be
  the same lock, removed) and taken.

  Raises (from :meth:`acquire`):
    safer_jax.core.errors.ConfigError: the cache directory cannot be created or written.
  """

  def __init__(self, entry_path: str, what: str, *, stale_seconds: float | None = None,
               poll_seconds: float = 0.25):
    self.entry_path = entry_path
    self.path = entry_path.rstrip(os.sep) + ".lock"
    self.what = what
    self.stale_seconds = float(stale_seconds if stale_seconds is not None else
                               os.environ.get("SAFER_JAX_LOCK_STALE_S", LOCK_STALE_SECONDS))
    self.poll_seconds = poll_seconds
    self.token = None
    self._stop = None

  def _record(self) -> dict:
    import socket  # pylint: disable=import-outside-toplevel
    return {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time(),
            "token": self.token}

  def try_acquire(self) -> bool:
    """Takes the lock if free (True); False if another process holds it."""
    try:
      os.makedirs(os.path.dirname(self.path), exist_ok=True)
    except OSError as e:  # EACCES, EROFS, ENOTDIR, EEXIST (a file), ...
      raise self._unwritable(e) from e
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    except OSError as e:
      raise self._unwritable(e) from e
    self.token = os.urandom(8).hex()
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      json.dump(self._record(), f)
    self._start_refresh()
    return True

  def _unwritable(self, e: OSError) -> errors.ConfigError:
    reason = e.strerror or str(e)
    return errors.ConfigError(
        f"The zoo cache {os.path.dirname(self.path)!r} is not writable ({reason}): cannot "
        f"train and save {self.what} there. Set cache_dir (launch.py --cache_dir=DIR, or "
        f"$SAFER_JAX_CACHE) to a writable directory.")

  def holder(self) -> tuple[dict, float] | None:
    """The current lock's record and mtime, or None if there is no lock file."""
    try:
      mtime = os.stat(self.path).st_mtime
      with open(self.path, encoding="utf-8") as f:
        text = f.read()
    except FileNotFoundError:
      return None
    try:
      record = json.loads(text)
    except ValueError:  # being written right now (or garbage): judge by its age only
      record = {}
    return record, mtime

  def is_stale(self, record: dict, mtime: float) -> bool:
    import socket  # pylint: disable=import-outside-toplevel
    if time.time() - mtime > self.stale_seconds:
      return True
    if record.get("host") == socket.gethostname() and isinstance(record.get("pid"), int):
      try:
        os.kill(record["pid"], 0)
      except ProcessLookupError:
        return True
      except OSError:  # e.g. EPERM: it exists
        return False
    return False

  def _break(self, record: dict) -> None:
    """Removes the stale lock described by ``record`` (not a newer one taken meanwhile)."""
    aside = f"{self.path}.stale-{os.getpid()}-{os.urandom(4).hex()}"
    try:
      os.rename(self.path, aside)
    except FileNotFoundError:
      return  # someone else broke it
    except OSError as e:  # a read-only cache holding a stale lock
      raise self._unwritable(e) from e
    try:
      with open(aside, encoding="utf-8") as f:
        moved = json.loads(f.read() or "{}")
    except ValueError:
      moved = {}
    if moved.get("token") != record.get("token"):  # a fresh lock: put it back untouched
      try:
        os.link(aside, self.path)
      except OSError:
        pass
    os.remove(aside)

  def acquire(self) -> bool:
    """Waits until this process holds the lock; returns whether it had to wait."""
    waited, announced = False, 0.0
    while not self.try_acquire():
      state = self.holder()
      if state is None:
        continue
      record, mtime = state
      if self.is_stale(record, mtime):
        log.warning("Breaking the stale lock %s (%s)", self.path, record)
        print(f"zoo: breaking a stale lock on {self.what} (process {record.get('pid')} on "
              f"{record.get('host')} is gone or silent): {self.path}", flush=True)
        self._break(record)
        continue
      if time.monotonic() - announced > 60.0:
        announced = time.monotonic()
        print(f"zoo: waiting for process {record.get('pid')} on {record.get('host')} to "
              f"finish training {self.what} (lock {self.path})", flush=True)
      waited = True
      time.sleep(self.poll_seconds)
    return waited

  def _start_refresh(self) -> None:
    import threading  # pylint: disable=import-outside-toplevel
    stop = self._stop = threading.Event()
    interval = max(min(_LOCK_REFRESH_SECONDS, self.stale_seconds / 4), 0.05)

    def refresh():
      while not stop.wait(interval):
        try:
          os.utime(self.path)
        except OSError:
          return

    threading.Thread(target=refresh, name="safer_jax-zoo-lock", daemon=True).start()

  def release(self) -> None:
    """Stops refreshing and removes the lock file if it is still this process's."""
    if self._stop is not None:
      self._stop.set()
    state = self.holder()
    if state is not None and state[0].get("token") == self.token:
      try:
        os.remove(self.path)
      except FileNotFoundError:
        pass
    self.token = None

  def __enter__(self) -> "EntryLock":
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def _restore_or_train(name: str, net: nn.Module, ds: data_lib.Dataset, seed: int,
                      config: train_lib.TrainConfig, path: str, abstract: Any, retrain: bool,
                      progress: bool) -> ZooEntry:
  """The cached entry at ``path`` if intact (and not ``retrain``), else trained and saved.

  A finished entry is restored without locking (a read-only cache works). Otherwise
  the entry's :class:`EntryLock` is taken first: if another process is training it,
  this one waits and then restores its checkpoint instead of training again.
  """
  if not retrain and os.path.isdir(path):
    try:
      return _restore(name, net, ds, path, abstract)
    except Exception:  # pylint: disable=broad-except
      pass  # not finished, being written or replaced, or damaged: decided under the lock.
  with EntryLock(path, f"{name} on {ds.name} (seed {seed})"):
    if not retrain and os.path.isdir(path):
      try:
        return _restore(name, net, ds, path, abstract)
      except FileNotFoundError:
        pass
      except checkpoints.CorruptCheckpointError as e:
        log.warning("%s -- deleting it and retraining.", e)
        print(f"WARNING: {e} -- retraining.", flush=True)
    if os.path.isdir(path):  # a damaged entry, or a save killed half-way (orbax tmp dirs)
      shutil.rmtree(path)
    # Under jax.distributed process 0 trains (and evaluates) alone, on its default device.
    with distributed.use_data_sharding(not checkpoints.process_local()):
      variables, history = train_lib.train(net, ds, config, progress=progress, task=ds.task)
    meta = {"model": name, "dataset": ds.name, "seed": seed,
            "config": dataclasses.asdict(config), "metrics": history["eval"],
            "train_seconds": history["train_seconds"], "zoo_version": ZOO_VERSION}
    checkpoints.save_checkpoint(path, variables, meta)
  return ZooEntry(name, net, jax.device_get(variables), ds, history["eval"], path, restored=False)


def _restore(name: str, net: nn.Module, ds: data_lib.Dataset, path: str,
             abstract: Any) -> ZooEntry:
  variables, meta = checkpoints.restore_checkpoint(path, abstract)
  log.info("Restored %s from %s", name, path)
  return ZooEntry(name, net, variables, ds, meta.get("metrics", {}), path, restored=True)


def _dataset_for(name: str, dataset: str | data_lib.Dataset | None,
                 data_dir: str | None) -> data_lib.Dataset:
  """Zoo model ``name``'s dataset: ``dataset`` (a name or a Dataset; None: the model's
  default), refused when it holds the other kind of data (text for an image model)."""
  text_model = name in models_lib.TEXT_MODELS
  if dataset is None:
    dataset = DEFAULT_TEXT_DATASET if text_model else "digits"
  ds = dataset if isinstance(dataset, data_lib.Dataset) else data_lib.load_dataset(
      dataset, data_dir=data_dir)
  if text_model != ds.is_text:
    raise errors.ConfigError(
        f"Model {name!r} is {'a language' if text_model else 'an image'} model but dataset "
        f"{ds.name!r} holds {'images' if text_model else 'text'}; allowed: "
        f"{'text datasets ' + str(_text_names()) if text_model else 'image datasets (digits, tfds image datasets)'}.")
  return ds


def _text_names() -> list[str]:
  from safer_jax.zoo import text  # pylint: disable=import-outside-toplevel
  return text.text_datasets()


def check_finite(variables: Any) -> None:
  """Raises a ValueError naming the first checkpoint leaf that holds NaN or inf values."""
  layers_lib.check_finite(variables, what="Checkpoint leaf")


def from_checkpoint(model_name: str, checkpoint_path: str | os.PathLike,
                    dataset: str | data_lib.Dataset, *, data_dir: str | None = None) -> ZooEntry:
  """A zoo model with weights from a user's checkpoint file instead of zoo training.

  Args:
    model_name: zoo model name (see :func:`safer_jax.zoo.models.list_models`).
    checkpoint_path: a ``.npz`` torchvision ``state_dict`` (converted with
      :func:`safer_jax.zoo.convert.load_torchvision_npz`; ``model_name`` must be one of
      :data:`safer_jax.zoo.convert.TORCHVISION_MODELS`) or an orbax checkpoint directory
      (:func:`safer_jax.zoo.convert.load_orbax`: a zoo checkpoint or a plain
      ``StandardCheckpointer`` save of the variables).
    dataset: dataset name or a loaded Dataset; its ``num_classes`` must equal the
      checkpoint's classifier outputs and its images must fit the model.
    data_dir: tfds data directory for non-embedded datasets.

  Returns:
    A :class:`ZooEntry` with ``restored=True``, ``path`` the absolute checkpoint path
    and empty ``metrics`` (the checkpoint is not evaluated here).

  Raises:
    FileNotFoundError: no file or directory at ``checkpoint_path``.
    ValueError: unknown model, a path that is neither ``.npz`` nor a directory, keys
      or shapes that do not fit the model, a class count other than the dataset's,
      images the model cannot take, or NaN/inf parameters (the leaf is named).
  """
  path = os.path.abspath(os.fspath(checkpoint_path))
  name = models_lib.ALIASES.get(model_name, model_name)
  if name not in models_lib.MODELS:
    models_lib.get_model(model_name)  # raises the ValueError listing valid names.
  if not os.path.exists(path):
    raise FileNotFoundError(f"No checkpoint at {path!r}.")
  ds = _dataset_for(name, dataset, data_dir)
  if os.path.isfile(path) and path.endswith(".npz"):
    variables = convert.load_torchvision_npz(path, name)
    classes = int(np.shape(variables["params"]["head"]["fc"]["kernel"])[-1])
    if classes != ds.num_classes:
      raise ValueError(f"Checkpoint {path!r} has {classes} classes but dataset {ds.name!r} has "
                       f"{ds.num_classes}; use a checkpoint trained for {ds.name!r}.")
  elif os.path.isdir(path):
    try:
      variables = convert.load_orbax(
          path, models_lib.get_model(name, num_classes=ds.num_classes), ds.input_shape)
    except ValueError as e:
      raise ValueError(f"{e} (model {name!r} built for dataset {ds.name!r}: "
                       f"num_classes={ds.num_classes}, input {ds.input_shape})") from e
  else:
    raise ValueError(f"Checkpoint path {path!r} must be a .npz file (torchvision state_dict) "
                     f"or an orbax checkpoint directory.")
  check_finite(variables)
  net = models_lib.get_model(name, num_classes=ds.num_classes)
  images = jax.ShapeDtypeStruct((1, *ds.input_shape), np.float32)
  try:
    jax.eval_shape(net.apply, variables, images)
  except Exception as e:  # pylint: disable=broad-except  (flax/lax shape errors vary)
    raise ValueError(f"Checkpoint {path!r} for {name!r} does not accept {ds.name!r} images of "
                     f"shape {ds.input_shape}: {e}") from e
  log.info("Loaded %s from %s", name, path)
  return ZooEntry(name, net, variables, ds, {}, path, restored=True)
