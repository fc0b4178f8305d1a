"""Tests of safer_jax.zoo.text: the embedded pydoc corpus and tfds text datasets under mock data."""

import socket

import numpy as np
import pytest
import tensorflow_datasets as tfds

from safer_jax.core import data
from safer_jax.zoo import text

USE_CODE = tfds.testing.MockPolicy.USE_CODE


@pytest.fixture(scope="module")
def pydoc():
  return text.load_text_corpus()


@pytest.fixture
def no_network(monkeypatch):
  """Any connection attempt fails the test: nothing may download."""
  def refuse(*args, **kwargs):
    raise AssertionError(f"network access attempted: {args!r}")
  monkeypatch.setattr(socket.socket, "connect", refuse)
  monkeypatch.setattr(socket, "getaddrinfo", refuse)
  monkeypatch.setattr(socket, "create_connection", refuse)


def _reference_windows(stream, t):
  """Row i: stream[i*t : i*t + t] -> stream[i*t + 1 : i*t + t + 1], one window at a time."""
  rows = []
  for start in range(0, len(stream) - 1, t):
    w = stream[start:start + t + 1]
    n = len(w) - 1
    tok = np.zeros(t, np.int32)
    tgt = np.zeros(t, np.int32)
    msk = np.zeros(t, np.float32)
    tok[:n], tgt[:n], msk[:n] = w[:-1], w[1:], 1.0
    rows.append((tok, tgt, msk))
  return tuple(np.stack(a) for a in zip(*rows))


def test_pydoc_layout_and_metadata(pydoc):
  assert pydoc.name == "pydoc" and pydoc.num_classes == 256 and pydoc.input_shape == (64,)
  assert len(pydoc.train) == text.DEFAULT_MAX_TRAIN == 4096
  assert len(pydoc.eval) == text.DEFAULT_MAX_EVAL == 512
  for split in (pydoc.train, pydoc.eval):
    assert list(split.arrays) == ["tokens", "targets", "mask"]
    assert split.arrays["tokens"].dtype == np.int32 and split.arrays["targets"].dtype == np.int32
    assert split.arrays["mask"].dtype == np.float32
    assert split.arrays["tokens"].shape == split.arrays["mask"].shape == (len(split), 64)
  assert "pydoc" in text.text_datasets() and "lm1b" in text.text_datasets()


def test_pydoc_windows_are_the_stream_shifted_by_one():
  """Every train/eval row against a direct NumPy reference of the text's bytes."""
  ds = text.load_text_corpus(seq_len=50, max_train=0, max_eval=0, eval_fraction=0.2)
  raw = text.corpus_text()
  stream = np.frombuffer(raw.encode("utf-8"), np.uint8).astype(np.int32)
  cut = len(stream) - int(round(0.2 * len(stream)))
  for split, part in ((ds.train, stream[:cut]), (ds.eval, stream[cut:])):
    tok, tgt, msk = _reference_windows(part, 50)
    np.testing.assert_array_equal(split.arrays["tokens"], tok)
    np.testing.assert_array_equal(split.arrays["targets"], tgt)
    np.testing.assert_array_equal(split.arrays["mask"], msk)
    # laid end to end: tokens = part[:-1], targets = part[1:]
    keep = split.arrays["mask"].reshape(-1) > 0
    np.testing.assert_array_equal(split.arrays["tokens"].reshape(-1)[keep], part[:-1])
    np.testing.assert_array_equal(split.arrays["targets"].reshape(-1)[keep], part[1:])
  # train and eval cover disjoint byte ranges and the whole stream between them.
  n_train = int(ds.train.arrays["mask"].sum()) + 1
  n_eval = int(ds.eval.arrays["mask"].sum()) + 1
  assert n_train + n_eval == len(stream) and n_train == cut
  assert text.decode(stream) == raw


def test_pydoc_caps_take_the_first_windows_and_are_deterministic(pydoc):
  again = text.load_text_corpus()
  assert again.train == pydoc.train and again.eval == pydoc.eval
  full = text.load_text_corpus(max_train=0, max_eval=0)
  assert len(full.train) > 4096 and len(full.eval) > 512
  assert full.train.take(4096) == pydoc.train and full.eval.take(512) == pydoc.eval
  small = text.load_text_corpus(max_train=3, max_eval=2, seq_len=16)
  assert len(small.train) == 3 and len(small.eval) == 2 and small.input_shape == (16,)
  assert small.train.arrays["mask"].all()  # capped before the short last window
  # The boundary: train's last target is the byte before eval's first token (no overlap, no gap).
  stream = text.encode(text.corpus_text())
  cut = len(stream) - int(round(0.1 * len(stream)))
  tr = full.train.arrays["targets"].reshape(-1)[full.train.arrays["mask"].reshape(-1) > 0]
  ev = full.eval.arrays["tokens"].reshape(-1)[full.eval.arrays["mask"].reshape(-1) > 0]
  assert len(tr) == cut - 1 and tr[-1] == stream[cut - 1] and ev[0] == stream[cut]


