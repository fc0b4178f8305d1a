"""Deployment through qwix: bit allocations as qwix rules, models quantized by qwix, and a check.

A bit allocation (``{layer: bits}``, e.g. :attr:`safer_jax.budgeting.budget.Allocation.bits`)
becomes one ``qwix.QtRule`` per layer: an anchored regex of the layer's path
(qwix matches ``re.fullmatch`` against the ``/``-joined module path, which is the
layer's path in the params pytree) and ``weight_qtype`` ``'int2'`` .. ``'int8'``.
:func:`from_qwix_rules` reads rules back (qwix's first matching rule wins).
:func:`quantized_apply` runs a linen or nnx model quantized by qwix;
:func:`verify` says, layer by layer, whether that deployment equals the
simulation (:func:`safer_jax.budgeting.mixed_precision.quantize_model` + the float model).

Weights only, symmetric, one scale per *output channel* (or group-wise on Dense
kernels): qwix's convention, which :func:`safer_jax.core.perturb.quantize` reproduces
with ``full_range=True`` (bit for bit on the weights; tests/test_deploy.py
compares the two). What qwix 0.1.8 does, checked numerically in the tests:

* It intercepts ``lax.dot_general`` / ``jnp.einsum`` / ``lax.conv_general_dilated``
  calls inside the model and quantizes the operand it traces back to a param
  (through transposes, reshapes, casts). Its channel axes are the kernel's axes
  that the op does **not** contract: the last axis of a Dense ``(in, out)`` or
  Conv ``(..., in, out)`` kernel, axis 0 of a kernel stored ``(out, in)`` and
  used as ``x @ k.T``, and *both* output axes of a DenseGeneral kernel
  ``(in, heads, head_dim)`` (one scale per (head, head_dim) pair, not per
  head_dim). :func:`channel_axes` finds these axes from the model's forward and
  ``quantize_model(..., axes=...)`` simulates them.
* It never quantizes an embedding lookup (a gather), in linen or nnx:
  :func:`to_qwix_rules` refuses ``embedding`` layers (:func:`deployable_layers`
  lists the others). A tied table's ``attend`` (``jnp.dot(h, embedding.T)``)
  *is* quantized, per vocabulary row (axis 0), its lookup not. Layers computed
  without those ops (the zoo's depthwise convolutions, written as
  multiply-adds) stay float too; :func:`verify` shows them.
* nnx models: ``qwix.quantize_model(module, provider, *inputs)`` (it runs the
  module once); :func:`quantized_apply` does this inside its ``jit`` on a copy
  holding the variables it is given, so linen and nnx share one contract.
* With its default provider settings, qwix's interception can be bypassed by
  JAX's trace cache when a layer's op sits inside a ``jax.jit``-ed function
  (``x @ k`` is ``jnp.matmul``): after a float forward at the same shapes the
  layer stays float under qwix, and after a qwix forward a *float*
  ``jnp.matmul`` at those shapes returns quantized results. :func:`quantized_apply`
  builds its provider with ``disable_jit=True`` (qwix's own switch), which traces
  those functions inline: no cache either way.
* Numerics: qwix dequantizes the weights and runs the float op, so its outputs
  are the simulation's up to float rounding, except that XLA:CPU fuses the int8
  dequantization into a convolution (YNNPACK fusion) and computes it with less
  precision (~4e-4 of the output scale on the zoo's lenet, bit for bit with
  ``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=``); :func:`verify`'s
  default tolerance allows for it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import qwix
from flax import nnx

from safer_jax.core import layers as layers_lib
from safer_jax.core import wrapping
from safer_jax.core.errors import ConfigError

MIN_BITS, MAX_BITS = 2, 8  # qwix's integer types: int2 .. int8
ALLOCATION = "(allocation)"  # the row of :class:`Verification` for all the layers together

Axis = int | tuple[int, ...]


def _qtype(bits: int) -> str:
  if isinstance(bits, bool) or int(bits) != bits or not MIN_BITS <= bits <= MAX_BITS:
    raise ConfigError(f"bits={bits!r} has no qwix integer type; allowed: integers "
                      f"{MIN_BITS}..{MAX_BITS}")
  return f"int{int(bits)}"


# ---------------------------------------------------------------------------------------------
# Rules.
# ---------------------------------------------------------------------------------------------


def deployable_layers(variables: Mapping[str, Any]) -> list[str]:
  """The layers qwix can quantize: those holding a ``kernel`` leaf (no embedding tables).

  qwix quantizes the weights of ``dot_general`` / ``einsum`` / ``conv`` ops; an
  ``nn.Embed`` / ``nnx.Embed`` table (leaf ``embedding``) is read by a gather,
  which it leaves float. Restrict an allocation to these layers before
  deploying it, e.g. ``layers=deploy.deployable_layers(variables)`` where a
  function takes the layers to allocate, or ``{n: b for n, b in bits.items() if
  n in deployable}``. (A kernel layer computed without those ops, e.g. a
  depthwise convolution written as multiply-adds, is listed too: only the
  forward shows it; :func:`verify` does.)

  Args:
    variables: ``{'params': ...}`` (or params, or an ``nnx.State``).

  Returns:
    Layer paths in :func:`safer_jax.core.layers.find_layers` order.
  """
  return [name for name in layers_lib.find_layers(variables)
          if layers_lib.kernel_leaf(variables, name) == layers_lib.KERNEL]


def _check_deployable(bits: Mapping[str, int], variables: Mapping[str, Any]) -> None:
  """Raises ``ConfigError`` for a layer ``variables`` lacks or one qwix leaves float (Embed)."""
  known = layers_lib.find_layers(variables)
  unknown = [name for name in bits if name not in known]
  if unknown:
    raise ConfigError(f"Layer(s) {unknown} of the allocation are not layers of the model: a "
                      f"qwix rule for them would match nothing. The model's layers: {known}")
  embeds = [name for name in bits if layers_lib.kernel_leaf(variables, name) != layers_lib.KERNEL]
  if embeds:
    raise ConfigError(
        f"qwix cannot quantize embedding layer(s) {embeds}: they hold an 'embedding' table "
        f"(nn.Embed / nnx.Embed) read by a gather, and qwix quantizes only the weights of "
        f"dot_general/einsum/conv ops, so the deployed model would keep them float while the "
        f"simulation quantizes them. Leave them out of the allocation: restrict it to "
        f"safer_jax.budgeting.deploy.deployable_layers(variables), or select the layers with a "
        f"pattern that excludes them (e.g. safer_jax.core.layers.select_layers(variables, ...)).")


def _rules(bits: Mapping[str, int], group_size: int | None, variables: Mapping[str, Any] | None,
           act_bits: int | None) -> list[qwix.QtRule]:
  """The rules of :func:`to_qwix_rules`, without the deployability check."""
  if group_size is not None and variables is None:
    raise ConfigError("to_qwix_rules(group_size=...) needs variables= to find the Dense "
                      "(2-D) kernels it applies to.")

  def tile(layer):
    if group_size is None or layers_lib.get_kernel(variables, layer).ndim != 2:
      return None
    return int(group_size)

  act = None if act_bits is None else _qtype(act_bits)
  return [qwix.QtRule(module_path=re.escape(layer), weight_qtype=_qtype(b), tile_size=tile(layer),
                      act_qtype=act) for layer, b in bits.items()]


def to_qwix_rules(bits: Mapping[str, int], *, group_size: int | None = None,
                  variables: Mapping[str, Any] | None = None,
                  act_bits: int | None = None) -> list[qwix.QtRule]:
  """One ``qwix.QtRule`` per layer of a bit allocation (weights; activations if asked).

  Args:
    bits: ``{layer path: bit width}`` (2..8), e.g. an allocation's ``.bits``.
    group_size: qwix's sub-channel ``tile_size`` on the layers with a 2-D
      (Dense) kernel, which ``variables`` tells apart (qwix cannot tile
      convolutions); what ``perturb.quantize(..., group_size=...)`` simulates.
      None: per channel.
    variables: the model variables; needed with ``group_size``. When given,
      every layer of ``bits`` is checked: it must be a layer of the model and
      one qwix quantizes (a ``kernel``, not an ``embedding`` table; see
      :func:`deployable_layers`). Without them nothing can be checked.
    act_bits: also quantize each layer's input (qwix ``act_qtype``, its dynamic
      ranges); None: weights only.

  Returns:
    Rules in the order of ``bits``, each ``module_path=re.escape(layer)``.

  Raises:
    ConfigError: a bit width qwix has no integer type for, ``group_size``
      without ``variables``, or (with ``variables``) a layer the model lacks or
      an embedding layer, which qwix would silently leave float (the message
      names them and says how to leave them out).
  """
  if variables is not None:
    _check_deployable(bits, variables)
  return _rules(bits, group_size, variables, act_bits)


def from_qwix_rules(rules: Iterable[Any], layers: Sequence[str]) -> dict[str, int]:
  """``{layer: bits}`` of the layers a rule quantizes (first full match wins, as in qwix).

  Args:
    rules: ``qwix.QtRule`` objects or dicts with ``module_path`` and ``weight_qtype``.
    layers: layer paths (e.g. :func:`safer_jax.core.layers.find_layers`).

  Raises:
    ConfigError: a rule's weight type is not an integer type ``int2`` .. ``int8``.
  """
  parsed = []
  for rule in rules:
    get = rule.get if isinstance(rule, Mapping) else lambda k, r=rule: getattr(r, k, None)
    qtype = get("weight_qtype")
    if qtype is None:
      parsed.append((get("module_path"), None))
      continue
    name = str(jax.numpy.dtype(qtype)) if not isinstance(qtype, str) else qtype
    match = re.fullmatch(r"int([2-8])", name)
    if not match:
      raise ConfigError(f"weight_qtype={qtype!r} is not an integer type; allowed: int2..int8")
    parsed.append((get("module_path"), int(match.group(1))))
  matched = {layer: layers_lib.match_rules(layer, parsed) for layer in layers}
  return {layer: b for layer, b in matched.items() if b is not None}


def rules_to_json(rules: Iterable[qwix.QtRule]) -> list[dict]:
  """The rules as JSON-ready dicts (``module_path``, ``weight_qtype``, ``tile_size``)."""
  return [{"module_path": r.module_path, "weight_qtype": str(r.weight_qtype),
           "tile_size": r.tile_size,
           "act_qtype": None if r.act_qtype is None else str(r.act_qtype)} for r in rules]


# ---------------------------------------------------------------------------------------------
# Forward passes: qwix-quantized and float, one contract for linen and nnx.
# ---------------------------------------------------------------------------------------------


def _is_arrays(value: Any) -> bool:
  leaves = jax.tree.leaves(value)
  return bool(leaves) and all(isinstance(x, (jax.Array, np.ndarray, np.generic)) for x in leaves)


def _jit(fn: Callable) -> Callable:
  """``jit(fn)`` of ``fn(variables, *args, **kwargs)``: array keywords traced, the others static."""
  jitted = jax.jit(lambda variables, args, arrays, static: fn(variables, *args, **arrays,
                                                              **dict(static)),
                   static_argnums=3)

  def call(variables, *args, **kwargs):
    arrays = {k: v for k, v in kwargs.items() if _is_arrays(v)}
    static = tuple(sorted((k, v) for k, v in kwargs.items() if k not in arrays))
    return jitted(variables, args, arrays, static)

  return call


def _picking_output(model: Any, fn: Callable) -> Callable:
  """``fn`` followed by the wrapped model's ``output`` picker, as ``WrappedModel.apply`` does."""
  if not isinstance(model, wrapping.WrappedModel) or model.output is None:
    return fn
  return lambda *args, **kwargs: model.pick_output(fn(*args, **kwargs), kwargs)


