"""Layers of a Flax parameter pytree, named by their path.

A *layer* is any module in the parameter pytree that holds a ``kernel`` leaf
or, for embedding tables, an ``embedding`` leaf (see :data:`KERNEL_LEAVES`).
It is named by the ``'/'``-joined path of its module, e.g. ``'block2/conv1'``;
its kernel leaf is ``params['block2']['conv1']['kernel']``. Linen and NNX
alike; an ``nnx.State`` is read through :func:`as_pure` (integer keys of
``nnx.List`` / ``nnx.Sequential`` become strings: ``'layers/0'``).

Per-channel operations (quantization scales, structured pruning) use the
**last kernel axis** as the channel axis. What that axis is, per layer type:

===============================================  =============================  =======================
layer (linen / nnx)                              kernel shape                   last axis
===============================================  =============================  =======================
``Dense`` / ``Linear``                           ``(in, out)``                  output feature
``Conv`` / ``Conv`` (incl. depthwise, 1-D, 3-D)  ``(*window, in/groups, out)``  output channel
``ConvTranspose`` / ``ConvTranspose``            ``(*window, in, out)``         output channel
``DenseGeneral`` / ``LinearGeneral``             ``(*in_axes, *out_axes)``      last output axis
  e.g. attention ``query``/``key``/``value``     ``(in, heads, head_dim)``      head_dim (shared by heads)
  attention ``out``                              ``(heads, head_dim, out)``     output feature
``Einsum`` / ``Einsum``                          as its einsum spec             last axis of the spec
``Embed`` / ``Embed`` (leaf ``embedding``)       ``(vocab, features)``          feature
===============================================  =============================  =======================

All functions are pure: they return new pytrees and never mutate their input.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from safer_jax.errors import ConfigError

Params = Mapping[str, Any]

KERNEL = "kernel"
# Leaf names that make a module a layer, in order of preference (a module holding both is
# named by its ``kernel``).
KERNEL_LEAVES = (KERNEL, "embedding")


def is_nnx_state(tree: Any) -> bool:
  """Whether ``tree`` is an ``nnx.State`` (read through :func:`as_pure` by this module)."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  return isinstance(tree, nnx.State)


def _str_keys(tree: Any) -> Any:
  if isinstance(tree, Mapping):
    return {str(k): _str_keys(v) for k, v in tree.items()}
  return tree


def as_pure(tree: Any) -> Any:
  """``tree`` as nested dicts of arrays with string keys.

  An ``nnx.State`` (or a dict holding ``nnx.Variable`` leaves) becomes its
  ``nnx.to_pure_dict`` with every key a string (``nnx.List`` indices ``0, 1``
  become ``'0', '1'``), so layer paths read ``'blocks/0/attn/query'``. Linen
  params and variables are returned unchanged.
  """
  if is_nnx_state(tree):
    from flax import nnx  # pylint: disable=import-outside-toplevel
    return _str_keys(nnx.to_pure_dict(tree))
  return tree


