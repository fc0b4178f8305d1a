"""The named-kernel toolkit of safer_jax.core.layers against brute-force expectations."""

import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from safer_jax.core import layers

RNG = np.random.default_rng(0)


def _params():
  """Three layers and a bias: ``stem``, ``block/conv1``, ``block/conv2``, ``head``."""
  return {"stem": {"kernel": RNG.normal(size=(3, 3, 1, 4)).astype(np.float32)},
          "block": {"conv1": {"kernel": RNG.normal(size=(3, 3, 4, 4)).astype(np.float32),
                              "bias": np.zeros(4, np.float32)},
                    "conv2": {"kernel": RNG.normal(size=(3, 3, 4, 4)).astype(np.float32)}},
          "head": {"kernel": RNG.normal(size=(4, 10)).astype(np.float32),
                   "bias": np.zeros(10, np.float32)}}


NAMES = ["stem", "block/conv1", "block/conv2", "head"]  # find_layers order: the dicts' order
RULES = [
    [("block/conv1", 1), ("block/.*", 2), (".*", 3)],
    [(".*", 9), ("head", 1)],  # the catch-all first: "head" never wins but matches a layer
    [("head|stem", "a"), ("block/conv2", "b")],
    [("block/conv[12]", 0.5)],
]


def _first_match(name, rules):
  """Brute force: the value of the first rule whose whole pattern equals the name's match."""
  for pattern, value in rules:
    m = re.match(f"(?:{pattern})$", name)
    if m is not None:
      return value
  return "untouched"


@pytest.mark.parametrize("rules", RULES)
def test_match_layers_first_match_wins(rules):
  got = layers.match_layers(_params(), rules)
  expected = {n: _first_match(n, rules) for n in NAMES}
  assert got == {n: v for n, v in expected.items() if v != "untouched"}
  assert list(got) == [n for n in NAMES if n in got]  # pytree order


@pytest.mark.parametrize("rules", RULES)
def test_map_kernels_applies_fn_to_the_matched_kernels_only(rules):
  params = _params()
  calls = []

  def fn(name, w, value):
    calls.append(name)
    return w * 2.0 + (1.0 if isinstance(value, str) else value)

  out = jax.jit(lambda p: layers.map_kernels(p, fn, rules))(params)
  for name in NAMES:
    path = name.split("/")
    w = params[path[0]] if len(path) == 1 else params[path[0]][path[1]]
    o = out[path[0]] if len(path) == 1 else out[path[0]][path[1]]
    v = _first_match(name, rules)
    expected = w["kernel"] if v == "untouched" else w["kernel"] * 2.0 + (
        1.0 if isinstance(v, str) else v)
    np.testing.assert_allclose(o["kernel"], expected, rtol=1e-6)
    if "bias" in w:
      np.testing.assert_array_equal(o["bias"], w["bias"])
  assert sorted(calls) == sorted(n for n in NAMES if _first_match(n, rules) != "untouched")


def test_map_kernels_with_a_mapping_names_layers_exactly():
  params = _params()
  out = layers.map_kernels(params, lambda _, w, m: w * m, {"head": 0.0})
  np.testing.assert_array_equal(out["head"]["kernel"], np.zeros((4, 10), np.float32))
  assert out["stem"]["kernel"] is params["stem"]["kernel"]  # untouched leaves are shared
  assert params["head"]["kernel"].any()  # the input is not mutated
  with pytest.raises(KeyError, match="'block/.*' not found"):
    layers.map_kernels(params, lambda _, w, m: w, {"block/.*": 1})  # not a regex here


def test_map_kernels_on_variables_keeps_other_collections():
  variables = {"params": _params(), "batch_stats": {"bn": {"mean": np.ones(3)}}}
  out = layers.map_kernels(variables, lambda _, w, v: w + v, [("stem", 1.0)])
  np.testing.assert_allclose(out["params"]["stem"]["kernel"],
                             variables["params"]["stem"]["kernel"] + 1.0)
  assert out["batch_stats"] is variables["batch_stats"]


def test_rule_matching_no_layer_raises_naming_it_and_listing_layers():
  with pytest.raises(ValueError, match=r"'conv\.\*' matches no layer.*'stem'.*'block/conv1'"):
    layers.map_kernels(_params(), lambda _, w, v: w, [("head", 1), ("conv.*", 2)])
  with pytest.raises(ValueError, match="not a valid regex"):
    layers.match_layers(_params(), [("(", 1)])
  with pytest.raises(ValueError, match=r"\(regex, value\) pair"):
    layers.match_layers(_params(), ["head"])
  with pytest.raises(ValueError, match="holds no layer"):
    layers.match_layers({"x": {"bias": np.zeros(3)}}, [(".*", 1)])


def test_select_layers_is_the_union_of_matches_in_pytree_order():
  params = _params()
  assert layers.select_layers(params, ["block/.*", "stem"]) == ["stem", "block/conv1",
                                                                 "block/conv2"]
  assert layers.select_layers(params) == NAMES
  with pytest.raises(ValueError, match="'nope' matches no layer"):
    layers.select_layers(params, ["head", "nope"])