def _module_model(model: Any, what: str) -> Any:
  """A raw linen module, or a :class:`WrappedModel` of a linen/nnx module; else ``ConfigError``."""
  if isinstance(model, wrapping.WrappedModel):
    if model.kind not in ("linen", "nnx"):
      raise ConfigError(f"{what} needs a linen or nnx module (qwix matches its rules against "
                        f"module paths); got a plain apply function, which has none. "
                        f"Wrap the module itself: safer_jax.wrap(module, variables).")
    return model
  if isinstance(model, nnx.Module):
    return wrapping.wrap(model)
  if isinstance(model, nn.Module):
    return model
  raise ConfigError(f"{what} needs a linen module, an nnx module or a safer_jax.wrap-ped one; "
                    f"got {type(model).__name__}")


def quantized_apply(model: Any, rules: Sequence[qwix.QtRule]) -> Callable:
  """``jit(apply)`` of ``model`` with its weights quantized by qwix (``QtProvider``).

  The same contract for linen and nnx models: ``variables`` is the pure dict
  ``{'params': ..., ['batch_stats': ...]}`` of ``safer_jax.wrap(model).variables``
  (float, or quantized by simulation: qwix quantizes whatever it is given), run
  in inference mode. nnx: each trace merges ``variables`` into a copy of the
  module (as :class:`safer_jax.WrappedModel` does) and quantizes that copy with
  ``qwix.quantize_model(copy, provider, *args, **kwargs)``; the module itself is
  never touched. A wrapped model's ``output`` picker, if it has one, is applied
  to the result. The provider traces jitted functions inline (``disable_jit``;
  see the module docstring), so ``x @ kernel`` layers are quantized whatever
  ran before.

  Args:
    model: a linen module (zoo models included; called with no extra keywords),
      an ``nnx.Module``, or a :func:`safer_jax.wrap`-ped linen or nnx model
      (called with its inference keywords).
    rules: e.g. :func:`to_qwix_rules`.

  Returns:
    ``apply(variables, *args, **kwargs) -> outputs``, e.g. ``(images) -> logits
    (B, K)`` or ``(ids, mask=mask)``; array keywords are traced, the others
    (flags) static.

  Raises:
    ConfigError: a plain apply function (wrapped or not) or another type.
  """
  provider = qwix.QtProvider(list(rules), disable_jit=True)
  model = _module_model(model, "quantized_apply")
  if not isinstance(model, wrapping.WrappedModel):  # a linen module, run in inference mode
    quantized = qwix.quantize_model(model, provider)
    mode = wrapping.inference_kwargs(model)  # e.g. a `train` flag without a default
    return _jit(lambda variables, *args, **kw: quantized.apply(variables, *args, **{**mode, **kw}))
  kwargs = dict(model.apply_kwargs)
  if model.kind == "linen":
    quantized = qwix.quantize_model(model.module, provider)

    def fn(variables, *args, **kw):
      return quantized.apply(variables, *args, **{**kwargs, **kw})
  else:
    def fn(variables, *args, **kw):
      module = model.to_nnx(variables)
      module.eval()
      kw = {**kwargs, **kw}
      # qwix runs the copy once (with these inputs) to set it up; under jit that costs a trace.
      return qwix.quantize_model(module, provider, *args, **kw)(*args, **kw)
  return _jit(_picking_output(model, fn))


