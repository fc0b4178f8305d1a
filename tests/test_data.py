"""Tests of safer_jax.core.data: embedded digits and the tfds path under mock data."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from safer_jax.core import data


def test_digits_shapes_and_ranges(digits):
  assert digits.name == "digits"
  assert digits.input_shape == (8, 8, 1)
  assert digits.num_classes == 10
  assert len(digits.train) + len(digits.eval) == 1797
  assert digits.train.images.dtype == np.float32 and digits.train.labels.dtype == np.int32
  assert digits.train.images.min() >= 0.0 and digits.train.images.max() <= 1.0
  assert set(np.unique(digits.eval.labels)) == set(range(10))


def test_digits_split_is_fixed_and_disjoint():
  a, b = data.load_digits(), data.load_digits()
  np.testing.assert_array_equal(a.train.images, b.train.images)
  np.testing.assert_array_equal(a.eval.labels, b.eval.labels)
  train = {x.tobytes() for x in a.train.images}
  overlap = sum(x.tobytes() in train for x in a.eval.images)
  # digits contains a few exact duplicate images; a split by index keeps them rare.
  assert overlap <= 5
  c = data.load_digits(split_seed=1)
  assert not np.array_equal(a.eval.labels, c.eval.labels)


def test_unknown_dataset_names_valid_ones():
  with pytest.raises(ValueError, match="Unknown dataset 'no_such_dataset'"):
    data.load_dataset("no_such_dataset")


def test_unprepared_tfds_dataset_says_how_to_prepare(tmp_path):
  with pytest.raises(ValueError, match="not prepared") as err:
    data.load_dataset("mnist", data_dir=str(tmp_path))
  assert "tfds build mnist" in str(err.value)


@pytest.mark.parametrize("name,shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_tfds_path_under_mock_data(name, shape):
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    ds = data.load_dataset(name, max_eval=5)
  assert ds.name == name
  assert ds.input_shape == shape and ds.num_classes == 10
  assert len(ds.train) == 12 and len(ds.eval) == 5
  assert ds.train.images.dtype == np.float32
  assert 0.0 <= ds.train.images.min() and ds.train.images.max() <= 1.0


def test_tfds_resize_under_mock_data():
  with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
    ds = data.load_dataset("cifar10", image_size=8)
  assert ds.input_shape == (8, 8, 3)


def test_batches_from_split_full_batches_in_order():
  split = data.Split(np.arange(50, dtype=np.float32).reshape(10, 5), np.arange(10))
  batches = data.batches_from_split(split, 3)
  assert len(batches) == 3  # only full batches
  for i, b in enumerate(batches):
    np.testing.assert_array_equal(b["image"], split.images[3 * i:3 * i + 3])
    np.testing.assert_array_equal(b["label"], split.labels[3 * i:3 * i + 3])
  assert len(data.batches_from_split(split, 3, 2)) == 2
  assert [len(b["label"]) for b in data.batches_from_split(split, 32)] == [10]
