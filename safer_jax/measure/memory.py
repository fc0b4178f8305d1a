"""How much device memory a sensitivity sweep needs, and chunk sizes that fit a budget.

The sweep (:mod:`safer_jax.measure.sweep`) evaluates ``P = max_parallel`` perturbed
copies of one layer per compiled call on ``B = eval_batch_size`` examples. What
one call needs is read from XLA itself: the exact function the engine jits
(:func:`safer_jax.core.staged.eval_program`) is lowered with abstract inputs
(``jax.ShapeDtypeStruct``; nothing large is allocated), compiled, and its
``memory_analysis()`` gives argument, output, temporary and aliased bytes. To
that come the buffers that stay on the device while the call runs:

* the **prefix activations** the engine caches for every eval batch (the
  activations entering the perturbed layer's stage; stage 0 reads host images,
  so nothing is cached there): ``ceil(N / B) * B * bytes per example``;
* the **perturbed kernels** of the layer: the per-family stacks and their
  concatenation, ``2 * copies * kernel bytes``;
* anything else the caller names (``extra_bytes``, e.g. the loss gradients of
  the ``'corrupt'`` family, one parameter tree).

The figure is an estimate for the backend that compiles it: estimated on CPU
for a GPU, it can be off (different fusion, convolution algorithms and their
workspaces, allocator fragmentation), hence the ``margin`` on the program part.
JAX on GPU preallocates 75 % of the memory by default
(``XLA_PYTHON_CLIENT_MEM_FRACTION``): budget what JAX may use, not the card.

Sizes are in bytes; "GB" in messages is 10**9 bytes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from safer_jax.core import caches
from safer_jax.core import errors
from safer_jax.core import layers as layers_lib
from safer_jax.core import staged

GB = 10**9


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
  """Bytes one compiled sweep call needs on a device, by part.

  Attributes:
    layer: the perturbed layer.
    max_parallel: perturbed copies per call ``P``.
    eval_batch_size: examples per call ``B``.
    arguments: XLA argument bytes (weights, ``P`` kernels, one batch of inputs).
    outputs: XLA output bytes.
    temps: XLA temporary bytes (activations of the ``P`` copies, ...).
    aliases: XLA bytes shared between arguments and outputs (counted once).
    prefix: resident prefix activations of all eval batches.
    kernels: resident perturbed-kernel stacks of the layer.
    extra: other resident buffers named by the caller.
    backend: the backend whose compiler produced the figures (e.g. ``'cpu'``).
  """
  layer: str
  max_parallel: int
  eval_batch_size: int
  arguments: int
  outputs: int
  temps: int
  aliases: int
  prefix: int
  kernels: int
  extra: int
  backend: str

  @property
  def program(self) -> int:
    """Bytes of the compiled call: arguments + outputs + temps - aliases."""
    return self.arguments + self.outputs + self.temps - self.aliases

  @property
  def resident(self) -> int:
    """Bytes held across calls: prefix activations + kernel stacks + extra."""
    return self.prefix + self.kernels + self.extra

  @property
  def total(self) -> int:
    """``program + resident`` (no safety margin)."""
    return self.program + self.resident

  def needed(self, margin: float = 1.0) -> int:
    """``margin * program + resident``: what a budget must hold."""
    return int(math.ceil(margin * self.program)) + self.resident


@dataclasses.dataclass(frozen=True)
class Chunking:
  """The chunk sizes :func:`plan_chunking` picked and why they fit.

  Attributes:
    max_parallel: perturbed copies per compiled call (per device).
    eval_batch_size: examples per compiled call.
    needed_bytes: ``margin * worst program + worst resident`` at these sizes.
    budget_bytes: the budget it fits.
    margin: the safety factor applied to the program part.
    worst: the probe layer with the largest program at these sizes.
    probes: the layers whose programs were compiled.
  """
  max_parallel: int
  eval_batch_size: int
  needed_bytes: int
  budget_bytes: int
  margin: float
  worst: MemoryEstimate
  probes: tuple[str, ...]


def abstract(tree: Any) -> Any:
  """``tree`` with every array leaf replaced by its ``jax.ShapeDtypeStruct``."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


abstract_variables = layers_lib.abstract_variables  # (the one helper; kept under this name too)