def _wrapped(model: Any, variables: Any) -> tuple[wrapping.WrappedModel, Any]:
  """``(WrappedModel, variables)``: a wrapped model keeps its attributes (``output``).

  A module whose ``__call__`` takes more inputs than one (ids and a mask) is
  wrapped as any other: its inputs are all given to the call.
  """
  if isinstance(model, wrapping.WrappedModel):
    return model, (model.variables if variables is None else variables)
  wrapped = wrapping.wrap(model, variables)
  return wrapped, wrapped.variables


def _forward(model: wrapping.WrappedModel) -> Callable:
  """``forward(variables, *args, **kwargs) -> outputs``: the float model in inference mode."""
  return model.apply  # (its output picker included)


# ---------------------------------------------------------------------------------------------
# Channel axes: which kernel axes the forward's dot_general / conv leaves uncontracted.
# ---------------------------------------------------------------------------------------------

# Primitives whose output carries their (first) operand's axes unchanged.
_SAME_AXES = frozenset({"convert_element_type", "copy", "copy_p", "rev", "sharding_constraint",
                        "reduce_precision", "mesh_cast", "reshard", "pvary", "device_put"})
# Primitives calling a sub-jaxpr whose inputs and outputs are theirs, one for one.
_CALLS = frozenset({"pjit", "jit", "closed_call", "core_call", "remat", "checkpoint",
                    "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"})
