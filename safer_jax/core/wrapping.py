"""Your model, in the one shape every entry point takes.

:func:`wrap` turns a Flax linen ``Module`` (with its variables and any apply
keywords), an ``nnx.Module``, or a plain ``apply_fn(variables, x)`` into a
:class:`WrappedModel`: an object with

* ``.variables`` — ``{'params': ..., ['batch_stats': ...]}``, nested dicts of
  arrays with string keys, so layers are named by their pytree path
  (:mod:`safer_jax.core.layers`);
* ``.apply(variables, x) -> logits`` — **inference mode**: ``train=False``,
  ``deterministic=True``, BatchNorm running averages, no mutation;
* ``.apply_train(variables, x) -> (logits, state)`` — training mode (BatchNorm
  batch statistics, updated non-parameter state returned; dropout stays off),
  used by the fine-tuning loops.

Every entry point that takes a model (``run_sweep``, ``evaluate``,
``mixed_precision.cost_tables``, the criteria's ``classifier_loss_fn``,
attribution, WCAM and ACR) accepts a :class:`WrappedModel`; an ``nnx.Module``
is wrapped automatically, and so is a linen module whose ``__call__`` needs an
inference flag (:func:`as_model`).

>>> wrapped = sj.wrap(MyLinenNet(), variables)               # train=False inferred
>>> wrapped = sj.wrap(MyLinenNet(), variables, train=False)  # or stated
>>> wrapped = sj.wrap(my_nnx_net)                            # variables from the module
>>> wrapped = sj.wrap(lambda v, x: my_forward(v, x), params)
>>> sj.evaluate(wrapped, None, ds.eval)

The nnx module itself is never mutated: the wrapper splits it once into a
graph definition and state (``nnx.split``) and every call merges a fresh copy
(``nnx.merge``) from the variables it is given.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from safer_jax.core import layers as layers_lib
from safer_jax.core.errors import ConfigError

Variables = dict[str, Any]

# Keywords of ``__call__`` that switch a model between training and inference, with the value
# that means inference. Dropout-style flags stay in their inference value in training mode too
# (the fine-tuning loops carry no dropout RNG).
INFERENCE_FLAGS: dict[str, bool] = {
    "train": False, "training": False, "is_training": False,
    "deterministic": True, "use_running_average": True, "inference": True,
}
_TRAIN_FLIPS = ("train", "training", "is_training", "use_running_average")

ACCEPTED = ("a flax.linen Module with its variables (wrap(module, variables, **apply_kwargs)), "
            "a flax.nnx Module (wrap(module)), or a plain apply_fn(variables, x) -> logits with "
            "its variables (wrap(apply_fn, variables))")


class WrappedModel:
  """A model in inference mode with its variables; build with :func:`wrap`.

  Attributes:
    kind: ``'linen'``, ``'nnx'`` or ``'apply_fn'``.
    module: the wrapped linen/nnx module or apply function (never mutated).
    variables: ``{'params': ..., ['batch_stats': ...]}`` (string-keyed dicts).
    apply_kwargs: keywords passed to every inference call (inferred + given).
    output: picks the array the tasks score out of what the model returns (an
      output object, a tuple), or None (the model returns it).
    stage_names: the model's stages (zoo models: prefix reuse in the sweep);
      ``()`` for everything else.
  """

  def __init__(self, kind: str, module: Any, variables: Variables,
               apply_kwargs: Mapping[str, Any], train_kwargs: Mapping[str, Any], *,
               takes_variables: bool = True, output: Callable[[Any], Any] | None = None):
    self.kind = kind
    self.output = output
    self.module = module
    self.variables = variables
    self.apply_kwargs = dict(apply_kwargs)
    self._train_kwargs = dict(train_kwargs)
    self._takes_variables = takes_variables  # apply_fn: (variables, x), else (params, x)
    self.stage_names = tuple(getattr(module, "stage_names", ()) or ()) if kind == "linen" else ()
    # nnx: (graphdefs in eval / train / the original's mode, {collection: to_state}, the
    # state that is neither Param nor BatchStat, e.g. RNG keys, held fixed).
    self._nnx = None

  def __repr__(self) -> str:
    name = getattr(self.module, "__name__", type(self.module).__name__)
    layers = layers_lib.find_layers(self.variables)
    return (f"WrappedModel({self.kind}: {name}, {len(layers)} layers, "
            f"apply_kwargs={self.apply_kwargs})")

  # -- forward passes ------------------------------------------------------------------------

  def apply(self, variables: Variables, *inputs: Any, **kwargs) -> jax.Array:
    """Outputs (logits ``(B, K)``, ...) of ``inputs`` in inference mode; pure.

    ``inputs``: the model's positional inputs (one for most models); keyword
    ``kwargs`` go to the underlying call too (a second input such as a mask;
    zoo models: ``start=``/``stop=`` stages; linen: ``capture_intermediates=``,
    ``mutable=``). ``output`` (see :func:`wrap`) is applied to a full forward's
    result.
    """
    if self.kind == "linen":
      out = self.module.apply(variables, *inputs, **{**self.apply_kwargs, **kwargs})
    elif self.kind == "apply_fn":
      out = self.module(variables if self._takes_variables else variables["params"], *inputs,
                        **kwargs)
    else:
      out = self._nnx_call(variables, inputs, train=False, **kwargs)[0]
    return self.pick_output(out, kwargs)

  def pick_output(self, out: Any, kwargs: Mapping[str, Any]) -> Any:
    """``output(out)`` of a full forward called with ``kwargs`` (not of a stage range
    (``stop=``) or a capture (``mutable=``)); ``out`` itself without an ``output``."""
    if self.output is None or "mutable" in kwargs or kwargs.get("stop") is not None:
      return out
    return self.output(out)

  def apply_train(self, variables: Variables, *inputs: Any, key: jax.Array | None = None,
                  **kwargs) -> tuple[jax.Array, Variables]:
    """Logits and the updated non-parameter collections in training mode.

    Linen: ``train=True`` (etc.) with every non-``params`` collection mutable
    and ``key`` as the ``'dropout'`` RNG (a fixed key when None) for models
    whose training flag also turns dropout on; nnx: the module's ``.train()``
    copy with dropout kept off, its new ``BatchStat`` values returned as
    ``{'batch_stats': ...}``; a plain apply function has no training mode (its
    inference output and ``{}``).
    """
    state = {k: v for k, v in variables.items() if k != "params"}
    if self.kind == "linen":
      kwargs = {**self.apply_kwargs, **self._train_kwargs, **kwargs,
                "rngs": {"dropout": jax.random.key(0) if key is None else key}}
      if not state:
        return self.pick_output(self.module.apply(variables, *inputs, **kwargs), {}), {}
      logits, new = self.module.apply(variables, *inputs, mutable=list(state), **kwargs)
      return self.pick_output(logits, {}), dict(new)
    if self.kind == "apply_fn":
      return self.apply(variables, *inputs, **kwargs), {}
    logits, new = self._nnx_call(variables, inputs, train=True, **kwargs)
    return self.pick_output(logits, {}), new

  def apply_with_hook(self, variables: Variables, x: jax.Array, layer: str,
                      hook: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """Inference logits with the output ``F`` of module ``layer`` replaced by ``hook(F)``.

    Raises:
      ValueError: ``layer`` is not a module of the model, or the model is a
        plain apply function (it has no modules to reach into).
    """
    if self.kind == "apply_fn":
      raise ValueError(f"Layer outputs (Grad-CAM, attribution maps) need module boundaries; a "
                       f"plain apply function has none. Wrap a linen or nnx module instead "
                       f"(layer {layer!r} was asked for).")
    if self.kind == "linen":
      import flax.linen as nn  # pylint: disable=import-outside-toplevel
      target = tuple(layer.split("/"))
      seen = []

      def interceptor(next_fun, args, kw, context):
        out = next_fun(*args, **kw)
        if context.method_name == "__call__" and tuple(context.module.path) == target:
          seen.append(True)
          out = hook(out)
        return out

      with nn.intercept_methods(interceptor):
        logits = self.apply(variables, x)
    else:
      logits, _, seen = self._nnx_call(variables, (x,), train=False, hook=(layer, hook))
      logits = self.pick_output(logits, {})
    if not seen:
      raise ValueError(f"Layer {layer!r} is not a module of the model; layers with a kernel: "
                       f"{layers_lib.find_layers(variables)}")
    return logits

  # -- nnx -----------------------------------------------------------------------------------

  def _nnx_call(self, variables, inputs, train, hook=None, **kwargs):
    from flax import nnx  # pylint: disable=import-outside-toplevel
    g_eval, g_train, _, convert, rest = self._nnx
    # jnp arrays: an nnx module assigns to its variables in place (BatchNorm in training mode),
    # which NumPy leaves (restored or device_get variables) would refuse or share.
    states = [convert[name](jax.tree.map(jnp.asarray, variables.get(name, {})))
              for name in convert]
    module = nnx.merge(g_train if train else g_eval, *states, rest)
    seen = []
    if hook is not None:
      layer, fn = hook
      parent, attr = _nnx_parent(module, layer)
      inner = _nnx_get(parent, attr)

      def hooked(*args, **kw):
        seen.append(True)
        return fn(inner(*args, **kw))

      _nnx_set(parent, attr, _Hooked(hooked))
    logits = module(*inputs, **{**self.apply_kwargs, **kwargs})
    if hook is not None:
      return logits, None, seen
    if not train:
      return logits, {}
    _, *new_states, _ = nnx.split(module, nnx.Param, nnx.BatchStat, ...)
    stats = layers_lib.as_pure(new_states[1])
    return logits, ({"batch_stats": stats} if stats else {})

  def to_nnx(self, variables: Variables | None = None):
    """A new ``nnx.Module`` holding ``variables`` (e.g. a quantized copy); the original is untouched.

    The new module is in the mode the original was in when wrapped.
    """
    if self.kind != "nnx":
      raise ValueError(f"to_nnx() needs a wrapped nnx module; this one is {self.kind!r}.")
    from flax import nnx  # pylint: disable=import-outside-toplevel
    variables = self.variables if variables is None else variables
    _, _, g_orig, convert, rest = self._nnx
    return nnx.merge(g_orig, *[convert[n](jax.tree.map(jnp.asarray, variables.get(n, {})))
                              for n in convert], rest)


class _Hooked:
  """A plain callable standing in for an nnx submodule inside one merged copy."""

  def __init__(self, fn):
    self.fn = fn

  def __call__(self, *args, **kwargs):
    return self.fn(*args, **kwargs)


def _nnx_get(parent, attr):
  return parent[int(attr)] if attr.isdigit() and not hasattr(parent, attr) else getattr(parent,
                                                                                       attr)


def _nnx_set(parent, attr, value):
  if attr.isdigit() and not hasattr(parent, attr):
    parent[int(attr)] = value
  else:
    object.__setattr__(parent, attr, value)


def _nnx_parent(module, layer: str):
  parts = layer.split("/")
  node = module
  for part in parts[:-1]:
    try:
      node = _nnx_get(node, part)
    except (AttributeError, IndexError, KeyError, TypeError):
      raise ValueError(f"Layer {layer!r} is not a module of the model.") from None
  return node, parts[-1]


# ---------------------------------------------------------------------------------------------
# Converting pure dicts (string keys) <-> nnx.State.
# ---------------------------------------------------------------------------------------------


def state_converter(state: Any) -> Callable[[Mapping[str, Any]], Any]:
  """``to_state(pure)``: the ``nnx.State`` shaped like ``state`` holding ``pure``'s arrays.

  ``pure`` is ``layers.as_pure(state)`` (or a dict of the same structure with
  other arrays, e.g. perturbed kernels); traceable under ``jit``/``grad``.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(state)
  paths = [tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
           for path, _ in flat]

  def to_state(pure: Mapping[str, Any]) -> Any:
    leaves = []
    for path in paths:
      node = pure
      for part in path:
        node = node[part]
      leaves.append(node)
    return jax.tree_util.tree_unflatten(treedef, leaves)

  return to_state