def _flatten(tree: Params, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  out = {}
  for key, value in tree.items():
    path = prefix + (str(key),)
    if isinstance(value, Mapping):
      out.update(_flatten(value, path))
    else:
      out[path] = value
  return out


def _unwrap(params: Params) -> Params:
  """Accepts ``variables`` (with a ``'params'`` collection), params, or an ``nnx.State``."""
  params = as_pure(params)
  if "params" in params and isinstance(params["params"], Mapping):
    return params["params"]
  return params


def find_layers(params: Params) -> list[str]:
  """Returns the paths of all modules that hold a kernel (:data:`KERNEL_LEAVES`), in pytree order.

  Args:
    params: a Flax ``params`` pytree (nested dicts), a ``variables`` dict
      with a ``'params'`` collection, or an ``nnx.State``.

  Returns:
    Layer paths such as ``['stem/conv', 'block1/conv1', ..., 'head']`` in the
    order of the (sorted) flattened pytree.
  """
  flat = _flatten(_unwrap(params))
  return list(dict.fromkeys("/".join(path[:-1]) for path in flat
                            if path[-1] in KERNEL_LEAVES and len(path) > 1))


def select_layers(params: Params, patterns: str | Sequence[str] | None = None) -> list[str]:
  """Selects layers whose path fully matches one of the regex ``patterns``.

  Args:
    params: params or variables pytree.
    patterns: a regex or list of regexes matched with ``re.fullmatch`` against
      layer paths. ``None`` selects every layer.

  Returns:
    The selected layer paths, in pytree order.

  Raises:
    ValueError: the pytree holds no layer; or (a
      :class:`~safer_jax.errors.ConfigError`, the user's pattern) a pattern is
      not a valid regex or matches no layer (the error lists the layer paths).
  """
  layers = find_layers(params)
  if not layers:
    raise ValueError(f"The parameter pytree holds no layer: no module has a leaf named one of "
                     f"{list(KERNEL_LEAVES)} (Dense/Linear, Conv, ConvTranspose, DenseGeneral, "
                     f"Einsum, Embed). Its top-level keys: {sorted(map(str, _unwrap(params)))}.")
  if patterns is None:
    return layers
  if isinstance(patterns, str):
    patterns = [patterns]
  selected: set[str] = set()
  for pattern in patterns:
    try:
      regex = re.compile(pattern)
    except re.error as e:
      raise ConfigError(f"Layer pattern {pattern!r} is not a valid regex: {e}") from e
    hits = [name for name in layers if regex.fullmatch(name)]
    if not hits:
      raise ConfigError(
          f"Layer pattern {pattern!r} matches no layer. Available layers: {layers}")
    selected.update(hits)
  return [name for name in layers if name in selected]


@jax.jit
def _finite_flags(leaves: list) -> list:
  return [jax.numpy.all(jax.numpy.isfinite(x)) for x in leaves]


def _on_host(x: Any) -> bool:
  if isinstance(x, jax.Array):
    return all(d.platform == "cpu" for d in x.devices())
  return not isinstance(x, jax.core.Tracer)


def check_finite(tree: Any, what: str = "Parameter") -> None:
  """Raises ``ValueError`` naming the first floating-point leaf of ``tree`` with NaN or inf.

  Host-resident leaves (NumPy, CPU arrays) are checked in NumPy; the others with
  one compiled reduction (every leaf at once), then one transfer of
  ``len(leaves)`` booleans. Integer and boolean leaves always pass; an
  ``nnx.State`` is read through :func:`as_pure`.

  Args:
    tree: variables, params, or any pytree of arrays.
    what: how to call the leaves in the message (``'Parameter'``, ``'Checkpoint leaf'``).

  Raises:
    ValueError: ``"<what> ['params']['conv1']['kernel'] holds NaN or inf values (3 of 288)"``.
  """
  flat = [(path, leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(as_pure(tree))[0]
          if np.issubdtype(np.result_type(leaf), np.inexact)]
  if not flat:
    return
  # Host-resident leaves (NumPy, CPU arrays) are checked in NumPy: no program to compile
  # (the compiled reduction took ~0.4 s of every first sweep on CPU); others on device.
  host = [_on_host(leaf) for _, leaf in flat]
  device = [leaf for (_, leaf), h in zip(flat, host) if not h]
  device_ok = iter(jax.device_get(_finite_flags(device)) if device else [])
  ok = [bool(np.isfinite(np.asarray(leaf)).all()) if h else next(device_ok)
        for (_, leaf), h in zip(flat, host)]
  for (path, leaf), good in zip(flat, ok):
    if not bool(good):
      arr = np.asarray(leaf)
      bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
      raise ValueError(f"{what} {jax.tree_util.keystr(path)} holds NaN or inf values "
                       f"({bad} of {arr.size}); the weights must be finite.")


def match_rules(name: str, rules: Sequence[tuple[str, Any]], default: Any = None) -> Any:
  """Returns the value of the first ``(regex, value)`` rule that fully matches ``name``."""
  for pattern, value in rules:
    if re.fullmatch(pattern, name):
      return value
  return default


def _node(params: Params, layer: str) -> Mapping[str, Any]:
  node: Any = _unwrap(params)
  for part in layer.split("/"):
    if not isinstance(node, Mapping) or part not in node:
      raise KeyError(f"Layer {layer!r} not found. Available layers: {find_layers(params)}")
    node = node[part]
  return node


def get_layer_params(params: Params, layer: str) -> dict[str, jax.Array]:
  """Returns the leaves of one layer, e.g. ``{'kernel': ..., 'bias': ...}``."""
  return dict(_node(params, layer))


def kernel_leaf(params: Params, layer: str) -> str:
  """The name of ``layer``'s kernel leaf: ``'kernel'``, or ``'embedding'`` for embedding tables."""
  node = _node(params, layer)
  for name in KERNEL_LEAVES:
    if name in node:
      return name
  raise KeyError(f"Layer {layer!r} has no kernel leaf ({list(KERNEL_LEAVES)}); it has "
                 f"{sorted(node)}")


def get_kernel(params: Params, layer: str) -> jax.Array:
  """Returns the kernel of ``layer``; shape ``(..., out_channels)``."""
  return _node(params, layer)[kernel_leaf(params, layer)]


def replace_leaves(params: Params, layer: str, new_leaves: Mapping[str, Any]) -> dict:
  """Returns a copy of ``params`` with some leaves of ``layer`` replaced.

  Only the dicts on the path to ``layer`` are copied; all other subtrees (and
  array leaves) are shared with the input, so this is cheap inside ``jit``.
  Works on ``variables`` too (the ``'params'`` collection is updated); an
  ``nnx.State`` comes back as its :func:`as_pure` dict.
  """
  params = as_pure(params)
  if "params" in params and isinstance(params["params"], Mapping):
    out = dict(params)
    out["params"] = replace_leaves(params["params"], layer, new_leaves)
    return out
  parts = layer.split("/")
  _node(params, layer)  # raises a clear KeyError if missing.

  def rec(node, i):
    node = dict(node)
    if i == len(parts):
      for key, value in new_leaves.items():
        if key not in node:
          raise KeyError(f"Layer {layer!r} has no leaf {key!r}; it has {sorted(node)}")
        node[key] = value
      return node
    node[parts[i]] = rec(node[parts[i]], i + 1)
    return node

  return rec(params, 0)


def replace_kernel(params: Params, layer: str, kernel: jax.Array) -> dict:
  """Returns a copy of ``params`` whose ``layer`` kernel is ``kernel``."""
  return replace_leaves(params, layer, {kernel_leaf(params, layer): kernel})


def num_params(params: Params, layer: str, include: Iterable[str] = KERNEL_LEAVES) -> int:
  """Number of scalar parameters in the given leaves of ``layer`` (default: its kernel)."""
  node = _node(params, layer)
  return int(sum(node[k].size for k in include if k in node))


def macs_per_layer(apply_fn: Any, variables: Params, example: jax.Array) -> dict[str, int]:
  """Multiply-accumulates per example of every layer, counted from the model's own shapes.

  One traced forward (``jax.eval_shape``, no compilation) on ``example[:1]``
  records each layer's output shape ``y``; a layer whose kernel ``K`` has
  ``c = K.shape[-1]`` output channels does ``(y.size / c) * K.size`` MACs per
  example: a convolution ``H_out * W_out * kh * kw * (c_in / groups) * c_out``,
  a Dense ``d_in * d_out`` per position. Embedding lookups count 0.

  Args:
    apply_fn: a Flax linen ``Module.apply`` (``capture_intermediates`` is used).
    variables: the model variables.
    example: input batch (only its first example's shape matters).

  Returns:
    ``{layer: MACs}`` in :func:`find_layers` order (ints).

  Raises:
    ValueError: the model cannot report its layers' outputs (not a linen apply).
  """
  known = find_layers(variables)
  shapes: dict[str, tuple[int, ...]] = {}

  def forward(v, x):
    _, state = apply_fn(v, x, capture_intermediates=True, mutable=["intermediates"])
    for path, out in _flatten(state.get("intermediates", {})).items():
      if path[-1] == "__call__":
        out = out[0] if isinstance(out, tuple) else out
        shapes["/".join(path[:-1])] = tuple(out.shape)
    return 0

  try:
    jax.eval_shape(forward, variables, example[:1])
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"Cannot count MACs: the model did not report its layers' outputs "
                     f"(a linen Module.apply with capture_intermediates is needed): {e}") from e
  out = {}
  for name in known:
    if kernel_leaf(variables, name) != "kernel":
      out[name] = 0
      continue
    if name not in shapes:
      raise ValueError(f"Cannot count MACs of layer {name!r}: its output was not captured.")
    kernel = get_kernel(variables, name)
    per_channel = int(np.prod(shapes[name][1:])) // int(kernel.shape[-1])
    out[name] = per_channel * int(np.prod(kernel.shape))
  return out


def execution_order(apply_fn: Any, variables: Params, example: jax.Array) -> list[str]:
  """Layer paths in the order a Flax model calls them (one forward on ``example``).

  Dicts that pass through JAX transformations or checkpoints come back with
  sorted keys, so the pytree order is not the network order; this recovers it
  with ``capture_intermediates``. ``apply_fn`` is a Flax ``Module.apply``;
  anything else (or a failure) falls back to :func:`find_layers` order.

  Args:
    apply_fn: ``model.apply``.
    variables: the model variables.
    example: one input batch, e.g. ``images[:1]``.
  """
  known = find_layers(variables)
  paths: list[tuple[str, ...]] = []

  def forward(v, x):  # traced only (no compilation): the dict keys keep the call order
    _, state = apply_fn(v, x, capture_intermediates=True, mutable=["intermediates"])
    paths.extend(_flatten(state.get("intermediates", {})))
    return 0

  try:
    jax.eval_shape(forward, variables, example)
  except Exception:  # pylint: disable=broad-except
    return known
  flat = paths
  order = list(dict.fromkeys("/".join(p[:-1]) for p in flat if p[-1] == "__call__"))
  ordered = [name for name in order if name in known]
  return ordered + [name for name in known if name not in ordered]