_QUANTIZED_OPS = ("dot_general", "conv_general_dilated")

Dims = tuple[frozenset, ...]  # per axis of a traced value: the kernel axes it carries


def _sub_jaxpr(eqn: Any) -> Any:
  for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    sub = eqn.params.get(key)
    if sub is not None:
      return getattr(sub, "jaxpr", sub)
  return None


def _reshape_dims(dims: Dims, old: Sequence[int], new: Sequence[int]) -> Dims | None:
  """The kernel axes of a reshape's output axes (merged axes carry the union); None if unknown."""
  if 0 in old or 0 in new:
    return None
  out = [frozenset()] * len(new)
  i = j = 0
  while i < len(old) and j < len(new):
    group_old, group_new, p_old, p_new = [i], [j], old[i], new[j]
    while p_old != p_new:
      if p_old < p_new:
        i += 1
        if i == len(old):
          return None
        group_old.append(i)
        p_old *= old[i]
      else:
        j += 1
        if j == len(new):
          return None
        group_new.append(j)
        p_new *= new[j]
    carried = frozenset().union(*(dims[k] for k in group_old if old[k] != 1))
    for k in group_new:
      out[k] = carried if new[k] != 1 or len(group_new) == 1 else frozenset()
    i, j = i + 1, j + 1
  return tuple(out)