class StateLossFn:
  """``loss_fn(pure_params, batch)`` from a user's ``loss_fn(state, batch)`` over an ``nnx.State``.

  Hashable (by the user's function and the state's structure), so compiled
  criteria are reused across calls with the same model.
  """

  def __init__(self, loss_fn: Callable, state: Any):
    self.loss_fn = loss_fn
    self.treedef = jax.tree_util.tree_structure(state)
    self.to_state = state_converter(state)

  def __call__(self, params, batch):
    return self.loss_fn(self.to_state(params), batch)

  def __hash__(self):
    return hash((self.loss_fn, self.treedef))

  def __eq__(self, other):
    return (isinstance(other, StateLossFn) and other.loss_fn is self.loss_fn
            and other.treedef == self.treedef)


def pure_params_and_loss(loss_fn: Callable | None, params: Any) -> tuple[Callable | None, Any]:
  """``(loss_fn, params)`` with an ``nnx.State`` replaced by its pure dict (criteria entry).

  Raises:
    ValueError: an ``nnx.State`` inside a dict
      (:func:`safer_jax.core.layers.check_no_nested_state`).
  """
  layers_lib.check_no_nested_state(params, "params")
  if not layers_lib.is_nnx_state(params):
    return loss_fn, params
  pure = layers_lib.as_pure(params)
  return (None if loss_fn is None else StateLossFn(loss_fn, params)), pure