def test_get_kernels_and_replace_kernels():
  params = _params()
  ks = layers.get_kernels(params)
  assert list(ks) == NAMES
  new = {"head": np.zeros((4, 10), np.float32)}
  out = layers.replace_kernels(params, new)
  assert out["head"]["kernel"] is new["head"] and out["head"]["bias"] is params["head"]["bias"]
  assert layers.get_kernels(out, ["head"])["head"] is new["head"]
  assert layers.replace_kernels(params, {}) == params


def test_leaves_by_path():
  tree = {"a": {"kernel": 1, "b": {}}, 2: {"c": 3}}
  assert layers.leaves_by_path(tree) == {("a", "kernel"): 1, ("2", "c"): 3}


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
@pytest.mark.parametrize("as_jax", [False, True])
def test_check_finite_names_the_first_bad_leaf(dtype, as_jax):
  params = _params()
  bad = np.array(params["block"]["conv2"]["kernel"], dtype)
  bad[0, 1, 2, 3] = np.nan
  bad[2, 2, 0, 0] = np.inf
  bad[1, 1, 1, 1] = -np.inf
  tree = {"params": {**params, "block": {**params["block"], "conv2": {"kernel": bad}}},
          "step": np.int32(3)}
  tree = jax.tree.map(jnp.asarray, tree) if as_jax else tree
  # Brute force: the first leaf (sorted key order) with a non-finite entry, and its counts.
  flat = [(p, np.asarray(x, np.float32)) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]
  path, arr = next((p, a) for p, a in flat if not np.isfinite(a).all())
  msg = (f"Parameter {jax.tree_util.keystr(path)} holds NaN or inf values (3 of {arr.size}: "
         f"1 NaN, 2 inf; first at index (0, 1, 2, 3))")
  assert "['block']['conv2']['kernel']" in msg
  with pytest.raises(ValueError, match=re.escape(msg)):
    layers.check_finite(tree)
  layers.check_finite(params)
  layers.check_finite({"ints": np.arange(3)})


def test_check_finite_of_one_array_and_under_jit():
  w = np.ones((2, 3), np.float32)
  w[1, 2] = np.inf
  with pytest.raises(ValueError, match=re.escape("w holds NaN or inf values (1 of 6: 0 NaN, 1 inf; "
                                                 "first at index (1, 2))")):
    layers.check_finite(w, "w")
  jax.jit(lambda x: layers.check_finite(x) or x)(w)  # traced: cannot be checked, passes


def test_abstract_variables_matches_init_without_allocating():
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  from safer_jax.training import train  # pylint: disable=import-outside-toplevel
  net = nn.Sequential([nn.Conv(4, (3, 3), name="conv"), nn.Dense(3, name="head")])
  abstract = layers.abstract_variables(net, (5, 5, 2), seed=3)
  real = train.init_variables(net, (5, 5, 2), 3)
  assert jax.tree.structure(abstract) == jax.tree.structure(real)
  assert all(isinstance(a, jax.ShapeDtypeStruct) and a.shape == r.shape and a.dtype == r.dtype
             for a, r in zip(jax.tree.leaves(abstract), jax.tree.leaves(real)))


def test_trace_layers_counts_multiply_adds_of_dense_grouped_and_strided_kernels():
  import flax.linen as nn  # pylint: disable=import-outside-toplevel

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Conv(4, (3, 3), name="conv")(x))  # 8x8x4 out, 3x3x2 in
      x = nn.Conv(4, (3, 3), feature_group_count=4, name="depthwise")(x)  # 3x3x1 in
      x = nn.Conv(8, (3, 3), strides=2, name="strided")(x)  # 4x4x8 out, 3x3x4 in
      return nn.Dense(10, name="head")(x.reshape(x.shape[0], -1))  # 128 in

  x = jnp.ones((3, 8, 8, 2))
  net = Net()
  variables = net.init(jax.random.key(0), x)
  order, macs = layers.trace_layers(net.apply, variables, x)
  assert order == ["conv", "depthwise", "strided", "head"]
  assert macs == {"conv": 64 * 4 * 18, "depthwise": 64 * 4 * 9, "strided": 16 * 8 * 36,
                  "head": 10 * 128}
  # XLA counts 2 flops per multiply-add, without the taps that fall on SAME padding (22,826
  # here, 89% of 2 x 12,800), plus the biases and the relu.
  flops = jax.jit(net.apply).lower(variables, x[:1]).compile().cost_analysis()["flops"]
  assert 0.8 * 2 * sum(macs.values()) <= flops <= 2 * sum(macs.values())
  assert layers.execution_order(net.apply, variables, x) == order
  assert layers.trace_layers(lambda v, y: y, variables, x) == (layers.find_layers(variables), {})
