"""Deployment through qwix: bit allocations as qwix rules, and models quantized by qwix.

A bit allocation (``{layer: bits}``, e.g. :attr:`safer_jax.budget.Allocation.bits`)
becomes one ``qwix.QtRule`` per layer: an anchored regex of the layer's path
(qwix matches ``re.fullmatch`` against the ``/``-joined module path, which is the
layer's path in the params pytree) and ``weight_qtype`` ``'int2'`` .. ``'int8'``.
:func:`from_qwix_rules` reads rules back (qwix's first matching rule wins).

Weights only, per output channel (or group-wise on Dense kernels), symmetric:
qwix's convention, which
:func:`safer_jax.perturb.quantize` reproduces with ``full_range=True``
(bit for bit on the weights; tests/test_deploy.py compares the two). qwix
intercepts ``lax.conv_general_dilated`` and ``dot_general`` calls inside Flax
modules, so layers computed otherwise (e.g. the zoo's depthwise convolutions,
written as multiply-adds) are not quantized by it. Linen models only, for now.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import qwix

from safer_jax import layers as layers_lib
from safer_jax import wrapping
from safer_jax.errors import ConfigError

MIN_BITS, MAX_BITS = 2, 8  # qwix's integer types: int2 .. int8


def _qtype(bits: int) -> str:
  if isinstance(bits, bool) or int(bits) != bits or not MIN_BITS <= bits <= MAX_BITS:
    raise ConfigError(f"bits={bits!r} has no qwix integer type; allowed: integers "
                      f"{MIN_BITS}..{MAX_BITS}")
  return f"int{int(bits)}"


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
    variables: the model variables; needed with ``group_size``.
    act_bits: also quantize each layer's input (qwix ``act_qtype``, its dynamic
      ranges); None: weights only.

  Returns:
    Rules in the order of ``bits``, each ``module_path=re.escape(layer)``.

  Raises:
    ConfigError: a bit width qwix has no integer type for, or ``group_size``
      without ``variables``.
  """
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


def from_qwix_rules(rules: Iterable[Any], layers: Sequence[str]) -> dict[str, int]:
  """``{layer: bits}`` of the layers a rule quantizes (first full match wins, as in qwix).

  Args:
    rules: ``qwix.QtRule`` objects or dicts with ``module_path`` and ``weight_qtype``.
    layers: layer paths (e.g. :func:`safer_jax.layers.find_layers`).

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


def quantized_apply(model: Any, rules: Sequence[qwix.QtRule]) -> Callable:
  """``jit(apply)`` of ``model`` with its weights quantized by qwix (``QtProvider``).

  Args:
    model: a linen module (zoo models included) or a :func:`safer_jax.wrap`-ped
      linen model; run in inference mode.
    rules: e.g. :func:`to_qwix_rules`.

  Returns:
    ``apply(variables, images) -> logits``.
  """
  module, kwargs = wrapping.linen_module(model, "quantized_apply")
  quantized = qwix.quantize_model(module, qwix.QtProvider(list(rules)))
  # Under jit: qwix finds each weight by tracing the kernel back to its param.
  return jax.jit(lambda variables, x: quantized.apply(variables, x, **kwargs))