# ---------------------------------------------------------------------------------------------
# wrap / as_model.
# ---------------------------------------------------------------------------------------------


def _is_linen(model: Any) -> bool:
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  return isinstance(model, nn.Module)


def _is_nnx(model: Any) -> bool:
  from flax import nnx  # pylint: disable=import-outside-toplevel
  return isinstance(model, nnx.Module)


def _as_variables(variables: Any) -> Variables:
  """Plain dicts; params alone become ``{'params': params}``."""
  from flax.core import unfreeze  # pylint: disable=import-outside-toplevel
  from flax.core import meta  # pylint: disable=import-outside-toplevel
  layers_lib.check_no_nested_state(variables)
  if layers_lib.is_nnx_state(variables):
    variables = layers_lib.as_pure(variables)
  # nn.with_partitioning / with_logical_partitioning boxes (LogicallyPartitioned, Partitioned):
  # their arrays, so layers are named by plain paths and kernels replaced as arrays.
  variables = meta.unbox(variables)
  if not isinstance(variables, Mapping):
    raise ValueError(f"variables must be a dict of parameter collections (or params), got "
                     f"{type(variables).__name__}.")
  variables = unfreeze(variables) if hasattr(variables, "unfreeze") else dict(variables)
  if "params" not in variables or not isinstance(variables["params"], Mapping):
    variables = {"params": variables}
  return variables


