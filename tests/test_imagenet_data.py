"""ImageNet-style loading in safer_jax.core.data: torchvision's eval transform, bounded subsets.

Everything runs under ``tfds.testing.mock_data`` (no download, no TensorFlow):
in tfds 4.9.10 ``policy=USE_CODE`` mocks ``tfds.data_source`` too (random
records of variable-size uint8 images, random labels), and ``as_data_source_fn``
replaces the records with hand-made ones (class-ordered, greyscale).
"""

import jax
import numpy as np
import pandas as pd
import pytest
import tensorflow_datasets as tfds

from safer_jax.core import data

MEAN = np.asarray(data.IMAGENET_MEAN)
STD = np.asarray(data.IMAGENET_STD)
USE_CODE = tfds.testing.MockPolicy.USE_CODE


def _expected(pixels_uint8):
  """Hand reference: ``(x / 255 - mean) / std`` in float64."""
  return (np.asarray(pixels_uint8, np.float64) / 255.0 - MEAN) / STD


def _records_source(records_by_split):
  """An ``as_data_source_fn`` serving lists of records ``{'image', 'label'}`` per split."""
  def as_data_source(self, split, decoders=None, **kwargs):
    del self, decoders, kwargs
    if isinstance(split, (list, tuple)):
      return [records_by_split[s] for s in split]
    return records_by_split[split]
  return as_data_source


def _class_ordered(n_per_class, num_classes, shape=(9, 12, 3)):
  """Records sorted by label, as some ImageNet validation preparations store them."""
  return [{"image": np.full(shape, 10 * c, np.uint8), "label": c}
          for c in range(num_classes) for _ in range(n_per_class)]


# --- the transform, against hand-computed values -----------------------------------------


def test_constant_image_normalises_exactly():
  image = np.empty((30, 50, 3), np.uint8)
  image[...] = (7, 130, 251)
  out = data.center_crop_resize(image, image_size=8)
  assert out.shape == (8, 8, 3) and out.dtype == np.float32
  np.testing.assert_allclose(out, np.broadcast_to(_expected([7, 130, 251]), (8, 8, 3)),
                             rtol=0, atol=1e-6)


