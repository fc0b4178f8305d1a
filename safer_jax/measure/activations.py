"""Activation quantization: how much accuracy each layer loses when its *input* is quantized.

The weight sweep (:mod:`safer_jax.measure.sweep`) perturbs kernels; deployment also
quantizes activations (qwix's ``act_qtype``, AIMET's QuantAnalyzer measures both).
Here the input of one layer at a time is fake-quantized per tensor, symmetric on
qwix's full signed grid (``scale = range / (2^(b-1) - 0.5)``, codes
``-2^(b-1)..2^(b-1)-1``), with a *static* range calibrated on training data (the
largest ``|x|`` entering the layer over the calibration batches), everything
else in float. The layer's input is intercepted with
``flax.linen.intercept_methods``, so any linen model works, zoo models included.

``act_sweep`` returns rows shaped like :func:`safer_jax.measure.sweep.run_sweep`'s
(family ``'act_quantize'``, magnitude = bits), so :func:`safer_jax.measure.sweep.importance`
ranks layers by activation sensitivity.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from safer_jax.core import data as data_lib
from safer_jax.core import layers as layers_lib
from safer_jax.core import wrapping
from safer_jax.core.errors import ConfigError
from safer_jax.core.progress import Progress
from safer_jax.core.tasks import cross_entropy

FAMILY = "act_quantize"


def quantize_tensor(x: jax.Array, bits: jax.typing.ArrayLike, absmax: jax.typing.ArrayLike
                    ) -> jax.Array:
  """``x`` fake-quantized per tensor to ``bits`` bits for the range ``[-absmax, absmax]``.

  ``scale = absmax / (2^(b-1) - 0.5)`` (1 when ``absmax`` is 0), codes
  ``clip(round(x / scale), -2^(b-1), 2^(b-1) - 1)``; values beyond the range clip.
  ``bits`` and ``absmax`` may be traced.
  """
  b = jnp.asarray(bits, jnp.float32)
  bound = jnp.exp2(b - 1.0) - 0.5
  scale = jnp.asarray(absmax, jnp.float32) / bound
  scale = jnp.where(scale > 0, scale, 1.0)
  codes = jnp.clip(jnp.round(x.astype(jnp.float32) / scale), -bound - 0.5, bound - 0.5)
  return (codes * scale).astype(x.dtype)


def _on_inputs(fns: Mapping[str, Callable[[jax.Array], jax.Array]]):
  """A linen interceptor applying ``fns[layer]`` to the input of each listed layer's ``__call__``."""
  def interceptor(next_fun, args, kwargs, context):
    name = "/".join(context.module.path)
    if context.method_name == "__call__" and name in fns:
      args = (fns[name](args[0]),) + tuple(args[1:])
    return next_fun(*args, **kwargs)
  return interceptor


def input_ranges(model: Any, variables: Mapping[str, Any], batches: Sequence[Mapping[str, Any]],
                 layers: Sequence[str]) -> dict[str, float]:
  """``{layer: max |x|}`` of each layer's input over the calibration ``batches`` (one program)."""
  module, kwargs = wrapping.linen_module(model, "activation quantization")
  names = tuple(layers)

  @jax.jit
  def ranges(v, images):
    seen = {}

    def record(name):
      def fn(x):
        seen[name] = jnp.max(jnp.abs(x))
        return x
      return fn

    with nn.intercept_methods(_on_inputs({n: record(n) for n in names})):
      module.apply(v, images, **kwargs)
    missing = [n for n in names if n not in seen]
    if missing:
      raise ConfigError(f"layers {missing} were not called as modules (their input cannot be "
                        f"intercepted); known module paths are their params' paths")
    return [seen[n] for n in names]

  out = np.zeros(len(names))
  for batch in batches:
    out = np.maximum(out, np.asarray(jax.device_get(ranges(variables, batch["image"]))))
  return {n: float(r) for n, r in zip(names, out)}