def _call_signature(module: Any) -> tuple[list[inspect.Parameter], bool]:
  """``__call__``'s parameters after the input, and whether it takes ``**kwargs``."""
  try:
    sig = inspect.signature(type(module).__call__)
  except (TypeError, ValueError):
    return [], True
  params = list(sig.parameters.values())[1:]  # drop self
  var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
  positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
  rest = [p for p in params if p not in positional[:1] and p.kind not in (p.VAR_KEYWORD,
                                                                          p.VAR_POSITIONAL)]
  return rest, var_kw


def _mode_kwargs(module: Any, given: Mapping[str, Any], *,
                 infer: bool = True) -> tuple[dict, dict]:
  """(inference kwargs, training overrides) for ``module.__call__``; checks ``given``.

  ``infer=False`` (nnx, whose modes are module attributes): only the checks.
  """
  rest, var_kw = _call_signature(module)
  names = [p.name for p in rest]
  cls = type(module).__name__
  for key in given:
    if key not in names and not var_kw:
      raise ValueError(f"Apply keyword {key!r} is not accepted by {cls}.__call__; it accepts "
                       f"{names or 'no keyword besides the input'}.")
  kwargs = dict(given)
  train = {}
  for p in rest if infer else ():
    if p.name in INFERENCE_FLAGS:
      inference = INFERENCE_FLAGS[p.name]
      if p.name not in kwargs and (p.default is p.empty or p.default is not inference):
        kwargs[p.name] = inference
      if p.name in _TRAIN_FLIPS:
        train[p.name] = not inference
  # Required arguments not given here (a mask, lengths, positions) are more model inputs: they
  # come from each batch (a task's ``inputs``, :mod:`safer_jax.core.tasks`), never fixed here.
  return kwargs, train


def inference_kwargs(module: Any) -> dict[str, Any]:
  """The keywords that put a linen module's ``__call__`` in inference mode (``{'train': False}``, ...).

  Only flags of :data:`INFERENCE_FLAGS` whose default is not inference already;
  ``{}`` for anything that is not a linen module.
  """
  return _mode_kwargs(module, {})[0] if _is_linen(module) else {}