def test_center_crop_offsets_match_torchvision_rounding():
  # Shorter side already == resize_size, so no resampling: the crop is exact.
  # Offsets (round half to even, as torchvision): top = round((14 - 7) / 2) = round(3.5) = 4,
  # left = round((10 - 7) / 2) = round(1.5) = 2.
  rows, cols = np.meshgrid(np.arange(14), np.arange(10), indexing="ij")
  ramp = (rows * 16 + cols).astype(np.uint8)
  image = np.stack([ramp, 255 - ramp, ramp // 2], axis=-1)
  out = data.center_crop_resize(image, image_size=7, resize_size=10)
  np.testing.assert_allclose(out, _expected(image[4:11, 2:9]), rtol=0, atol=1e-6)
  # Even margins: (11 - 7) / 2 = 2 on both sides.
  np.testing.assert_array_equal(data.center_crop(image[:11, :11], 7), image[2:9, 2:9])


def test_resize_of_stripes_is_hand_computable():
  # Columns 0,255,0,255,... halved: PIL's antialiased bilinear filter for a 2x reduction
  # weighs input columns 2i-1, 2i, 2i+1, 2i+2 by 1/4, 3/4, 3/4, 1/4 (renormalised at the edges):
  # left edge (0.75*0 + 0.75*255 + 0.25*0) / 1.75 = 109.3 -> 109; interior 127.5 -> 128;
  # right edge (0.25*255 + 0.75*0 + 0.75*255) / 1.75 = 145.7 -> 146.
  image = np.zeros((8, 8, 3), np.uint8)
  image[:, 1::2] = 255
  out = data.resize_shorter_side(image, 4)
  assert out.shape == (4, 4, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out, np.broadcast_to(
      np.array([109, 128, 128, 146], np.uint8)[None, :, None], (4, 4, 3)))


@pytest.mark.parametrize("shape,size,expected", [
    ((300, 400, 3), 256, (256, 341)),  # long side int(256 * 400 / 300) = int(341.33)
    ((400, 300, 3), 256, (341, 256)),
    ((100, 333, 3), 50, (50, 166)),    # int(166.5): truncated, not rounded
    ((20, 30, 3), 40, (40, 60)),       # small images are upsampled
])
def test_resize_keeps_aspect_like_torchvision(shape, size, expected):
  out = data.resize_shorter_side(np.full(shape, 77, np.uint8), size)
  assert out.shape == expected + (3,)
  assert np.all(out == 77)


def test_resize_agrees_with_independent_antialiased_bilinear():
  # Independent reference: jax.image.resize (triangle kernel, antialiased, float): PIL differs
  # only by rounding to uint8 (after each pass), so by at most ~1 grey level.
  rng = np.random.default_rng(0)
  for shape, size in (((40, 60, 3), 20), ((37, 53, 3), 24), ((20, 30, 3), 40)):
    walk = np.cumsum(np.cumsum(rng.normal(size=shape), 0), 1)
    image = np.round(255 * (walk - walk.min()) / np.ptp(walk)).astype(np.uint8)
    out = data.resize_shorter_side(image, size)
    ref = np.asarray(jax.image.resize(image.astype(np.float32), out.shape, "linear",
                                      antialias=True))
    assert np.abs(out - ref).max() <= 1.5


@pytest.mark.parametrize("shape", [(20, 26), (20, 26, 1)])
def test_greyscale_broadcasts_to_three_channels(shape):
  grey = (np.arange(20 * 26).reshape(20, 26) % 251).astype(np.uint8).reshape(shape)
  out = data.center_crop_resize(grey, image_size=12, resize_size=16)
  rgb = np.repeat(grey.reshape(20, 26, 1), 3, axis=-1)
  assert out.shape == (12, 12, 3)
  np.testing.assert_allclose(out, data.center_crop_resize(rgb, image_size=12, resize_size=16),
                             rtol=0, atol=1e-6)
  # Each channel is the same grey value, normalised with that channel's mean/std.
  raw = out * STD + MEAN
  np.testing.assert_allclose(raw[..., 0], raw[..., 2], atol=1e-5)


def test_default_resize_size_is_256_for_224():
  assert data.default_resize_size(224) == 256
  assert data.default_resize_size(32) == 36


@pytest.mark.parametrize("kwargs,match", [
    ({"image": np.zeros((9, 9, 4), np.uint8)}, r"shape \(9, 9, 4\).*allowed"),
    ({"image": np.zeros((9, 9, 3), np.float32)}, "dtype float32.*allowed: uint8"),
    ({"image": np.zeros((9, 9, 3), np.uint8), "image_size": 8, "resize_size": 6},
     "resize_size=6 must be >= image_size=8"),
    ({"image": np.zeros((9, 9, 3), np.uint8), "image_size": 0}, "image_size=0 must be a positive"),
])
def test_transform_rejects_bad_inputs(kwargs, match):
  kwargs.setdefault("image_size", 4)
  with pytest.raises(ValueError, match=match):
    data.center_crop_resize(**kwargs)


# --- subsets ---------------------------------------------------------------------------------


def test_subset_indices():
  for method in data.SUBSET_METHODS:
    idx = data.subset_indices(1000, 40, method, seed=3)
    assert idx.shape == (40,) and idx.dtype == np.int64
    assert len(set(idx.tolist())) == 40 and idx.min() >= 0 and idx.max() < 1000
  np.testing.assert_array_equal(data.subset_indices(10, 3, "first"), [0, 1, 2])
  np.testing.assert_array_equal(data.subset_indices(10, 4, "even"), [0, 2, 5, 7])
  np.testing.assert_array_equal(data.subset_indices(10, None, "even"), np.arange(10))
  np.testing.assert_array_equal(data.subset_indices(50, 7, "random", seed=1),
                                data.subset_indices(50, 7, "random", seed=1))
  assert not np.array_equal(data.subset_indices(50, 7, "random", seed=1),
                            data.subset_indices(50, 7, "random", seed=2))
  with pytest.raises(ValueError, match=r"subset='shuffle'.*allowed: \['first', 'even', 'random'\]"):
    data.subset_indices(10, 3, "shuffle")


def test_capped_validation_split_mixes_classes():
  records = _class_ordered(n_per_class=10, num_classes=20)  # 200 records, sorted by class
  fn = _records_source({"train": records, "validation": records})
  with tfds.testing.mock_data(policy=USE_CODE, as_data_source_fn=fn):
    rand = data.load_dataset("imagenet2012", max_eval=20, max_train=4, image_size=8)
    again = data.load_dataset("imagenet2012", max_eval=20, max_train=4, image_size=8)
    even = data.load_dataset("imagenet2012", max_eval=20, max_train=4, image_size=8,
                             subset="even")
    first = data.load_dataset("imagenet2012", max_eval=20, max_train=4, image_size=8,
                              subset="first")
  assert len(rand.eval) == 20 and len(rand.train) == 4
  assert len(np.unique(rand.eval.labels)) >= 10  # a first-N read would give 2 classes
  assert len(np.unique(rand.eval.take(5).labels)) >= 3  # prefixes are mixed too
  np.testing.assert_array_equal(rand.eval.labels, again.eval.labels)  # seeded
  np.testing.assert_array_equal(even.eval.labels, np.arange(20))  # exactly one per class
  np.testing.assert_array_equal(first.eval.labels, [0] * 10 + [1] * 10)
  # Images follow their labels through the subset (constant 10 * label grey levels).
  np.testing.assert_allclose(rand.eval.images[:, 0, 0], _expected(
      np.repeat(10 * rand.eval.labels[:, None], 3, axis=1)), atol=1e-6)


# --- tfds loading under mock data ------------------------------------------------------------


def test_imagenet2012_under_mock_data_is_224_normalised():
  with tfds.testing.mock_data(num_examples=6, policy=USE_CODE):
    ds = data.load_dataset("imagenet2012", max_eval=4, max_train=3)
  assert ds.name == "imagenet2012" and ds.num_classes == 1000
  assert ds.input_shape == (224, 224, 3)
  assert ds.eval.images.shape == (4, 224, 224, 3) and ds.train.images.shape == (3, 224, 224, 3)
  assert ds.eval.images.dtype == np.float32 and ds.eval.labels.dtype == np.int32
  assert ds.mean == data.IMAGENET_MEAN and ds.std == data.IMAGENET_STD
  lo, hi = (0 - MEAN) / STD, (1 - MEAN) / STD
  assert np.all(ds.eval.images >= lo - 1e-5) and np.all(ds.eval.images <= hi + 1e-5)
  assert ds.eval.images.min() < 0  # normalised, not [0, 1]
  assert np.all((ds.eval.labels >= 0) & (ds.eval.labels < 1000))


def test_imagenet_default_caps_and_override(monkeypatch):
  monkeypatch.setattr(data, "IMAGENET_MAX_EVAL", 5)
  monkeypatch.setattr(data, "IMAGENET_MAX_TRAIN", 3)
  with tfds.testing.mock_data(num_examples=12, policy=USE_CODE):
    capped = data.load_dataset("imagenet2012", image_size=8)
    everything = data.load_dataset("imagenet2012", image_size=8, max_eval=0, max_train=0)
    chosen = data.load_dataset("imagenet_v2", image_size=8, max_eval=7, max_train=2)
    other = data.load_dataset("cifar10")  # not ImageNet-like: all examples, [0, 1]
  assert (len(capped.train), len(capped.eval)) == (3, 5)
  assert (len(everything.train), len(everything.eval)) == (12, 12)
  assert (len(chosen.train), len(chosen.eval)) == (2, 7) and chosen.input_shape == (8, 8, 3)
  assert (len(other.train), len(other.eval)) == (12, 12) and other.mean is None
  assert 0.0 <= other.eval.images.min() and other.eval.images.max() <= 1.0


def test_greyscale_records_load_as_rgb():
  records = [{"image": np.full((10, 14), 200, np.uint8), "label": 3},
             {"image": np.full((12, 9, 1), 50, np.uint8), "label": 5},
             {"image": np.full((11, 11, 3), 50, np.uint8), "label": 7}]
  fn = _records_source({"train": records, "validation": records})
  with tfds.testing.mock_data(policy=USE_CODE, as_data_source_fn=fn):
    ds = data.load_dataset("imagenet2012", image_size=8, subset="first")
  assert ds.eval.images.shape == (3, 8, 8, 3)
  np.testing.assert_array_equal(ds.eval.labels, [3, 5, 7])
  np.testing.assert_allclose(ds.eval.images[0], np.broadcast_to(_expected([200] * 3), (8, 8, 3)),
                             atol=1e-6)
  np.testing.assert_allclose(ds.eval.images[1], ds.eval.images[2], atol=1e-6)


def test_progress_line_for_long_loads(capsys, monkeypatch):
  monkeypatch.setattr(data, "PROGRESS_MIN_EXAMPLES", 4)
  with tfds.testing.mock_data(num_examples=6, policy=USE_CODE):
    data.load_dataset("imagenet2012", image_size=8, max_eval=5, max_train=2)
    err_on = capsys.readouterr().err
    data.load_dataset("imagenet2012", image_size=8, max_eval=5, max_train=2, progress=False)
    err_off = capsys.readouterr().err
  assert "imagenet2012 validation 5/5" in err_on
  assert "imagenet2012 train" not in err_on  # 2 examples: below the threshold
  assert "validation" not in err_off


def test_unprepared_imagenet_says_how_to_prepare(tmp_path):
  with pytest.raises(ValueError, match="not prepared") as err:
    data.load_dataset("imagenet2012", data_dir=str(tmp_path))
  message = str(err.value)
  assert "tfds build imagenet2012" in message and "downloads/manual" in message
  assert str(tmp_path) in message


@pytest.mark.parametrize("kwargs,match", [
    ({"max_eval": -1}, "max_eval=-1 must be an integer >= 0"),
    ({"subset": "shuffle"}, "subset='shuffle'"),
    ({"preprocessing": "torch"}, "preprocessing='torch' is not supported"),
    ({"image_size": 16, "resize_size": 8}, "resize_size=8 must be >= image_size=16"),
])
def test_bad_load_options_are_named(kwargs, match):
  with tfds.testing.mock_data(num_examples=2, policy=USE_CODE):
    with pytest.raises(ValueError, match=match):
      data.load_dataset("imagenet2012", **kwargs)


def test_digits_ignores_unset_tfds_options_and_rejects_set_ones():
  ds = data.load_dataset("digits", max_eval=None, max_train=None, image_size=None)
  np.testing.assert_array_equal(ds.eval.labels, data.load_digits().eval.labels)
  assert ds.mean is None
  with pytest.raises(ValueError, match=r"\['max_eval'\] apply to tfds datasets only"):
    data.load_dataset("digits", max_eval=10)


def test_imagenet_like_names():
  for name in ("imagenet2012", "imagenet2012:5.1.0", "imagenet2012_real", "imagenet_v2",
               "imagenet_v2/matched-frequency", "imagenette", "imagenet_a"):
    assert data.is_imagenet_like(name), name
  for name in ("mnist", "cifar10", "imagenet_resized/32x32", "digits"):
    assert not data.is_imagenet_like(name), name


# --- experiments wiring ----------------------------------------------------------------------


def _mock_imagenet_config(module, tmp_path, **fields):
  config = module.get_config(tiny=True)
  config.update({"dataset": "imagenet2012", "data_dir": str(tmp_path / "tfds"),
                 "cache_dir": str(tmp_path / "zoo"), "progress": False,
                 "max_train": 16, "max_eval": 16, "image_size": 16, **fields})
  return config


def test_sensitivity_experiment_runs_on_mock_imagenet2012(tmp_path):
  """``--dataset=imagenet2012 --data_dir=...`` end to end, in-process (mock data cannot cross
  into launch.py's subprocess); 16x16 crops and 16 images keep the trained mlp small."""
  import json  # pylint: disable=import-outside-toplevel
  from experiments import sensitivity  # pylint: disable=import-outside-toplevel
  config = _mock_imagenet_config(sensitivity, tmp_path, families=("quantize", "noise"),
                                 quantize=(4,), noise=(0.5,), eval_examples=0)
  with tfds.testing.mock_data(num_examples=20, policy=USE_CODE):
    result = sensitivity.run(config, str(tmp_path / "out"))
  meta = json.loads(open(result["paths"]["meta"]).read())
  assert meta["dataset"] == "imagenet2012"
  assert set(result["paths"]) >= {"table", "summary", "heatmap"}
  table = pd.read_csv(result["paths"]["table"])
  assert set(table.layer) == {"dense1/fc", "dense2/fc", "head/fc"}


def test_torchvision_checkpoint_sensitivity_and_quant_sweep_on_mock_imagenet2012(tmp_path):
  """The README's ImageNet recipe: resnet18 from a torchvision-format .npz (random weights,
  1000 classes) on mock imagenet2012, sensitivity on two layers, then quant_sweep (mlp)."""
  from experiments import quant_sweep, sensitivity  # pylint: disable=import-outside-toplevel
  from test_imagenet_models import resnet_state_dict  # pylint: disable=import-outside-toplevel
  npz = tmp_path / "resnet18.npz"
  np.savez(npz, **resnet_state_dict(18, 1000))
  config = _mock_imagenet_config(sensitivity, tmp_path, model="resnet18", checkpoint=str(npz),
                                 image_size=32, layers=("stem/conv", "head/fc"),
                                 families=("quantize",), quantize=(8, 2), eval_examples=0)
  with tfds.testing.mock_data(num_examples=20, policy=USE_CODE):
    result = sensitivity.run(config, str(tmp_path / "sens"))
    table = pd.read_csv(result["paths"]["table"])
    assert list(table.layer.unique()) == ["stem/conv", "head/fc"]
    assert len(table) == 4 and table.accuracy.between(0, 1).all()
    # weights loaded from the file, not trained: nothing was written to the zoo cache.
    assert not (tmp_path / "zoo").exists()
    q = quant_sweep.run(_mock_imagenet_config(quant_sweep, tmp_path, calib_examples=16),
                        str(tmp_path / "quant"))
  results = pd.read_csv(q["paths"]["results"])
  assert len(results) > 0 and results["accuracy"].between(0, 1).all()
