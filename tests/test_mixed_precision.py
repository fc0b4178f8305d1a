"""Tests of mixed-precision cost tables and quantized models."""

import numpy as np
import pytest
from conftest import train_small

from safer_jax.budgeting import budget, mixed_precision
from safer_jax.core import layers


@pytest.fixture(scope="module")
def mlp(digits):
  model, variables = train_small(digits, "mlp", epochs=3)
  return model, variables, digits


def test_quantized_model_has_exactly_the_chosen_bits(mlp):
  _, variables, _ = mlp
  bits = {"dense1/fc": 2, "dense2/fc": 5, "head/fc": 8}
  q = mixed_precision.quantize_model(variables, bits, full_range=False)  # the restricted grid
  for name, b in bits.items():
    w = np.asarray(layers.get_kernel(variables, name), np.float64)
    qw = np.asarray(layers.get_kernel(q, name), np.float64)
    levels = 2 ** (b - 1) - 1
    scale = np.abs(w).max(axis=0) / levels  # NumPy reference: symmetric per output channel
    codes = qw / scale
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)
    assert np.abs(np.round(codes)).max() <= levels
    np.testing.assert_allclose(qw, np.clip(np.round(w / scale), -levels, levels) * scale,
                               rtol=1e-5, atol=1e-6)
    assert max(len(np.unique(np.round(codes[:, c]))) for c in range(w.shape[1])) <= 2 ** b - 1
  # biases and other leaves untouched
  np.testing.assert_array_equal(q["params"]["head"]["fc"]["bias"],
                                variables["params"]["head"]["fc"]["bias"])


def test_cost_tables_shapes_and_sanity(mlp):
  model, variables, digits = mlp
  tables, seconds = mixed_precision.cost_tables(
      model, variables, digits.train.take(128), (2, 4, 8),
      sources=("oracle", "fisher", "quant_error", "corruption"), max_batches=1)
  names = layers.find_layers(variables)
  for source, table in tables.items():
    assert set(table) == set(names) and seconds[source] >= 0
    for name in names:
      assert set(table[name]) == {2, 4, 8}
      # fewer bits never cost less for the quantization-error based tables
      if source in ("quant_error", "fisher", "corruption"):
        assert table[name][2] >= table[name][4] >= table[name][8] >= 0
  # the oracle is the measured loss increase: 2-bit hurts more than 8-bit somewhere
  assert max(tables["oracle"][n][2] for n in names) > max(tables["oracle"][n][8] for n in names)


def test_allocation_from_costs_meets_budget(mlp):
  model, variables, digits = mlp
  tables, _ = mixed_precision.cost_tables(model, variables, digits.train.take(128), (2, 4, 8),
                                          sources=("quant_error",), max_batches=1)
  sizes = {n: int(layers.get_kernel(variables, n).size) for n in layers.find_layers(variables)}
  cap = budget.budget_from_avg_bits(sizes, 3.0)
  alloc = budget.allocate_bits(tables["quant_error"], sizes, (2, 4, 8), cap)
  assert alloc.total_bits <= cap and alloc.avg_bits <= 3.0


def test_unknown_source():
  with pytest.raises(ValueError, match="Unknown cost source"):
    mixed_precision.cost_tables(None, {"params": {}}, None, (2,), sources=("nope",))