def _kernel_uses(jaxpr: Any, var: Any, ndim: int) -> list[tuple[str, frozenset, frozenset]]:
  """Where a kernel input of ``jaxpr`` ends up: ``[(primitive, channel axes, contracted axes)]``.

  Follows the value through layout ops (transpose, reshape, squeeze, broadcast,
  casts) and into (and out of) nested jitted calls; each ``dot_general`` /
  ``conv_general_dilated`` consuming it gives the kernel axes it leaves
  uncontracted (qwix's channel axes) and those it contracts; any other consumer
  (a gather, a multiply) is listed with empty axes.
  """
  from jax.extend import core as jex  # pylint: disable=import-outside-toplevel
  tables: dict[int, tuple[Any, dict]] = {}

  def uses(jx):
    if id(jx) not in tables:
      table: dict[Any, list] = {}
      for eqn in jx.eqns:
        for pos, v in enumerate(eqn.invars):
          if isinstance(v, jex.Var):
            table.setdefault(v, []).append((eqn, pos))
      tables[id(jx)] = (jx, table)
    return tables[id(jx)][1]

  def record(name, dims, contracted):
    channel = frozenset().union(*(d for k, d in enumerate(dims) if k not in contracted))
    reduced = frozenset().union(*(d for k, d in enumerate(dims) if k in contracted))
    found.append((name, channel, reduced))

  found: list[tuple[str, frozenset, frozenset]] = []
  stack = [(jaxpr, var, tuple(frozenset({k}) for k in range(ndim)), ())]
  seen = set()
  while stack:
    jx, v, dims, ctx = stack.pop()
    if (id(jx), id(v), dims) in seen:
      continue
    seen.add((id(jx), id(v), dims))
    if ctx:  # returned by a nested call: continue in the caller
      for k, out in enumerate(jx.outvars):
        if out is v:
          parent, call = ctx[-1]
          stack.append((parent, call.outvars[k], dims, ctx[:-1]))
    for eqn, pos in uses(jx).get(v, ()):
      name = eqn.primitive.name
      out = eqn.outvars[0] if eqn.outvars else None
      if name == "dot_general":
        record(name, dims, set(eqn.params["dimension_numbers"][0][pos]))
      elif name == "conv_general_dilated" and pos == 1:
        out_feature = eqn.params["dimension_numbers"].rhs_spec[0]
        record(name, dims, set(range(len(dims))) - {out_feature})
      elif name in _SAME_AXES:
        stack.append((jx, eqn.outvars[pos if name == "device_put" else 0], dims, ctx))
      elif name == "transpose":
        stack.append((jx, out, tuple(dims[p] for p in eqn.params["permutation"]), ctx))
      elif name == "reshape" and (new := _reshape_dims(dims, v.aval.shape,
                                                         out.aval.shape)) is not None:
        stack.append((jx, out, new, ctx))
      elif name == "squeeze":
        drop = {d % len(dims) for d in eqn.params["dimensions"]}
        stack.append((jx, out, tuple(d for k, d in enumerate(dims) if k not in drop), ctx))
      elif name == "broadcast_in_dim":
        new = [frozenset()] * len(eqn.params["shape"])
        for k, b in enumerate(eqn.params["broadcast_dimensions"]):
          new[b] = dims[k]
        stack.append((jx, out, tuple(new), ctx))
      elif (name in _CALLS and (sub := _sub_jaxpr(eqn)) is not None
            and len(sub.invars) == len(eqn.invars)):
        stack.append((sub, sub.invars[pos], dims, ctx + ((jx, eqn),)))
      else:
        found.append((name, frozenset(), frozenset()))
  return found


def _trace_uses(model: wrapping.WrappedModel, variables: Any, args: Sequence[Any],
                kwargs: Mapping[str, Any]) -> dict[str, list]:
  """``{layer: _kernel_uses(...)}`` from one ``make_jaxpr`` of the float forward."""
  forward = _forward(model)
  names = layers_lib.find_layers(variables)
  kernels = [layers_lib.get_kernel(variables, name) for name in names]
  arrays = {k: v for k, v in kwargs.items() if _is_arrays(v)}
  static = {k: v for k, v in kwargs.items() if k not in arrays}

  def f(kernels, variables, args, arrays):
    return forward(layers_lib.replace_kernels(variables, dict(zip(names, kernels))), *args,
                   **arrays, **static)

  closed = jax.make_jaxpr(f)(kernels, variables, tuple(args), arrays)
  invars = closed.jaxpr.invars[:len(names)]  # each kernel is one leaf, first
  return {name: _kernel_uses(closed.jaxpr, var, np.ndim(kernel))
          for name, var, kernel in zip(names, invars, kernels)}


def _axis_of(name: str, uses: list) -> Axis | None:
  ops = [u for u in uses if u[0] in _QUANTIZED_OPS]
  if not ops:
    return None
  channels = sorted({tuple(sorted(u[1])) for u in ops})
  if len(channels) > 1:
    raise ValueError(f"Layer {name!r}: its kernel feeds several ops with different output-channel "
                     f"axes {channels}; qwix quantizes each use along its own axes, which one "
                     f"simulated kernel cannot reproduce.")
  if any(u[1] & u[2] for u in ops):
    raise ValueError(f"Layer {name!r}: a kernel axis is split between contracted and "
                     f"uncontracted axes of its {ops[0][0]} (a reshape); its channel axis is "
                     f"not one kernel axis.")
  axis = channels[0]
  return axis[0] if len(axis) == 1 else axis