def _nbytes(x: Any) -> int:
  return int(np.prod(x.shape, dtype=np.int64)) * jnp.dtype(x.dtype).itemsize


def tree_bytes(tree: Any) -> int:
  """Bytes of all array leaves of ``tree`` (arrays or ``ShapeDtypeStruct`` s)."""
  return sum(_nbytes(x) for x in jax.tree.leaves(tree))


def stage_inputs(model: Any, variables: Any, input_shape: Sequence[int],
                 dtype: Any = jnp.float32) -> list[jax.ShapeDtypeStruct]:
  """Per stage ``k`` of a staged model: the activation entering it, for ONE example.

  Shapes have a leading batch axis of 1. A model without stages has one
  "stage" whose input is the image. Computed with ``jax.eval_shape``.
  """
  h = jax.ShapeDtypeStruct((1, *input_shape), dtype)
  names = getattr(model, "stage_names", None)
  if not names:
    return [h]
  v = abstract(variables)
  key = (id(model), tuple(input_shape), jnp.dtype(dtype).name, _signature(v))
  if key not in _STAGE_CACHE:
    _STAGE_CACHE.clear()  # one model at a time
    out = [h]
    for k in range(len(names) - 1):
      h = jax.eval_shape(lambda v, x, k=k: model.apply(v, x, start=k, stop=k + 1), v, h)
      out.append(h)
    _STAGE_CACHE[key] = (model, out)
  return list(_STAGE_CACHE[key][1])


def _signature(abstract_tree: Any) -> tuple:
  leaves, treedef = jax.tree.flatten(abstract_tree)
  return treedef, tuple((x.shape, jnp.dtype(x.dtype).name) for x in leaves)


_STAGE_CACHE: dict[tuple, tuple[Any, list]] = {}


def layer_order(model: Any, variables: Any, input_shape: Sequence[int]) -> list[str]:
  """Layer paths in the order the network runs them, traced abstractly (no real forward)."""
  order: list[str] = []

  def trace(v, x):
    apply = staged.apply_fn(model)
    order.extend(layers_lib.execution_order(apply, v, x))
    return jnp.zeros(())

  jax.eval_shape(trace, abstract(variables), jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))
  return order


# (id(model), layer, stage, P, B, step, input signature, variables signature) -> fields.
_PROGRAM_CACHE: dict[tuple, tuple[Any, tuple[int, int, int, int]]] = {}


@caches.register
def clear_compiled() -> None:
  """Forgets the stage shapes and memory analyses kept for the last model.

  One of the caches :func:`safer_jax.clear_caches` empties.
  """
  _STAGE_CACHE.clear()
  _PROGRAM_CACHE.clear()


def program_memory(model: Any, variables: Any, input_shape: Sequence[int], layer: str,
                   max_parallel: int, eval_batch_size: int, *, use_prefix: bool = True,
                   copies_per_step: int | None = None,
                   dtype: Any = jnp.float32) -> tuple[int, int, int, int]:
  """XLA's memory analysis of the engine's compiled call for ``layer``.

  Lowers :func:`safer_jax.core.staged.eval_program` with abstract inputs and
  compiles it for the default backend (cached per model and sizes).

  Args:
    model: a staged zoo model or an ``apply_fn``.
    variables: real or abstract (``ShapeDtypeStruct``) variables.
    input_shape: one example's shape, e.g. ``(224, 224, 3)``.
    layer: the perturbed layer path.
    max_parallel: copies per call ``P`` (>= 1).
    eval_batch_size: examples per call ``B`` (>= 1).
    use_prefix: the suffix starts at the layer's stage (else at stage 0).
    copies_per_step: copies evaluated side by side per step (the engine's
      ``copies_per_step``); None: all ``P`` at once (the accelerator default).
    dtype: input dtype.

  Returns:
    ``(arguments, outputs, temps, aliases)`` in bytes.
  """
  _check_sizes(max_parallel, eval_batch_size)
  stage = staged.stage_of(model, layer) if use_prefix else 0
  v = abstract(variables)
  h1 = stage_inputs(model, v, input_shape, dtype)[stage] if stage else \
      jax.ShapeDtypeStruct((1, *input_shape), dtype)
  key = (id(model), layer, stage, max_parallel, eval_batch_size, copies_per_step,
         tuple(input_shape), jnp.dtype(dtype).name, _signature(v))
  if key not in _PROGRAM_CACHE:
    for k in [k for k, (m, _) in _PROGRAM_CACHE.items() if m is not model]:
      del _PROGRAM_CACHE[k]
    kernel = layers_lib.get_kernel(v, layer)
    args = (v, jax.ShapeDtypeStruct((max_parallel, *kernel.shape), kernel.dtype),
            jax.ShapeDtypeStruct((eval_batch_size, *h1.shape[1:]), h1.dtype),
            {"label": jax.ShapeDtypeStruct((eval_batch_size,), jnp.int32)},
            jax.ShapeDtypeStruct((eval_batch_size,), jnp.float32))
    fn = staged.eval_program(model, layer, stage, copies_per_step)
    stats = jax.jit(fn).lower(*args).compile().memory_analysis()
    if stats is None:
      raise ValueError(f"The {jax.default_backend()!r} backend gives no memory analysis; "
                       f"estimate on a backend that does (cpu, gpu, tpu).")
    _PROGRAM_CACHE[key] = (model, (int(stats.argument_size_in_bytes),
                                   int(stats.output_size_in_bytes),
                                   int(stats.temp_size_in_bytes),
                                   int(stats.alias_size_in_bytes)))
  return _PROGRAM_CACHE[key][1]