def test_mask_and_padding_of_the_last_window():
  split = text.windows(np.arange(1, 12), seq_len=4)  # 11 tokens -> 10 targets: 4 + 4 + 2
  np.testing.assert_array_equal(split.arrays["tokens"],
                                [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 0, 0]])
  np.testing.assert_array_equal(split.arrays["targets"],
                                [[2, 3, 4, 5], [6, 7, 8, 9], [10, 11, 0, 0]])
  np.testing.assert_array_equal(split.arrays["mask"], [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]])
  exact = text.windows(np.arange(9), seq_len=4)  # 8 targets: two full rows, no padding row
  assert exact.arrays["mask"].shape == (2, 4) and exact.arrays["mask"].all()
  rows = text.sentence_rows([[7, 8, 9], [5], [1, 2, 3, 4, 5, 6, 7]], seq_len=4)
  np.testing.assert_array_equal(rows.arrays["tokens"], [[7, 8, 0, 0], [1, 2, 3, 4]])
  np.testing.assert_array_equal(rows.arrays["targets"], [[8, 9, 0, 0], [2, 3, 4, 5]])
  np.testing.assert_array_equal(rows.arrays["mask"], [[1, 1, 0, 0], [1, 1, 1, 1]])
  with pytest.raises(ValueError, match="nothing to predict"):
    text.windows([3], seq_len=4)


def test_decode_round_trip_and_errors():
  s = "Ünïcode — «text» 🐍\n"
  ids = text.encode(s)
  assert ids.dtype == np.int32 and ids.max() < 256 and len(ids) == len(s.encode())
  assert text.decode(ids) == s and text.decode(list(ids)) == s
  assert text.decode(ids[:1]) == "\ufffd"  # a cut multi-byte character: replaced, no error
  with pytest.raises(ValueError, match="bytes in"):
    text.decode([300])


@pytest.mark.parametrize("kwargs,match", [
    ({"level": "char"}, "level='char'"), ({"eval_fraction": 1.0}, "eval_fraction"),
    ({"seq_len": 0}, "seq_len"), ({"max_train": -1}, "max_train")])
def test_bad_options(kwargs, match):
  with pytest.raises(ValueError, match=match):
    text.load_text_corpus(**kwargs)


def test_load_dispatch_and_unknown_names():
  assert text.load("pydoc", max_train=2, max_eval=1).train == \
      text.load_text_corpus(max_train=2, max_eval=1).train
  with pytest.raises(ValueError, match="Unknown text dataset 'mnist'"):
    text.load("mnist")
  with pytest.raises(ValueError, match="tfds text datasets only"):
    text.load("pydoc", data_dir="/tmp")
  with pytest.raises(ValueError, match="embedded corpora"):
    text.load("lm1b", eval_fraction=0.2)


def test_unigram_baseline(pydoc):
  loss = text.unigram_loss(pydoc.train, pydoc.eval)
  assert 2.5 < loss < np.log(256)  # English bytes: ~3.3 nats, far below uniform (5.55)


@pytest.mark.parametrize("name", ["tiny_shakespeare", "lm1b"])
def test_unprepared_tfds_text_says_how_to_prepare(name, tmp_path, no_network):
  with pytest.raises(ValueError, match="not prepared") as err:
    text.load(name, data_dir=str(tmp_path))
  assert f"tfds build {name}" in str(err.value) and str(tmp_path) in str(err.value)


def _mock_records(name, split, n):
  """The records tfds' mock data gives (the same as the loader sees; deterministic)."""
  with tfds.testing.mock_data(num_examples=n, policy=USE_CODE):
    source = tfds.data_source(name, split=split, download=False)
    values = [source[i]["text"] for i in range(len(source))]
  return [text.encode(v if isinstance(v, str) else bytes(v)) for v in values]


def test_tiny_shakespeare_under_mock_data(no_network):
  with tfds.testing.mock_data(num_examples=6, policy=USE_CODE):
    ds = text.load_tfds_text("tiny_shakespeare", seq_len=8)
  assert ds.name == "tiny_shakespeare" and ds.num_classes == 256 and ds.input_shape == (8,)
  stream = np.concatenate(_mock_records("tiny_shakespeare", "validation", 6))
  tok, tgt, msk = _reference_windows(stream, 8)
  np.testing.assert_array_equal(ds.eval.arrays["tokens"], tok)
  np.testing.assert_array_equal(ds.eval.arrays["targets"], tgt)
  np.testing.assert_array_equal(ds.eval.arrays["mask"], msk)
  assert len(ds.train) >= 2 and ds.train.arrays["tokens"].dtype == np.int32
  with tfds.testing.mock_data(num_examples=6, policy=USE_CODE):
    capped = text.load("tiny_shakespeare", seq_len=8, max_train=2, max_eval=1)
  assert len(capped.train) == 2 and len(capped.eval) == 1
  assert capped.train == ds.train.take(2)


def test_lm1b_under_mock_data(no_network):
  with tfds.testing.mock_data(num_examples=7, policy=USE_CODE):
    ds = text.load("lm1b", seq_len=6, max_eval=3)
  assert ds.name == "lm1b" and ds.input_shape == (6,)
  assert len(ds.train) == 7 and len(ds.eval) == 3
  sentences = _mock_records("lm1b", "test", 7)[:3]
  for i, s in enumerate(sentences):  # one row per sentence, truncated to seq_len + 1 bytes
    n = min(len(s) - 1, 6)
    np.testing.assert_array_equal(ds.eval.arrays["tokens"][i, :n], s[:n])
    np.testing.assert_array_equal(ds.eval.arrays["targets"][i, :n], s[1:n + 1])
    np.testing.assert_array_equal(ds.eval.arrays["mask"][i], np.arange(6) < n)
    assert not ds.eval.arrays["tokens"][i, n:].any()


def test_text_split_is_a_data_split(pydoc):
  batch = pydoc.eval.batch(0, 3)
  assert set(batch) == {"tokens", "targets", "mask"} and batch["tokens"].shape == (3, 64)
  assert isinstance(pydoc, data.Dataset)
  with pytest.raises(ValueError, match="no 'image' array"):
    _ = pydoc.train.images