def channel_axes(model: Any, variables: Any = None, *example_inputs: Any,
                 **example_kwargs: Any) -> dict[str, Axis]:
  """Each layer's output-channel axis as the forward uses it: the axis qwix puts its scales on.

  Traces the float forward once (``jax.make_jaxpr``, nothing computed) with the
  kernels as explicit inputs and follows each kernel (through transposes,
  reshapes, casts and nested jitted calls) into the ``dot_general`` /
  ``conv_general_dilated`` consuming it. Its axes that op does not contract
  are the output channels (qwix's ``channelwise_axes``): ``1`` for a Dense
  ``(in, out)``, ``3`` for a Conv ``(kh, kw, in, out)``, ``0`` for a kernel
  stored ``(out, in)`` and used as ``x @ kernel.T``, ``(1, 2)`` for a
  DenseGeneral ``(in, heads, head_dim)``. Pass the result to
  :func:`safer_jax.budgeting.mixed_precision.quantize_model` (``axes=``) so the
  simulation quantizes as qwix deploys.

  Args:
    model: a linen module (with ``variables``), an nnx module, a wrapped model,
      or a plain ``apply_fn(variables, *inputs)`` (with ``variables``).
    variables: ``{'params': ...}``; None: the wrapped/nnx model's own.
    *example_inputs: inputs of one forward (shapes and dtypes matter, not values).
    **example_kwargs: its keyword inputs (arrays are traced, other values static).

  Returns:
    ``{layer: axis}`` in :func:`safer_jax.core.layers.find_layers` order, non-negative:
    an ``int``, or a tuple of ints for a kernel with several output axes (``()``
    when every axis is contracted). Layers whose kernel feeds no ``dot_general``
    or convolution (embedding lookups, multiply-add convolutions) are left out:
    qwix does not quantize them. A kernel that also feeds other ops (a tied
    embedding: a gather and ``attend``'s ``dot``) gets the axis of its
    ``dot_general``; qwix quantizes that use only.

  Raises:
    ValueError: a kernel feeding several ``dot_general``/conv ops with different
      output axes, or split by a reshape between contracted and output axes
      (the message names the layer); or see :func:`safer_jax.wrap`.
  """
  wrapped, variables = _wrapped(model, variables)
  uses = _trace_uses(wrapped, variables, example_inputs, example_kwargs)
  out = {}
  for name, found in uses.items():
    axis = _axis_of(name, found)
    if axis is not None:
      out[name] = axis
  return out


def _as_axes(axis: Axis, ndim: int) -> tuple[int, ...]:
  return tuple(sorted(int(a) % ndim for a in ((axis,) if np.ndim(axis) == 0 else axis)))


# ---------------------------------------------------------------------------------------------
# verify: the deployed model against the simulated one, layer by layer.
# ---------------------------------------------------------------------------------------------


class DeploymentMismatch(ConfigError):
  """qwix's deployment differs from the simulation; ``.report`` is the :class:`Verification`."""

  def __init__(self, report: Verification):
    super().__init__(str(report))
    self.report = report


@dataclasses.dataclass(frozen=True)
class LayerCheck:
  """One row of a :class:`Verification`: one layer quantized alone (or the whole allocation).

  Differences are ``max |a - b|`` over every output element, divided by the
  scale of the outputs (``max |float outputs|``): unitless.

  Attributes:
    layer: the layer path, or :data:`ALLOCATION` for all the layers together.
    bits: its bit width (None on the allocation row).
    diff: qwix-deployed vs simulated outputs.
    sim_effect: simulated vs float outputs (what quantizing it changes).
    qwix_effect: qwix-deployed vs float outputs (0: qwix left it float).
    axis: the channel axis the simulation used (``-1``: the default, last).
    qwix_axis: the output-channel axis of the ``dot_general``/conv consuming
      the kernel in the forward (what qwix uses); None: no such op; ``'?'``:
      not traced.
    ok: ``diff <= atol``, and not left float by qwix (``qwix_effect`` both
      within ``atol`` and under a tenth of ``sim_effect``: flagged whatever
      ``atol``, since at 8 bits a layer's whole effect may be below it).
    reason: why it differs, with what to do ('' when ok).
  """

  layer: str
  bits: int | None
  diff: float
  sim_effect: float
  qwix_effect: float
  axis: Any
  qwix_axis: Any
  ok: bool
  reason: str = ""