def resident_bytes(model: Any, variables: Any, input_shape: Sequence[int], layer: str,
                   eval_batch_size: int, *, num_examples: int | None = None,
                   num_copies: int = 0, use_prefix: bool = True,
                   dtype: Any = jnp.float32) -> tuple[int, int]:
  """``(prefix, kernels)``: bytes the engine keeps on the device while ``layer`` is swept.

  Args:
    num_examples: eval examples ``N`` (None: one batch, ``eval_batch_size``).
    num_copies: perturbed copies of the layer (cells of the sweep).
    Others: as :func:`program_memory`.
  """
  stage = staged.stage_of(model, layer) if use_prefix else 0
  prefix = 0
  if stage:
    n = eval_batch_size if num_examples is None else num_examples
    batches = -(-n // eval_batch_size)
    h1 = stage_inputs(model, variables, input_shape, dtype)[stage]
    prefix = batches * eval_batch_size * _nbytes(h1)
  kernels = 2 * num_copies * _nbytes(layers_lib.get_kernel(abstract(variables), layer))
  return prefix, kernels


def memory_breakdown(model: Any, variables: Any, input_shape: Sequence[int], layer: str,
                     max_parallel: int, eval_batch_size: int, *,
                     num_examples: int | None = None, num_copies: int = 0,
                     extra_bytes: int = 0, use_prefix: bool = True,
                     copies_per_step: int | None = None,
                     dtype: Any = jnp.float32) -> MemoryEstimate:
  """:func:`estimate_sweep_memory` part by part (see :class:`MemoryEstimate`)."""
  if num_examples is not None and num_examples < 1:
    raise ValueError(f"num_examples={num_examples} must be >= 1 or None.")
  batch = eval_batch_size if num_examples is None else min(eval_batch_size, num_examples)
  args, outs, temps, aliases = program_memory(
      model, variables, input_shape, layer, max_parallel, batch, use_prefix=use_prefix,
      copies_per_step=copies_per_step, dtype=dtype)
  prefix, kernels = resident_bytes(model, variables, input_shape, layer, batch,
                                   num_examples=num_examples, num_copies=num_copies,
                                   use_prefix=use_prefix, dtype=dtype)
  return MemoryEstimate(layer=layer, max_parallel=max_parallel, eval_batch_size=batch,
                        arguments=args, outputs=outs, temps=temps, aliases=aliases,
                        prefix=prefix, kernels=kernels, extra=int(extra_bytes),
                        backend=jax.default_backend())


def estimate_sweep_memory(model: Any, variables: Any, input_shape: Sequence[int], layer: str,
                          max_parallel: int, eval_batch_size: int, **kwargs) -> int:
  """Estimated device bytes while the sweep evaluates ``layer`` (no safety margin).

  ``arguments + outputs + temps - aliases`` of the compiled call (XLA's memory
  analysis for the default backend: on CPU an estimate of what a GPU needs)
  plus the resident prefix activations and kernel stacks (module docstring).

  Args:
    model: a staged zoo model or an ``apply_fn``.
    variables: real or abstract variables (see :func:`abstract_variables`).
    input_shape: one example's shape, e.g. ``(224, 224, 3)``.
    layer: the perturbed layer path.
    max_parallel: perturbed copies per call ``P``.
    eval_batch_size: examples per call ``B``.
    **kwargs: ``num_examples``, ``num_copies``, ``extra_bytes``, ``use_prefix``,
      ``copies_per_step``, ``dtype`` (see :func:`memory_breakdown`).

  Returns:
    Bytes.
  """
  return memory_breakdown(model, variables, input_shape, layer, max_parallel,
                          eval_batch_size, **kwargs).total


def probe_layers(model: Any, variables: Any, input_shape: Sequence[int],
                 layers: Sequence[str], *, use_prefix: bool = True) -> tuple[str, ...]:
  """The layers whose compiled calls :func:`plan_chunking` measures.

  ``layers`` in network order. The first one (longest suffix: every later
  activation is computed for ``P`` copies), the first one of the stage with the
  largest per-example input (largest ``h`` argument), and the one with the
  largest kernel (largest ``P`` kernels argument); duplicates dropped.
  """
  if not layers:
    raise ValueError("probe_layers needs at least one layer.")
  probes = [layers[0]]
  if use_prefix and getattr(model, "stage_names", None):
    ins = stage_inputs(model, variables, input_shape)
    stage_of = staged.stage_of
    widest = max(layers, key=lambda l: _nbytes(ins[stage_of(model, l)]))
    probes.append(widest)
  v = abstract(variables)
  probes.append(max(layers, key=lambda l: _nbytes(layers_lib.get_kernel(v, l))))
  return tuple(dict.fromkeys(probes))


def largest_fitting(lo: int, hi: int, cost: Callable[[int], int], limit: int) -> int | None:
  """Largest integer ``x`` in ``[lo, hi]`` with ``cost(x) <= limit``; ``cost`` nondecreasing.

  Alternates secant guesses (exact in one step when ``cost`` is affine) with
  bisection, so it needs few evaluations (each one may be an XLA compile).
  None when even ``cost(lo)`` exceeds ``limit``.
  """
  c_hi = cost(hi)
  if c_hi <= limit:
    return hi
  c_lo = cost(lo)
  if c_lo > limit:
    return None
  secant = True
  while hi - lo > 1:  # invariant: cost(lo) <= limit < cost(hi)
    if secant and c_hi > c_lo:
      x = lo + int((limit - c_lo) * (hi - lo) // (c_hi - c_lo))
    else:
      x = (lo + hi) // 2
    x = min(max(x, lo + 1), hi - 1)
    c = cost(x)
    if c <= limit:
      lo, c_lo = x, c
    else:
      hi, c_hi = x, c
    secant = not secant
  return lo


def _check_sizes(max_parallel: int, eval_batch_size: int) -> None:
  if max_parallel < 1:
    raise ValueError(f"max_parallel={max_parallel} must be >= 1.")
  if eval_batch_size < 1:
    raise ValueError(f"eval_batch_size={eval_batch_size} must be >= 1.")


def plan_chunking(model: Any, variables: Any, input_shape: Sequence[int],
                  layers: Sequence[str], budget_bytes: int, *, max_parallel: int,
                  eval_batch_size: int, num_examples: int | None = None,
                  copies: int | Mapping[str, int] = 0, margin: float = 1.25,
                  extra_bytes: int = 0, use_prefix: bool = True,
                  copies_per_step: int | None = None,
                  probes: Sequence[str] | None = None) -> Chunking:
  """The largest ``max_parallel`` (then the largest ``eval_batch_size``) that fits a budget.

  Need at ``(P, B)`` = ``margin *`` the largest compiled-call estimate over the
  probe layers (:func:`probe_layers`) ``+`` the largest resident bytes over all
  ``layers`` ``+ extra_bytes`` (a bound: the two maxima may come from
  different layers). ``B`` stays ``min(eval_batch_size, num_examples)`` unless
  one copy does not fit; then it is the largest halving of it that does. ``P``
  is then the largest integer up to ``min(max_parallel, most copies of a
  layer)`` that fits. Each probe costs an XLA compile (cached).

  Args:
    model, variables, input_shape: as :func:`estimate_sweep_memory`.
    layers: the swept layers, in network order.
    budget_bytes: device bytes the sweep may use (> 0).
    max_parallel: upper bound on ``P``.
    eval_batch_size: upper bound on ``B``.
    num_examples: eval examples (None: one batch).
    copies: perturbed copies per layer (one count for all, or per layer).
    margin: safety factor (>= 1) on the compiled call's estimate.
    extra_bytes: other resident device bytes (e.g. loss gradients).
    use_prefix, copies_per_step: as the sweep engine uses them.
    probes: layers to compile (default :func:`probe_layers`).

  Returns:
    A :class:`Chunking`.

  Raises:
    ValueError: a bad budget, margin or size, or (a
      :class:`~safer_jax.core.errors.ConfigError`) a budget below the need at
      ``P = 1`` and ``B = 1`` (the message states both).
  """
  _check_sizes(max_parallel, eval_batch_size)
  if not budget_bytes or budget_bytes <= 0:
    raise ValueError(f"memory budget {budget_bytes!r} bytes must be a positive integer.")
  if margin < 1:
    raise ValueError(f"memory margin={margin} must be >= 1 (a safety factor on the estimate).")
  if not layers:
    raise ValueError("plan_chunking needs at least one layer.")
  counts = {l: (copies.get(l, 0) if isinstance(copies, Mapping) else int(copies)) for l in layers}
  probes = tuple(probes) if probes else probe_layers(model, variables, input_shape, layers,
                                                     use_prefix=use_prefix)
  b_max = eval_batch_size if num_examples is None else min(eval_batch_size, num_examples)
  p_max = max(1, min(max_parallel, max(counts.values())))

  def resident_parts(b):  # (prefix, kernels) of the layer holding the most
    return max((resident_bytes(model, variables, input_shape, l, b, num_examples=num_examples,
                               num_copies=counts[l], use_prefix=use_prefix) for l in layers),
               key=sum)

  def resident(b):
    return sum(resident_parts(b)) + int(extra_bytes)

  def estimates(p, b):
    return [memory_breakdown(model, variables, input_shape, l, p, b, num_examples=num_examples,
                             use_prefix=use_prefix, copies_per_step=copies_per_step)
            for l in probes]

  def need(p, b):
    return int(math.ceil(margin * max(e.program for e in estimates(p, b)))) + resident(b)

  batches = sorted({-(-b_max // 2**k) for k in range(b_max.bit_length() + 1)})  # ascending
  i = largest_fitting(0, len(batches) - 1, lambda i: need(1, batches[i]), budget_bytes)
  if i is None:
    worst = max(estimates(1, 1), key=lambda e: e.program)
    raise errors.ConfigError(  # the user's budget (memory_budget_gb), not a bug
        f"memory budget {budget_bytes} bytes ({budget_bytes / GB:.2f} GB) is too small: even "
        f"max_parallel=1 and eval_batch_size=1 need {need(1, 1)} bytes "
        f"({need(1, 1) / GB:.2f} GB) = margin {margin} x {worst.program} bytes for one compiled "
        f"call (layer {worst.layer!r}) + {resident(1)} bytes resident (prefix activations of "
        f"{num_examples} examples, perturbed kernels, extra). Allowed: a budget >= that, fewer "
        f"eval examples or use_prefix=False (smaller prefix cache), or fewer copies per layer.")
  batch = batches[i]
  p = largest_fitting(1, p_max, lambda p: need(p, batch), budget_bytes)
  worst = max(estimates(p, batch), key=lambda e: e.program)
  prefix, kernels = resident_parts(batch)
  worst = dataclasses.replace(worst, prefix=prefix, kernels=kernels, extra=int(extra_bytes))
  return Chunking(max_parallel=p, eval_batch_size=batch, needed_bytes=need(p, batch),
                  budget_bytes=int(budget_bytes), margin=margin, worst=worst, probes=probes)
