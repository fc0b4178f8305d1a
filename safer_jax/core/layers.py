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

Named kernels are touched one way (as qwix's rules and big_vision's
``tree_map_with_regex``): :func:`map_kernels` applies ``fn(layer, kernel, value)``
to the layers that ``(regex, value)`` rules select (``re.fullmatch``, first match
wins; :func:`match_layers`) or that a ``{layer: value}`` mapping names;
:func:`get_kernels` / :func:`replace_kernels` read and write several at once,
:func:`check_finite` is the library's one NaN/inf check, :func:`leaves_by_path`
its one flatten of nested dicts and :func:`abstract_variables` its one
``jax.eval_shape`` of a model's variables.

All functions are pure: they return new pytrees and never mutate their input.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from safer_jax.core.errors import ConfigError

Params = Mapping[str, Any]
# ``[(regex, value), ...]`` matched against layer paths with ``re.fullmatch``; first match wins.
Rules = Sequence[tuple[str, Any]]

KERNEL = "kernel"
# Leaf names that make a module a layer, in order of preference (a module holding both is
# named by its ``kernel``).
KERNEL_LEAVES = (KERNEL, "embedding")


def is_nnx_state(tree: Any) -> bool:
  """Whether ``tree`` is an ``nnx.State`` (read through :func:`as_pure` by this module)."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  return isinstance(tree, nnx.State)


def check_no_nested_state(tree: Any, what: str = "variables") -> None:
  """Raises ``ValueError`` where an ``nnx.State`` sits inside a dict (``{'params': nnx.State}``).

  An ``nnx.State`` is taken whole (:func:`as_pure`), never as one collection
  of a dict of them: such a dict reached the compiled programs half converted
  and failed deep inside (``safer_jax.core.staged``). Checks ``tree``'s top-level
  values only (where the collections are); any other tree passes.

  Raises:
    ValueError: naming the key and what is accepted instead.
  """
  if not isinstance(tree, Mapping) or is_nnx_state(tree):
    return
  for key, value in tree.items():
    if is_nnx_state(value):
      raise ValueError(
          f"{what}[{key!r}] is an nnx.State inside a {type(tree).__name__}; pass the nnx.State "
          f"itself instead (e.g. nnx.state(model, nnx.Param), or the state of "
          f"graphdef, state = nnx.split(model)), or, for an nnx model, no variables at all (its "
          f"own), or plain dicts of arrays ({{{key!r}: nnx.to_pure_dict(state)}}).")


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


def leaves_by_path(tree: Mapping[Any, Any],
                   prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  """The leaves of nested mappings keyed by their path, a tuple of string keys.

  Every non-``Mapping`` value is a leaf (an empty mapping has none); keys are
  turned into strings. ``{'a': {'kernel': w}, 'b': 1}`` gives
  ``{('a', 'kernel'): w, ('b',): 1}``, in the mappings' own order.

  Args:
    tree: nested mappings (params, variables, ``capture_intermediates`` state).
    prefix: prepended to every path.
  """
  out = {}
  for key, value in tree.items():
    path = prefix + (str(key),)
    if isinstance(value, Mapping):
      out.update(leaves_by_path(value, path))
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
  flat = leaves_by_path(_unwrap(params))
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
      :class:`~safer_jax.core.errors.ConfigError`, the user's pattern) a pattern is
      not a valid regex or matches no layer (the error lists the layer paths).
  """
  if patterns is None:
    return _layers_or_raise(params)
  if isinstance(patterns, str):
    patterns = [patterns]
  return list(match_layers(params, [(pattern, None) for pattern in patterns]))


def _layers_or_raise(params: Params) -> list[str]:
  layers = find_layers(params)
  if not layers:
    raise ValueError(f"The parameter pytree holds no layer: no module has a leaf named one of "
                     f"{list(KERNEL_LEAVES)} (Dense/Linear, Conv, ConvTranspose, DenseGeneral, "
                     f"Einsum, Embed). Its top-level keys: {sorted(map(str, _unwrap(params)))}.")
  return layers


def match_rules(name: str, rules: Rules, default: Any = None) -> Any:
  """Returns the value of the first ``(regex, value)`` rule that fully matches ``name``.

  The regexes may be strings or compiled patterns; ``default`` when none matches.
  """
  for pattern, value in rules:
    if re.fullmatch(pattern, name):
      return value
  return default