@dataclasses.dataclass(frozen=True)
class Verification:
  """What :func:`verify` found: per-layer rows, the allocation's row, and the verdict.

  Attributes:
    layers: one :class:`LayerCheck` per layer of the allocation, in its order.
    allocation: the row of the whole allocation.
    scale: ``max |float outputs|``, the unit of every difference.
    atol: the tolerance on the relative differences.
  """

  layers: tuple[LayerCheck, ...]
  allocation: LayerCheck
  scale: float
  atol: float

  @property
  def mismatched(self) -> list[str]:
    """The layers whose deployment differs from their simulation (or that qwix leaves float)."""
    return [row.layer for row in self.layers if not row.ok]

  @property
  def ok(self) -> bool:
    """Whether every layer and the whole allocation deploy as simulated."""
    return not self.mismatched and self.allocation.ok

  def as_dict(self) -> dict:
    """JSON-ready: ``{'ok', 'scale', 'atol', 'mismatched', 'layers': [row dicts]}``."""
    rows = [dataclasses.asdict(r) for r in (*self.layers, self.allocation)]
    for row in rows:
      for key in ("axis", "qwix_axis"):
        row[key] = list(row[key]) if isinstance(row[key], tuple) else row[key]
    return {"ok": self.ok, "scale": self.scale, "atol": self.atol,
            "mismatched": self.mismatched, "layers": rows}

  def __str__(self) -> str:
    verdict = ("deploys as simulated" if self.ok else
               f"{len(self.mismatched)} of {len(self.layers)} layers differ"
               + ("" if self.allocation.ok else ", and the allocation"))
    head = (f"qwix deployment vs simulation: {verdict} (tolerance {self.atol:.0e} of the output "
            f"scale {self.scale:.4g})")
    rows = [("layer", "bits", "axis", "qwix axis", "qwix-sim", "sim-float", "qwix-float", "")]
    for r in (*self.layers, self.allocation):
      fmt = lambda a: "-" if a is None else str(a)  # noqa: E731
      rows.append((r.layer, fmt(r.bits), fmt(r.axis), fmt(r.qwix_axis), f"{r.diff:.1e}",
                   f"{r.sim_effect:.1e}", f"{r.qwix_effect:.1e}",
                   "ok" if r.ok else f"DIFFERS: {r.reason}"))
    widths = [max(len(row[c]) for row in rows) for c in range(7)]
    lines = [head] + ["  ".join([row[0].ljust(widths[0])]
                                + [row[c].rjust(widths[c]) for c in range(1, 7)]
                                + [row[7]]).rstrip() for row in rows]
    lines.append("(max |a - b| over the outputs / scale; axis: the kernel's output-channel axis, "
                 "simulated and as the forward's dot_general/conv uses it, '-': none)")
    return "\n".join(lines)


def _max_abs(a: Any, b: Any | None = None) -> float:
  la = jax.tree.leaves(a)
  lb = jax.tree.leaves(b) if b is not None else [None] * len(la)
  out = 0.0
  for x, y in zip(la, lb):
    x = np.asarray(x, np.float64)
    d = np.abs(x if y is None else x - np.asarray(y, np.float64))
    out = max(out, float(d.max()) if d.size else 0.0)
  return out


def _left_float(row: dict, atol: float) -> bool:
  """Whether qwix left the layer float: its effect is nil next to the simulation's."""
  return row["qwix_effect"] <= atol and row["qwix_effect"] * 10 < row["sim_effect"]


def _reason(layer: str, row: dict, atol: float, others: Sequence[str]) -> str:
  """Why a layer's deployment differs from its simulation, and what to do."""
  others = sorted(set(others))
  qwix_axis, axis, ndim = row["qwix_axis"], row["axis"], row["ndim"]
  if _left_float(row, atol):
    feeds = f"its kernel feeds {others}, " if others and qwix_axis is None else ""
    return f"qwix leaves it float ({feeds}no dot_general/conv): leave it out of the allocation"
  if others and qwix_axis not in (None, "?"):
    return (f"qwix quantizes only its dot_general/conv use (axis {qwix_axis}), not its "
            f"{others}: leave it out of the allocation")
  if qwix_axis not in (None, "?") and ndim and _as_axes(qwix_axis, ndim) != _as_axes(axis, ndim):
    return (f"qwix quantizes along axis {qwix_axis}, the simulation along {axis}: pass "
            f"axes={{{layer!r}: {qwix_axis}}} (see deploy.channel_axes)")
  return "the outputs differ beyond the tolerance"


