"""Tests of the orbax model-zoo cache: bit-identical restore, corruption detection."""

import os

import jax
import numpy as np
import pytest

from safer_jax import zoo
from safer_jax.core import checkpoints
from safer_jax.training import train

TINY = train.TrainConfig(epochs=2)


def _assert_identical(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(la, lb):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_first_request_trains_then_restores_bit_identical(tmp_path, digits):
  first = zoo.pretrained("lenet", digits, seed=0, cache_dir=str(tmp_path), config=TINY,
                         progress=False)
  assert not first.restored
  second = zoo.pretrained("lenet", digits, seed=0, cache_dir=str(tmp_path), config=TINY,
                          progress=False)
  assert second.restored and second.path == first.path
  _assert_identical(first.variables, second.variables)
  assert second.metrics["accuracy"] == pytest.approx(first.metrics["accuracy"])
  # a different seed is a different entry.
  other = zoo.pretrained("lenet", digits, seed=1, cache_dir=str(tmp_path), config=TINY,
                         progress=False)
  assert other.path != first.path


def _largest_data_file(path):
  files = [os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs]
  return max(files, key=os.path.getsize)


@pytest.mark.parametrize("damage", ["truncate", "flip_bytes"])
def test_damaged_checkpoint_is_detected_and_retrained(tmp_path, digits, damage):
  entry = zoo.pretrained("mlp", digits, seed=0, cache_dir=str(tmp_path), config=TINY,
                         progress=False)
  victim = _largest_data_file(entry.path)
  with open(victim, "r+b") as f:
    if damage == "truncate":
      f.truncate(os.path.getsize(victim) // 2)
    else:
      f.seek(os.path.getsize(victim) // 2)
      chunk = f.read(64)
      f.seek(os.path.getsize(victim) // 2)
      f.write(bytes(b ^ 0xFF for b in chunk))
  abstract = jax.eval_shape(lambda: entry.variables)
  with pytest.raises(checkpoints.CorruptCheckpointError):
    checkpoints.restore_checkpoint(entry.path, abstract)
  again = zoo.pretrained("mlp", digits, seed=0, cache_dir=str(tmp_path), config=TINY,
                         progress=False)
  assert not again.restored  # retrained, not silently loaded
  _assert_identical(entry.variables, again.variables)  # deterministic retraining


def test_half_written_checkpoint_is_ignored(tmp_path, digits):
  """An orbax tmp directory (save interrupted before commit) is not a finished step."""
  path = str(tmp_path / "entry")
  os.makedirs(os.path.join(path, "0.orbax-checkpoint-tmp-123"))
  with pytest.raises(FileNotFoundError):
    checkpoints.restore_checkpoint(path, {"params": {}})
  del digits


def test_checksum_detects_one_changed_value():
  tree = {"params": {"a": np.zeros((3,), np.float32)}}
  other = {"params": {"a": np.array([0, 0, 1e-30], np.float32)}}
  assert checkpoints.checksum(tree) != checkpoints.checksum(other)
  assert checkpoints.checksum(tree) == checkpoints.checksum(
      {"params": {"a": np.zeros((3,), np.float32)}})


def test_image_size_is_part_of_the_cache_entry(tmp_path, digits):
  """The same dataset name at another image size is another entry, not a failed restore."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  from safer_jax.core import data  # pylint: disable=import-outside-toplevel

  def padded(split):
    return data.Split(np.pad(split.images, ((0, 0), (2, 2), (2, 2), (0, 0))), split.labels)

  big = dataclasses.replace(digits, train=padded(digits.train), eval=padded(digits.eval),
                            input_shape=(12, 12, 1))
  small = zoo.pretrained("mlp", digits, cache_dir=str(tmp_path), config=TINY, progress=False)
  large = zoo.pretrained("mlp", big, cache_dir=str(tmp_path), config=TINY, progress=False)
  assert large.path != small.path and not large.restored
  again = zoo.pretrained("mlp", digits, cache_dir=str(tmp_path), config=TINY, progress=False)
  assert again.restored and again.path == small.path
  _assert_identical(again.variables, small.variables)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2_imagenet"])
def test_imagenet_size_models_are_not_trained_unless_asked(tmp_path, monkeypatch, digits, name):
  """An ImageNet architecture is refused before any data loading or training; the
  ``train_from_scratch=True`` keyword lets it through to the usual restore-or-train."""
  def forbidden(*args, **kwargs):
    raise AssertionError(f"called with {args} {kwargs}")

  monkeypatch.setattr(zoo.cache.data_lib, "load_dataset", forbidden)
  monkeypatch.setattr(zoo.cache.train_lib, "train", forbidden)
  monkeypatch.setattr(zoo.cache, "_restore_or_train", forbidden)
  with pytest.raises(ValueError) as err:
    zoo.pretrained(name, "digits", cache_dir=str(tmp_path), progress=False)
  msg = str(err.value)
  for part in (repr(name), "ImageNet-size architecture", "not train it on first use",
               "--config.checkpoint=PATH", ".npz", "orbax", "--config.train_from_scratch=True"):
    assert part in msg, (part, msg)
  assert not os.listdir(tmp_path)  # nothing cached.

  calls = []
  monkeypatch.setattr(zoo.cache, "_restore_or_train", lambda *args: calls.append(args) or "entry")
  got = zoo.pretrained(name, digits, cache_dir=str(tmp_path), progress=False,
                       train_from_scratch=True)
  assert got == "entry" and len(calls) == 1 and calls[0][0] == name