def quantized_inputs_apply(model: Any, ranges: Mapping[str, float], bits: int) -> Callable:
  """``jit(apply)`` with the input of every layer of ``ranges`` quantized to ``bits`` bits.

  Static per-tensor ranges (e.g. :func:`input_ranges` on calibration data), qwix's
  signed grid (:func:`quantize_tensor`); weights as given in ``variables``.
  Returns ``apply(variables, images) -> logits``.
  """
  module, kwargs = wrapping.linen_module(model, "activation quantization")
  fns = {name: (lambda x, r=float(r): quantize_tensor(x, bits, r)) for name, r in ranges.items()}

  @jax.jit
  def apply(variables, images):
    with nn.intercept_methods(_on_inputs(fns)):
      return module.apply(variables, images, **kwargs)

  return apply


def act_sweep(model: Any, variables: Mapping[str, Any], split: data_lib.Split,
              calib: Sequence[Mapping[str, Any]], bits: Sequence[int], *,
              layers: Sequence[str] | None = None, batch_size: int = 1024,
              progress: bool = True) -> pd.DataFrame:
  """Accuracy and loss with one layer's input quantized, for every layer and bit width.

  Args:
    model: a linen module (zoo models) or a :func:`safer_jax.wrap`-ped linen model.
    variables: its variables.
    split: held-out data the accuracy is measured on.
    calib: calibration batches (``{'image', 'label'}``, from the *training*
      data) the per-tensor ranges come from.
    bits: bit widths (integers 2..16), mildest first.
    layers: layer paths (default: every layer).
    batch_size: eval batch size.
    progress: show layers done and an ETA.

  Returns:
    Rows ``layer, family ('act_quantize'), magnitude (bits), magnitude_index,
    seed (0), accuracy, loss, accuracy_drop, loss_increase, num_params,
    input_absmax`` (accuracy a fraction, loss in nats/example). One compiled
    program per layer (bit width and range are inputs).

  Raises:
    ConfigError: bits outside 2..16, an unknown layer, a non-linen model.
  """
  module, kwargs = wrapping.linen_module(model, "activation quantization")
  names = list(layers or layers_lib.find_layers(variables))
  unknown = sorted(set(names) - set(layers_lib.find_layers(variables)))
  if unknown:
    raise ConfigError(f"unknown layers {unknown}; the model's layers: "
                      f"{layers_lib.find_layers(variables)}")
  for b in bits:
    if isinstance(b, bool) or int(b) != b or not 2 <= b <= 16:
      raise ConfigError(f"bits={b!r} is out of range; allowed: integers 2..16")
  ranges = input_ranges(model, variables, calib, names)
  n = len(split)
  batches = [(split.images[i:i + batch_size], split.labels[i:i + batch_size])
             for i in range(0, n, batch_size)]

  def metrics(fn_for_layer):
    correct = loss = 0.0
    for images, labels in batches:
      c, l = fn_for_layer(images, labels)
      correct, loss = correct + float(c), loss + float(l)
    return correct / n, loss / n

  def evaluate(v, images, labels, interceptor=None):
    if interceptor is None:
      logits = module.apply(v, images, **kwargs)
    else:
      with nn.intercept_methods(interceptor):
        logits = module.apply(v, images, **kwargs)
    return (jnp.sum(jnp.argmax(logits, -1) == labels),
            jnp.sum(cross_entropy(logits, labels)))

  plain = jax.jit(evaluate)
  base_acc, base_loss = metrics(lambda x, y: plain(variables, x, y))
  rows = []
  bar = Progress(len(names), "act sweep", enabled=progress, unit="layer")
  for name in names:
    @jax.jit
    def quantized(v, images, labels, b, absmax, name=name):
      return evaluate(v, images, labels,
                      _on_inputs({name: lambda x: quantize_tensor(x, b, absmax)}))

    for i, b in enumerate(bits):
      acc, loss = metrics(lambda x, y: quantized(variables, x, y, jnp.float32(b),
                                                 jnp.float32(ranges[name])))
      rows.append({"layer": name, "family": FAMILY, "magnitude": float(b), "magnitude_index": i,
                   "seed": 0, "accuracy": acc, "loss": loss, "accuracy_drop": base_acc - acc,
                   "loss_increase": loss - base_loss,
                   "num_params": int(np.size(layers_lib.get_kernel(variables, name))),
                   "input_absmax": ranges[name]})
    bar.update(1, postfix=name)
  bar.close()
  table = pd.DataFrame(rows)
  table.attrs.update(baseline_accuracy=base_acc, baseline_loss=base_loss)
  return table