def verify(model: Any, variables: Any, bits: Mapping[str, int], *example_inputs: Any,
           axes: Mapping[str, Axis] | str | None = None, atol: float = 1e-3,
           group_size: int | None = None, raise_on_mismatch: bool = False,
           **example_kwargs: Any) -> Verification:
  """Checks that qwix deploys ``bits`` as simulated, for each layer alone and all together.

  For each layer of the allocation, the model quantized by qwix
  (:func:`quantized_apply`, that layer's rule only) and the simulated one
  (:func:`safer_jax.budgeting.mixed_precision.quantize_model` with ``full_range=True``,
  then the float forward) run on the example inputs; so do the whole
  allocation's. A layer qwix does not quantize (an embedding table, a
  convolution written as multiply-adds) or quantizes along another axis than
  the simulation shows up as differing: that is what this is for. Embedding
  layers are deployed here anyway (without :func:`to_qwix_rules`' refusal) to
  show it. Cost: one trace of the forward, one compilation of the simulated
  forward, and one of qwix's per layer plus one.

  Args:
    model: a linen module (with ``variables``), an nnx module or a wrapped
      linen/nnx model.
    variables: ``{'params': ..., ['batch_stats': ...]}``, float; None: the
      wrapped/nnx model's own.
    bits: ``{layer: bits}``, 2..8.
    *example_inputs: one batch of inputs (e.g. a few images, or ids and a mask).
    axes: ``{layer: channel axis}`` for the simulation (see
      ``quantize_model``); ``'detect'``: those of :func:`channel_axes`; None:
      the last axis of every kernel.
    atol: tolerance on ``max |qwix - simulated| / max |float outputs|``. Where
      qwix quantizes as simulated, the difference is float rounding: 0 or
      ~1e-7 on CPU, except that XLA:CPU fuses qwix's int8 dequantization into
      the convolution and computes it with less precision (YNNPACK fusion;
      ~4e-4 on the zoo's lenet at 8 bits; bit for bit with
      ``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=``), hence 1e-3. A
      layer qwix leaves float is flagged whatever ``atol`` (see
      :class:`LayerCheck`).
    group_size: group-wise scales on Dense kernels (simulation and qwix alike).
    raise_on_mismatch: raise :class:`DeploymentMismatch` (its message is the
      report) instead of returning a failed one.
    **example_kwargs: keyword inputs of the forward.

  Returns:
    A :class:`Verification` (``print`` it; ``.ok``, ``.mismatched``).

  Raises:
    ConfigError: bits qwix has no type for, a layer the model lacks, a plain
      apply function; :class:`DeploymentMismatch` with ``raise_on_mismatch``.
  """
  from safer_jax.budgeting import mixed_precision  # pylint: disable=import-outside-toplevel
  if not isinstance(atol, (int, float)) or isinstance(atol, bool) or not atol >= 0:
    raise ConfigError(f"atol={atol!r} must be a number >= 0 (relative to the output scale).")
  wrapped, variables = _wrapped(model, variables)
  _module_model(wrapped, "verify")  # qwix needs modules: refuses plain apply functions
  known = layers_lib.find_layers(variables)
  unknown = [name for name in bits if name not in known]
  if unknown:
    raise ConfigError(f"Layer(s) {unknown} of the allocation are not layers of the model; its "
                      f"layers: {known}")
  _rules(bits, group_size, variables, None)  # bit widths qwix has types for, before any work
  try:  # the axes qwix will use, for the report (and axes='detect'); a diagnostic only
    uses = _trace_uses(wrapped, variables, example_inputs, example_kwargs)
    detected = {}
    for name in bits:
      try:
        detected[name] = _axis_of(name, uses[name])
      except ValueError:
        detected[name] = "?"
  except Exception:  # pylint: disable=broad-except
    uses, detected = {}, {name: "?" for name in bits}
  if isinstance(axes, str):
    if axes != "detect":
      raise ConfigError(f"axes={axes!r}: allowed are a dict {{layer: axis}}, 'detect' or None.")
    axes = {n: a for n, a in detected.items() if a not in (None, "?")}
  axes = dict(axes or {})

  forward = _jit(_forward(wrapped))
  simulate = lambda b: forward(mixed_precision.quantize_model(  # noqa: E731
      variables, b, full_range=True, group_size=group_size, axes=axes), *example_inputs,
      **example_kwargs)
  floats = forward(variables, *example_inputs, **example_kwargs)
  scale = _max_abs(floats)
  unit = scale if scale > 0 else 1.0
  plans = [(name, {name: b}) for name, b in bits.items()] + [(ALLOCATION, dict(bits))]
  simulated = [simulate(b) for _, b in plans]
  rows = []
  for (name, b), sim in zip(plans, simulated):
    deployed = quantized_apply(wrapped, _rules(b, group_size, variables, None))(
        variables, *example_inputs, **example_kwargs)
    row = {"diff": _max_abs(deployed, sim) / unit, "sim_effect": _max_abs(sim, floats) / unit,
           "qwix_effect": _max_abs(deployed, floats) / unit}
    single = name != ALLOCATION
    ndim = np.ndim(layers_lib.get_kernel(variables, name)) if single else 0
    row.update(axis=axes.get(name, -1) if single else None,
               qwix_axis=detected.get(name, "?") if single else None, ndim=ndim)
    ok = row["diff"] <= atol and not (single and _left_float(row, atol))
    if ok:
      reason = ""
    elif single:
      others = [u[0] for u in uses.get(name, ()) if u[0] not in _QUANTIZED_OPS]
      reason = _reason(name, row, atol, others)
    else:
      reason = ("see the layers above" if any(not r.ok for r in rows) else
                "the layers agree one at a time but not together")
    rows.append(LayerCheck(layer=name, bits=b[name] if single else None, diff=row["diff"],
                           sim_effect=row["sim_effect"], qwix_effect=row["qwix_effect"],
                           axis=row["axis"], qwix_axis=row["qwix_axis"], ok=ok, reason=reason))
  report = Verification(layers=tuple(rows[:-1]), allocation=rows[-1], scale=scale,
                        atol=float(atol))
  if raise_on_mismatch and not report.ok:
    raise DeploymentMismatch(report)
  return report