def match_layers(params: Params, rules: Rules) -> dict[str, Any]:
  """Each layer's value under regex ``rules``: the first rule that matches wins.

  As qwix's rules (``module_path``) and big_vision's ``tree_map_with_regex``:
  ``rules`` is a sequence of ``(regex, value)`` pairs, each regex matched with
  ``re.fullmatch`` against the layer paths; a layer takes the value of the first
  rule that matches it, and a layer no rule matches is left out. A later rule
  whose layers are all taken by earlier ones is allowed (e.g. a catch-all
  ``('.*', default)`` last).

  Args:
    params: params or variables pytree (or an ``nnx.State``).
    rules: ``[(regex, value), ...]``, e.g. ``[('head/.*', 8), ('.*', 4)]``.

  Returns:
    ``{layer path: value}`` of the matched layers, in pytree order.

  Raises:
    ValueError: the pytree holds no layer, or a rule is not a ``(regex, value)``
      pair; or (a :class:`~safer_jax.core.errors.ConfigError`) a regex is not valid
      or matches no layer (the error names it and lists the layer paths).
  """
  layers = _layers_or_raise(params)
  compiled = []
  for rule in rules:
    if isinstance(rule, str) or not isinstance(rule, Sequence) or len(rule) != 2:
      raise ValueError(f"Each layer rule must be a (regex, value) pair; got {rule!r}.")
    pattern, value = rule
    try:
      regex = re.compile(pattern)
    except re.error as e:
      raise ConfigError(f"Layer pattern {pattern!r} is not a valid regex: {e}") from e
    if not any(regex.fullmatch(name) for name in layers):
      raise ConfigError(
          f"Layer pattern {pattern!r} matches no layer. Available layers: {layers}")
    compiled.append((regex, value))
  unmatched = object()
  values = {name: match_rules(name, compiled, unmatched) for name in layers}
  return {name: value for name, value in values.items() if value is not unmatched}


@jax.jit
def _finite_flags(leaves: list) -> list:
  return [jnp.all(jnp.isfinite(x)) for x in leaves]


def _on_host(x: Any) -> bool:
  if isinstance(x, jax.Array):
    return all(d.platform == "cpu" for d in x.devices())
  return True


