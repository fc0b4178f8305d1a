"""Tests of safer_jax.budgeting.protection: protected layers under a budget, bit-flip injection."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from safer_jax.budgeting import protection
from safer_jax.core import data, layers

SHAPES = {"conv1": (3, 3, 1, 8), "conv2": (3, 3, 8, 16), "fc1": (64, 32), "head": (32, 10)}


def _variables(seed=0, shapes=None):
  rng = np.random.default_rng(seed)
  params = {name: {"kernel": jnp.asarray(rng.normal(size=shape), jnp.float32),
                   "bias": jnp.asarray(rng.normal(size=shape[-1]), jnp.float32)}
            for name, shape in (shapes or SHAPES).items()}
  return {"params": params}


def _bits(x):
  return np.asarray(x, np.float32).view(np.uint32)




@pytest.mark.parametrize("representation", ["int8", "float32"])
def test_protected_layers_are_bit_identical(representation):
  # one kernel shape: bitflip compiles once per shape (seconds each)
  variables = _variables(shapes={"a": (12, 16), "b": (12, 16), "c": (12, 16), "d": (12, 16)})
  names = layers.find_layers(variables)
  protect = jnp.asarray([n in ("b", "d") for n in names])
  refs = protection.reference_kernels(variables, names, representation)
  inject = jax.jit(lambda v, p, rate, key: protection.inject(
      v, names, p, rate, key, representation=representation, references=refs))
  out = inject(variables, protect, 0.05, jax.random.key(3))
  for i, name in enumerate(names):
    new = np.asarray(layers.get_kernel(out, name))
    if protect[i]:
      np.testing.assert_array_equal(_bits(new), _bits(refs[i]))
      if representation == "float32":  # the stored weights themselves
        np.testing.assert_array_equal(_bits(new), _bits(layers.get_kernel(variables, name)))
    else:
      changed = np.mean(_bits(new) != _bits(refs[i]))
      assert changed > 0.05, (name, changed)
    # biases are never touched
    np.testing.assert_array_equal(_bits(out["params"][name]["bias"]),
                                  _bits(variables["params"][name]["bias"]))
  # rate 0: everything equals the fault-free representation
  clean = inject(variables, jnp.zeros(len(names), bool), 0.0, jax.random.key(0))
  for i, name in enumerate(names):
    np.testing.assert_array_equal(_bits(layers.get_kernel(clean, name)), _bits(refs[i]))


def test_selection_respects_budget_and_is_greedy():
  rng = np.random.default_rng(0)
  for trial in range(200):
    n = int(rng.integers(1, 12))
    sizes = {f"l{i}": int(rng.integers(1, 1000)) for i in range(n)}
    scores = {k: float(rng.normal()) for k in sizes}
    frac = float(rng.choice([0.0, 0.1, 0.25, 0.5, 1.0]))
    chosen = protection.select_protected(scores, sizes, frac)
    cap = frac * sum(sizes.values())
    used = sum(sizes[k] for k in chosen)
    assert used <= cap, trial
    # greedy: nothing left out would still fit, and the best-scoring layer that fits alone is in.
    assert all(used + sizes[k] > cap for k in sizes if k not in chosen), trial
    fits = [k for k in sizes if sizes[k] <= cap]
    if fits:
      assert max(fits, key=lambda k: scores[k]) in chosen, trial
  assert protection.select_protected({"a": 1.0, "b": 2.0}, {"a": 10, "b": 10}, 1.0) == [
      "a", "b"]
  with pytest.raises(ValueError, match="budget fraction"):
    protection.select_protected({"a": 1.0}, {"a": 1}, 1.5)


def test_vmapped_evaluator_matches_single_injection():
  variables = {"params": {"fc": {"kernel": jnp.asarray(
      np.random.default_rng(1).normal(size=(16, 4)), jnp.float32)}}}
  rng = np.random.default_rng(2)
  split = data.Split(rng.normal(size=(32, 4, 4, 1)).astype(np.float32),
                     rng.integers(0, 4, size=32).astype(np.int32))

  def apply(v, x):
    return x.reshape(x.shape[0], -1) @ v["params"]["fc"]["kernel"]

  evaluate = protection.make_evaluator(apply, variables, ["fc"], split, "int8", chunk=2)
  keys = jax.random.split(jax.random.key(0), 3)
  acc, loss = evaluate(keys, 0.05, np.array([False]))
  assert acc.shape == loss.shape == (3,)
  for i in range(3):
    v = protection.inject(variables, ["fc"], jnp.array([False]), 0.05, keys[i])
    logits = apply(v, jnp.asarray(split.images))
    np.testing.assert_allclose(acc[i], np.mean(np.argmax(logits, -1) == split.labels), atol=1e-6)