def wrap(model: Any, variables: Any = None, *, output: Callable[[Any], Any] | None = None,
         **apply_kwargs) -> WrappedModel:
  """Wraps a linen module, an nnx module or an apply function for every safer_jax entry point.

  Args:
    model: a ``flax.linen.Module``, a ``flax.nnx.Module``, a plain
      ``apply_fn(variables, x) -> logits (B, K)`` (or ``apply_fn(params, x)``
      when ``variables`` holds no ``'params'`` collection), or an already
      wrapped model (returned as is, with ``variables`` replaced if given).
    variables: linen / apply_fn: the variables (``model.init(...)``) or the
      params alone; nnx: ``None`` (taken from the module) or an ``nnx.State``
      (itself: ``{'params': nnx.State}`` is refused).
      Partitioning boxes (``nn.with_logical_partitioning``'s
      ``LogicallyPartitioned``, ``nn.Partitioned``) are unboxed.
    output: ``fn(model output) -> array`` the tasks score, for models that
      return an output object or a tuple (``lambda out: out.logits``,
      ``lambda out: out[0]``); None: the output itself.
    **apply_kwargs: keywords for every inference call (``train=False``,
      ``deterministic=True``, ...). Flags named in :data:`INFERENCE_FLAGS`
      that ``__call__`` takes are set to their inference value when not given.

  Returns:
    A :class:`WrappedModel`.

  Raises:
    ValueError: a model of another type, missing variables, an ``nnx.State``
      inside a dict, an apply keyword
      that ``__call__`` does not accept or a required one left out, or a state
      with no layer (no ``kernel``/``embedding`` leaf) — each naming what was
      given and what is accepted.
  """
  if output is not None and not callable(output):
    raise ValueError(f"output must be a function of the model's output (e.g. lambda out: "
                     f"out.logits), got {type(output).__name__}.")
  if isinstance(model, WrappedModel):
    if variables is None and not apply_kwargs and output is None:
      return model
    if variables is None:  # (a plain function of params gets its params back, not variables)
      variables = (model.variables if model.kind != "apply_fn" or model._takes_variables  # pylint: disable=protected-access
                   else model.variables["params"])
    return wrap(model.module, variables, output=output or model.output,
                **{**model.apply_kwargs, **apply_kwargs})
  if _is_nnx(model):
    wrapped = _wrap_nnx(model, variables, apply_kwargs)
  elif _is_linen(model):
    if variables is None:
      raise ValueError(f"A linen module ({type(model).__name__}) holds no weights: pass its "
                       f"variables, wrap(model, variables) with variables = model.init(...).")
    kwargs, train = _mode_kwargs(model, apply_kwargs)
    wrapped = WrappedModel("linen", model, _as_variables(variables), kwargs, train)
  elif callable(model) and not isinstance(model, type):
    if variables is None:
      raise ValueError("A plain apply function needs its variables: wrap(apply_fn, variables).")
    takes_variables = isinstance(variables, Mapping) and "params" in variables and isinstance(
        variables["params"], Mapping)
    if apply_kwargs:
      raise ValueError(f"Apply keywords {sorted(apply_kwargs)} are for linen/nnx modules; bind "
                       f"them into the apply function instead (functools.partial).")
    wrapped = WrappedModel("apply_fn", model, _as_variables(variables), {}, {},
                           takes_variables=takes_variables)
  else:
    raise ValueError(f"Cannot wrap a {type(model).__module__}.{type(model).__name__}: expected "
                     f"{ACCEPTED}.")
  wrapped.output = output
  layers = layers_lib.find_layers(wrapped.variables)
  if not layers:
    top = sorted(map(str, wrapped.variables["params"]))
    raise ValueError(f"The model's parameters hold no layer (no module with a leaf named one of "
                     f"{list(layers_lib.KERNEL_LEAVES)}); top-level params: {top}. Layers are "
                     f"Dense/Linear, Conv, ConvTranspose, DenseGeneral/LinearGeneral, Einsum "
                     f"and Embed modules.")
  return wrapped