def check_finite(tree: Any, what: str = "Parameter") -> None:
  """Raises ``ValueError`` naming the first floating-point leaf of ``tree`` with NaN or inf.

  The one finite check of the library: variables before an evaluation,
  criteria inputs, kernels handed to a perturbation. Host-resident leaves
  (NumPy, CPU arrays) are checked in NumPy, so nothing is compiled; the others
  with one compiled reduction (every leaf at once), then one transfer of
  ``len(leaves)`` booleans. Integer and boolean leaves always pass (bfloat16 and
  other floating types are checked); traced leaves (inside ``jit``) cannot be
  checked and pass. An ``nnx.State`` is read through :func:`as_pure`.

  Args:
    tree: variables, params, ``{layer: kernel}``, any pytree of arrays, or a
      single array (then named by ``what`` alone).
    what: how to call the leaves in the message (``'Parameter'``,
      ``'Checkpoint leaf'``; for a single array its name, e.g. ``'w'``).

  Raises:
    ValueError: ``"Parameter ['params']['conv1']['kernel'] holds NaN or inf values
      (3 of 288: 2 NaN, 1 inf; first at index (0, 1, 2, 5)); it must be finite."``
  """
  flat = [(path, leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(as_pure(tree))[0]
          if not isinstance(leaf, jax.core.Tracer)
          and jnp.issubdtype(leaf.dtype if hasattr(leaf, "dtype") else np.result_type(leaf),
                             jnp.inexact)]
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
      finite = np.isfinite(arr)
      first = np.unravel_index(int(np.argmin(finite)), arr.shape) if arr.ndim else ()
      name = f"{what} {jax.tree_util.keystr(path)}" if path else what
      raise ValueError(
          f"{name} holds NaN or inf values ({arr.size - np.count_nonzero(finite)} of "
          f"{arr.size}: {np.count_nonzero(np.isnan(arr))} NaN, "
          f"{np.count_nonzero(np.isinf(arr))} inf; first at index "
          f"{tuple(int(i) for i in first)}); it must be finite.")


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


def get_kernels(params: Params, layers: Iterable[str] | None = None) -> dict[str, jax.Array]:
  """``{layer: kernel}`` of the given layer paths (``None``: every layer, in pytree order)."""
  names = find_layers(params) if layers is None else layers
  return {name: get_kernel(params, name) for name in names}


def replace_kernels(params: Params, kernels: Mapping[str, jax.Array]) -> dict:
  """A copy of ``params`` whose kernel of each ``kernels`` layer is ``kernels[layer]``.

  :func:`replace_kernel` for several layers: only the dicts on the paths to them
  are copied (cheap inside ``jit``/``grad``); the result is a new dict even
  when ``kernels`` is empty. Works on variables and ``nnx.State`` as
  :func:`replace_leaves` does.

  Raises:
    KeyError: a layer that ``params`` does not have (the error lists its layers).
  """
  out = dict(as_pure(params))
  for name, kernel in kernels.items():
    out = replace_kernel(out, name, kernel)
  return out


def map_kernels(params: Params, fn: Callable[[str, jax.Array, Any], jax.Array],
                rules: Rules | Mapping[str, Any]) -> dict:
  """``params`` with ``kernel <- fn(layer, kernel, value)`` for each layer that ``rules`` selects.

  The one way to touch named kernels (quantize, prune, corrupt, mask): ``rules``
  is either a sequence of ``(regex, value)`` pairs, matched against the layer
  paths with ``re.fullmatch``, first match wins (:func:`match_layers`), or a
  mapping ``{layer path: value}`` naming layers exactly (no regex). Kernels of
  unselected layers and all other leaves are shared with the input. Pure;
  traceable when ``fn`` is.

  Args:
    params: params, variables or an ``nnx.State`` (the result is its pure dict).
    fn: ``fn(layer, kernel, value) -> new kernel`` of the same shape.
    rules: ``[(regex, value), ...]`` or ``{layer: value}``, e.g. bit widths
      ``[('head/.*', 8), ('.*', 4)]`` or masks ``{'conv1': mask}``.

  Returns:
    The new pytree (dicts).

  Raises:
    ValueError: a regex rule is invalid or matches no layer (see
      :func:`match_layers`); KeyError: a mapping names a layer ``params``
      does not have.
  """
  values = dict(rules) if isinstance(rules, Mapping) else match_layers(params, rules)
  return replace_kernels(params, {name: fn(name, get_kernel(params, name), value)
                                  for name, value in values.items()})


def abstract_variables(model: Any, input_shape: Sequence[int], seed: int = 0) -> dict:
  """The variables ``model.init`` would make, as ``jax.ShapeDtypeStruct`` s (nothing allocated).

  ``jax.eval_shape`` of ``dict(model.init(jax.random.key(seed), x))`` with a
  float32 batch ``x`` of shape ``(1, *input_shape)``: the tree of
  :func:`safer_jax.training.train.init_variables`, e.g. to restore a checkpoint into or to
  list the layers of a model without initialising it.

  Args:
    model: a Flax linen module.
    input_shape: one example's shape, e.g. ``(224, 224, 3)``.
    seed: the init key's seed (no effect on shapes and dtypes).
  """
  return jax.eval_shape(lambda: dict(model.init(jax.random.key(seed),
                                                jnp.zeros((1, *input_shape), jnp.float32))))


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
    for path, out in leaves_by_path(state.get("intermediates", {})).items():
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
  return trace_layers(apply_fn, variables, example)[0]


def trace_layers(apply_fn: Any, variables: Params,
                 example: jax.Array) -> tuple[list[str], dict[str, int]]:
  """:func:`execution_order` and each layer's multiply-adds per example, from one trace.

  A layer's multiply-adds are ``output size per example x kernel size / output
  channels`` (dense and convolution kernels, grouped and depthwise included: their
  kernel holds ``in / groups`` input channels; taps on SAME padding are counted,
  so at the borders it is an upper bound). A layer whose output was not captured
  has no count. Traced with ``jax.eval_shape``: nothing is computed or compiled.

  Returns:
    ``(order, {layer: multiply-adds per example})``; on a failure (not a Flax
    ``apply``) :func:`find_layers` order and no counts.
  """
  known = find_layers(variables)
  paths: dict[tuple[str, ...], Any] = {}

  def forward(v, x):  # traced only (no compilation): the dict keys keep the call order
    _, state = apply_fn(v, x, capture_intermediates=True, mutable=["intermediates"])
    paths.update(leaves_by_path(state.get("intermediates", {})))
    return 0

  try:
    jax.eval_shape(forward, variables, example)
  except Exception:  # pylint: disable=broad-except
    return known, {}
  outputs = {"/".join(p[:-1]): out for p, out in paths.items() if p[-1] == "__call__"}
  ordered = [name for name in outputs if name in known]
  first = jax.tree.leaves(example)[:1]  # (the example may be a pytree of inputs)
  batch = max(int(np.shape(first[0])[0]), 1) if first and np.ndim(first[0]) else 1
  macs = {}
  for name in ordered:
    out = jax.tree.leaves(outputs[name])
    kernel = np.shape(get_kernel(variables, name))
    if out and kernel:
      macs[name] = int(np.prod(np.shape(out[0]))) // batch * int(np.prod(kernel)) // kernel[-1]
  return ordered + [name for name in known if name not in ordered], macs