def _wrap_nnx(module: Any, variables: Any, apply_kwargs: Mapping[str, Any]) -> WrappedModel:
  from flax import nnx  # pylint: disable=import-outside-toplevel
  graphdef, state = nnx.split(module)
  copy = nnx.merge(graphdef, state)  # modes are set on copies; `module` is left as it was
  copy.eval()
  g_eval, params, stats, rest = nnx.split(copy, nnx.Param, nnx.BatchStat, ...)
  train_copy = nnx.merge(graphdef, state)
  train_copy.train()
  train_copy.set_attributes(deterministic=True, raise_if_not_found=False)
  g_train = nnx.split(train_copy, nnx.Param, nnx.BatchStat, ...)[0]
  g_orig = nnx.split(module, nnx.Param, nnx.BatchStat, ...)[0]
  if variables is not None:  # an nnx.State (or pure dict) with new values of the params
    given = _as_variables(variables)
    params_pure = given["params"]
    stats_pure = given.get("batch_stats", layers_lib.as_pure(stats))
  else:
    params_pure, stats_pure = layers_lib.as_pure(params), layers_lib.as_pure(stats)
  convert = {"params": state_converter(params), "batch_stats": state_converter(stats)}
  out = {"params": params_pure}
  if stats_pure:
    out["batch_stats"] = stats_pure
  wrapped = WrappedModel("nnx", module, out, _mode_kwargs(module, apply_kwargs, infer=False)[0],
                         {})
  wrapped._nnx = (g_eval, g_train, g_orig, convert, rest)  # pylint: disable=protected-access
  return wrapped


def training_apply(model: Any) -> Callable[..., tuple[jax.Array, Variables]]:
  """``f(variables, x, key=None) -> (logits, new_state)`` in training mode (:meth:`WrappedModel.apply_train`).

  Accepts a wrapped model, a linen module (its training flag inferred from
  ``__call__``, e.g. ``train=True``) or an nnx module.

  Raises:
    ValueError: a plain apply function (it has no training mode to switch to;
      wrap it to fine-tune in inference mode) or another type.
  """
  if isinstance(model, WrappedModel):
    return model.apply_train
  if _is_linen(model):
    kwargs, train = _mode_kwargs(model, {})
    return WrappedModel("linen", model, {}, kwargs, train).apply_train
  if _is_nnx(model):
    return wrap(model).apply_train
  raise ValueError(f"Training needs a model with a training mode; got a "
                   f"{type(model).__name__}: expected {ACCEPTED}.")


def with_variables(model: Any, variables: Any) -> WrappedModel:
  """``model`` as a :class:`WrappedModel` running ``variables`` (linen, nnx or already wrapped)."""
  if isinstance(model, WrappedModel):
    return model
  return wrap(model, variables)


def linen_module(model: Any, what: str) -> tuple[Any, dict]:
  """``(linen module, inference apply keywords)`` of a linen module or a wrapped linen model.

  Raises:
    ConfigError: any other model (``what`` names the feature that needs linen).
  """
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  if isinstance(model, WrappedModel):
    if model.kind != "linen":
      raise ConfigError(f"{what} needs a linen model; got a {model.kind!r} model")
    return model.module, dict(model.apply_kwargs)
  if isinstance(model, nn.Module):
    return model, {}
  raise ConfigError(f"{what} needs a linen model (or a wrapped one); got {type(model).__name__}")


def is_model(obj: Any) -> bool:
  """Whether ``obj`` is a model object (wrapped, linen or nnx) rather than an apply function."""
  return isinstance(obj, WrappedModel) or _is_linen(obj) or _is_nnx(obj)


def as_model(model: Any, variables: Any = None) -> tuple[Any, Variables]:
  """``(model, variables)`` as the library's entry points use them.

  A :class:`WrappedModel` gives its variables when ``variables`` is None; an
  ``nnx.Module`` is wrapped; a linen module is wrapped when its ``__call__``
  has an inference flag whose default is not inference (``train`` with no
  default, ``deterministic=False``, ...) — otherwise it and plain apply
  functions are returned as they are (so compiled-function caches keyed on
  the model keep working).

  Raises:
    ValueError: no variables for a model that needs them, an ``nnx.State``
      inside a dict (``{'params': nnx.State}``), or see :func:`wrap`.
  """
  layers_lib.check_no_nested_state(variables)
  if isinstance(model, WrappedModel):
    return model, (model.variables if variables is None else _as_variables(variables))
  if _is_nnx(model):
    wrapped = wrap(model, variables)
    return wrapped, wrapped.variables
  if variables is None:
    raise ValueError(f"No variables given for a {type(model).__name__}: pass them, or wrap the "
                     f"model with safer_jax.wrap(model, variables).")
  if _is_linen(model):
    kwargs, _ = _mode_kwargs(model, {})
    if kwargs:
      wrapped = wrap(model, variables)
      return wrapped, wrapped.variables
  return model, variables
