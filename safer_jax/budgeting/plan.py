"""One call per user task: a model, data and a budget in, a deployable :class:`Plan` out.

:func:`allocate` chooses per-layer bit widths under an average-bits budget
(:class:`BitBudget`) or per-layer pruning ratios under a global sparsity
(:class:`RatioBudget`) from one cost source, optionally improved by a search
over whole models, and returns a :class:`Plan`: the values per layer (named by
their pytree path), what they use of the budget, and how they were found. A
plan applies itself to variables, evaluates, deploys through qwix and saves as
JSON. It is a thin layer over the functions that do the work:

* bits: :func:`safer_jax.budgeting.mixed_precision.cost_tables` ->
  :func:`safer_jax.budgeting.budget.allocate_bits` (exact knapsack; the baselines
  ``source='uniform'`` / ``'random'``: :func:`safer_jax.budgeting.budget.uniform_allocation` /
  :func:`safer_jax.budgeting.budget.random_allocation`) -> optionally
  :func:`safer_jax.budgeting.search.search_allocation`;
  :meth:`Plan.apply` is :func:`safer_jax.budgeting.mixed_precision.quantize_model` and
  :meth:`Plan.to_qwix` :func:`safer_jax.budgeting.deploy.to_qwix_rules`.
* ratios: :func:`safer_jax.budgeting.pruning.cost_tables` ->
  :func:`safer_jax.budgeting.pruning.ratios_for` (the knapsack
  :func:`safer_jax.budgeting.budget.allocate_ratios`, or a fixed rule) -> optionally
  :func:`safer_jax.budgeting.search.search_allocation`; :meth:`Plan.apply` is
  :func:`safer_jax.budgeting.pruning.prune_model`.

A :class:`Planner` holds the model, the calibration examples and every cost
table and search evaluator made so far, so a sweep over budgets and sources
(``experiments/quant_sweep.py``, ``experiments/prune_sweep.py``) computes each
once; :func:`allocate` is one planner's one allocation.

From a model to a deployed allocation, checked on held-out data, in six calls::

  import safer_jax as sj
  ds = sj.load_dataset("digits")                                         # 1
  entry = sj.pretrained("mlp", ds)                                       # 2 (trains once)
  plan = sj.allocate(entry.model, entry.variables, ds,                   # 3: fisher knapsack,
                     sj.BitBudget(avg_bits=4.0), search=16)              # 4: + 16 whole models
  deployed = plan.deploy(entry.model, entry.variables)                   # 5: qwix QtProvider
  print(plan.values, sj.evaluate(deployed, entry.variables, ds))         # 6: eval split

The deployed accuracy is the simulated one, ``plan.evaluate(entry.model, ds,
variables=entry.variables)``; ``plan.to_json()`` saves the plan and
``sj.Plan.from_json(text)`` reads it back.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from safer_jax.budgeting import budget as budget_lib
from safer_jax import criteria
from safer_jax.budgeting import mixed_precision
from safer_jax.budgeting import protection
from safer_jax.budgeting import pruning
from safer_jax.budgeting import search as search_lib
from safer_jax.core import data as data_lib
from safer_jax.core import layers as layers_lib
from safer_jax.core import staged
from safer_jax.core import tasks as tasks_lib
from safer_jax.core import wrapping
from safer_jax.training import train as train_lib

KINDS = ("bits", "ratios", "protect")
BIT_UNITS = ("bits", "bops")  # what BitBudget.avg_bits averages over: weights or MACs
BIT_SOURCES = mixed_precision.COST_SOURCES + ("uniform", "random")  # baselines last
RATIO_SOURCES = pruning.COST_SOURCES + pruning.FIXED_SOURCES
# Criteria registry names (safer_jax.criteria.CRITERIA) -> the cost table built on them.
BIT_ALIASES = {"hawq_v2": "hawq", "corruption_first_order": "corruption"}
DEFAULT_RATIOS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)
CALIB_BATCH = 128  # calibration examples per batch of the cost tables


def _is_number(x: Any) -> bool:
  return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool,
                                                                                     np.bool_))


@dataclasses.dataclass(frozen=True)
class BitBudget:
  """A budget for mixed precision: ``sum_l w_l * b_l <= floor(avg_bits * sum_l w_l)``.

  ``w_l`` weighs layer ``l``: its kernel weights (``unit='bits'``: the model's
  size) or its multiply-accumulates per example (``unit='bops'``: bit
  operations, MACs x weight bits x activation bits, over the activation bits
  every layer shares; :func:`safer_jax.core.layers.macs_per_layer`).

  Attributes:
    avg_bits: average bits per kernel weight (``'bits'``) or weight bits per
      MAC (``'bops'``), in ``[min(candidates), max(candidates)]``.
    candidates: the bit widths a layer may take: distinct ints in 1..16
      (qwix deploys 2..8).
    unit: what the budget counts: ``'bits'`` (kernel bits; scales and biases
      are not counted) or ``'bops'`` (see above).
    tie_groups: groups of layer paths sharing one bit width (e.g. an
      attention's query/key/value, :func:`safer_jax.budgeting.mixed_precision.tie_groups`);
      a layer in one group at most; ``()``: none.
    full_range: how a width quantizes: qwix's full signed grid (codes
      ``-2^(b-1)..2^(b-1)-1``, what qwix deploys) or, False, the restricted one
      (``-(2^(b-1)-1)..``), in the cost tables, the search and :meth:`Plan.apply`.
    group_size: None: one scale per output channel; an int: one per output
      channel and group of that many input rows on Dense (2-D) kernels (qwix's
      ``tile_size``; convolutions stay per channel).

  Raises:
    ValueError: a bad value, naming it and what is allowed.
  """
  avg_bits: float
  candidates: tuple[int, ...] = (2, 3, 4, 5, 6, 8)
  unit: str = "bits"
  tie_groups: tuple[tuple[str, ...], ...] = ()
  full_range: bool = True
  group_size: int | None = None

  def __post_init__(self):
    cands = tuple(self.candidates)
    bad = [b for b in cands if isinstance(b, (bool, np.bool_))
           or not isinstance(b, (int, np.integer)) or not 1 <= b <= 16]
    if not cands or bad or len(set(cands)) != len(cands):
      raise ValueError(f"candidates={self.candidates!r}: bit widths must be distinct integers "
                       f"in 1..16 (at least one)" + (f"; bad: {bad}" if bad else "") + ".")
    cands = tuple(int(b) for b in cands)
    if not (_is_number(self.avg_bits) and min(cands) <= self.avg_bits <= max(cands)):
      raise ValueError(f"avg_bits={self.avg_bits!r} is out of range; allowed: a number in "
                       f"[{min(cands)}, {max(cands)}] (the smallest and largest candidate "
                       f"bit widths {cands}).")
    if self.unit not in BIT_UNITS:
      raise ValueError(f"unit={self.unit!r}; allowed: {list(BIT_UNITS)}.")
    if not isinstance(self.full_range, (bool, np.bool_)):
      raise ValueError(f"full_range={self.full_range!r}; allowed: True or False.")
    if self.group_size is not None and (isinstance(self.group_size, bool) or not isinstance(
        self.group_size, (int, np.integer)) or self.group_size < 1):
      raise ValueError(f"group_size={self.group_size!r}; allowed: None (per output channel) or "
                       f"an integer >= 1 (input rows per scale).")
    object.__setattr__(self, "candidates", cands)
    object.__setattr__(self, "avg_bits", float(self.avg_bits))
    object.__setattr__(self, "tie_groups", _tie_groups(self.tie_groups))
    object.__setattr__(self, "full_range", bool(self.full_range))
    if self.group_size is not None:
      object.__setattr__(self, "group_size", int(self.group_size))


def _tie_groups(groups: Any) -> tuple[tuple[str, ...], ...]:
  """``groups`` as tuples of layer paths (empty groups dropped).

  Raises:
    ValueError: not a sequence of sequences of strings, or a layer in two groups.
  """
  bad = ValueError(f"tie_groups={groups!r}; allowed: groups of layer paths, e.g. "
                   f"(('block1/attn/query', 'block1/attn/key'),), each layer in one group.")
  if isinstance(groups, str) or not isinstance(groups, Sequence):
    raise bad
  out = []
  for group in groups:
    if isinstance(group, str) or not isinstance(group, Sequence) or not all(
        isinstance(n, str) for n in group):
      raise bad
    if group:
      out.append(tuple(group))
  names = [n for g in out for n in g]
  if len(set(names)) != len(names):
    raise bad
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class RatioBudget:
  """A global sparsity target for pruning: at least ``sparsity`` of all kernel weights removed.

  Attributes:
    sparsity: the fraction of all kernel weights to remove, in ``[0, 1)``.
    candidates: the pruning ratios a cost-guided source may give a layer
      (numbers in ``[0, 1]``, distinct); the fixed sources (``uniform``,
      ``erk``, ``global_magnitude``) do not use them.

  Raises:
    ValueError: a bad value, naming it and what is allowed.
  """
  sparsity: float
  candidates: tuple[float, ...] = DEFAULT_RATIOS

  def __post_init__(self):
    cands = tuple(self.candidates)
    bad = [r for r in cands if not (_is_number(r) and 0 <= r <= 1)]
    if not cands or bad or len(set(cands)) != len(cands):
      raise ValueError(f"candidates={self.candidates!r}: pruning ratios must be distinct "
                       f"numbers in [0, 1] (at least one)" + (f"; bad: {bad}" if bad else "") + ".")
    if not (_is_number(self.sparsity) and 0 <= self.sparsity < 1):
      raise ValueError(f"sparsity={self.sparsity!r} is out of range; allowed: a number in "
                       f"[0, 1) (the fraction of kernel weights removed).")
    object.__setattr__(self, "candidates", tuple(float(r) for r in cands))
    object.__setattr__(self, "sparsity", float(self.sparsity))


@dataclasses.dataclass(frozen=True)
class ProtectBudget:
  """Whole layers kept fault-free (ECC, a safe memory), at most ``fraction`` of the kernel weights.

  Attributes:
    fraction: the share of all kernel weights that may be protected, in ``[0, 1]``.
    per_param: rank the layers by score per kernel weight (what a weight of
      protection buys) instead of by score; layers are then taken greedily in
      that order while they fit (:func:`safer_jax.budgeting.protection.select_protected`).

  Raises:
    ValueError: a bad value, naming it and what is allowed.
  """
  fraction: float
  per_param: bool = True

  def __post_init__(self):
    if not (_is_number(self.fraction) and 0 <= self.fraction <= 1):
      raise ValueError(f"fraction={self.fraction!r} is out of range; allowed: a number in [0, 1] "
                       f"(the share of kernel weights protected).")
    if not isinstance(self.per_param, (bool, np.bool_)):
      raise ValueError(f"per_param={self.per_param!r}; allowed: True or False.")
    object.__setattr__(self, "fraction", float(self.fraction))
    object.__setattr__(self, "per_param", bool(self.per_param))


Budget = BitBudget | RatioBudget | ProtectBudget


@dataclasses.dataclass(frozen=True)
class Plan:
  """Per-layer bit widths or pruning ratios, what they use of the budget and where they came from.

  Attributes:
    kind: ``'bits'`` (mixed precision), ``'ratios'`` (pruning) or ``'protect'``
      (layers kept fault-free against bit flips).
    values: ``{layer path: bit width (int)}`` or ``{layer path: pruning ratio
      (float, fraction of the kernel's weights removed)}``, in the model's layer
      order, or ``{layer path: protected (bool)}``. Bits: every layer with a
      ``kernel`` (embedding tables stay float, as qwix leaves them); ratios and
      protect: every layer.
    resource: what the values use of the budget: bits: kernel bits,
      ``sum_l n_l * bits_l`` (``budget.Allocation.total_bits``); ratios: kept
      kernel weights, ``sum_l n_l - prune_count(ratio_l, n_l)``; protect:
      protected kernel weights.
    capacity: the budget in the same unit (``resource <= capacity``): bits:
      ``floor(avg_bits * sum_l n_l)``; ratios: ``N - prune_count(sparsity,
      N)``, ``N`` all kernel weights. Fixed pruning rules (``uniform``,
      ``erk``) floor per layer and may keep up to one weight per layer more.
      Protect: ``floor(fraction * N)``.
    budget: the :class:`BitBudget`, :class:`RatioBudget` or
      :class:`ProtectBudget` asked for.
    source: the cost source (a name of :data:`BIT_SOURCES` or
      :data:`RATIO_SOURCES`; registry aliases resolved, e.g. ``'hawq'``), a
      tuple of them (a search's starts), or for protect the criterion (a
      :data:`safer_jax.criteria.CRITERIA` name).
    search: None, or what the search did (JSON-ready): ``evaluations``,
      ``seconds``, ``converged``, ``start`` (the start it descends from),
      ``calib_accuracy`` / ``calib_loss`` (of the result on the search's
      examples), ``z``, ``kept_start``, ``starts`` (``{name: {accuracy,
      loss}}``), ``skipped_starts`` (sources whose values were over the budget),
      ``recalibrate_bn`` and ``calib_examples`` (the search's examples).
    method: how the values were found: ``'dp'`` / ``'ilp'`` (the exact bits
      knapsack), ``'knapsack'`` (ratios), ``'uniform'``, ``'random'``, a fixed
      pruning rule (``'erk'``, ``'global_magnitude'``), ``'search'`` or
      ``'greedy'`` (protect).
  """
  kind: str
  values: dict
  resource: int
  capacity: int
  budget: Budget
  source: str | tuple[str, ...]
  search: dict | None = None
  method: str = ""

  def _require(self, kind: str, what: str, why: str) -> None:
    """Raises ValueError naming ``what`` unless this is a ``kind`` plan."""
    if self.kind != kind:
      raise ValueError(f"{what} needs a {kind} plan ({why}); this plan holds kind={self.kind!r}.")

  @property
  def protected(self) -> list[str]:
    """A protect plan's protected layers, in layer order."""
    self._require("protect", "protected", "layers kept fault-free")
    return [n for n, p in self.values.items() if p]

  def apply(self, variables: Any) -> dict:
    """``variables`` with each listed layer's kernel quantized (bits) or pruned (ratios).

    Bits: :func:`safer_jax.budgeting.mixed_precision.quantize_model` on the budget's grid
    (per output channel and qwix's full grid by default: what :meth:`deploy` runs); ratios:
    :func:`safer_jax.budgeting.pruning.prune_model` (unstructured magnitude). Other
    leaves are unchanged; an ``nnx.State`` gives its pure dict.
    """
    if self.kind == "protect":
      raise ValueError("apply() of a protect plan: protection changes no weight; plan.evaluate("
                       "model, data, rate=...) measures it under random bit flips, "
                       "safer_jax.budgeting.protection.inject(variables, names, mask, rate, key) "
                       "injects them.")
    if self.kind == "bits":
      return mixed_precision.quantize_model(variables, self.values,
                                            full_range=self.budget.full_range,
                                            group_size=self.budget.group_size)
    return pruning.prune_model(variables, self.values)

  def evaluate(self, model: Any, data: data_lib.Split | data_lib.Dataset, task: Any = None, *,
               variables: Any = None, rate: float = 1e-3, seeds: int = 20,
               representation: str = "int8") -> dict[str, float]:
    """:func:`safer_jax.evaluate` of the model with the plan applied (simulated, no qwix).

    A protect plan is measured under random bit flips instead: every
    unprotected kernel stored as ``representation`` with each bit flipped with
    probability ``rate``, the protected ones fault-free, over ``seeds`` fault
    patterns (``jax.random.key(0 .. seeds-1)``; classification only).

    Args:
      model: the model the plan was made for (linen, nnx, wrapped or zoo).
      data: a Split, or a Dataset (its eval split).
      task: what to measure (:mod:`safer_jax.core.tasks`; None: classification).
      variables: the model's float variables (None for a wrapped or nnx model).
      rate, seeds, representation: protect plans only (see above).

    Returns:
      e.g. ``{'accuracy', 'loss', 'num_examples'}``; protect: the mean and
      standard deviation over the fault patterns (``accuracy_std``, ``loss_std``).
    """
    model, variables = wrapping.as_model(model, variables)
    if self.kind != "protect":
      return train_lib.evaluate(model, self.apply(variables), data, task=task)
    task_name = tasks_lib.get(task).name
    if task_name != "classification":
      raise ValueError(f"evaluate() of a protect plan measures classification under bit flips; "
                       f"task {task_name!r} is not supported.")
    if isinstance(seeds, bool) or not isinstance(seeds, (int, np.integer)) or seeds < 1:
      raise ValueError(f"seeds={seeds!r}; allowed: an integer >= 1 (fault patterns).")
    if not (_is_number(rate) and 0 <= rate <= 1):
      raise ValueError(f"rate={rate!r}; allowed: a bit-flip probability in [0, 1].")
    split = data.eval if isinstance(data, data_lib.Dataset) else data
    names = list(self.values)
    evaluator = protection.make_evaluator(model, variables, names, split, representation,
                                          chunk=min(int(seeds), 8))
    keys = jax.vmap(jax.random.key)(np.arange(int(seeds)))
    acc, loss = evaluator(keys, float(rate), np.array([self.values[n] for n in names], bool))
    return {"accuracy": float(np.mean(acc)), "accuracy_std": float(np.std(acc)),
            "loss": float(np.mean(loss)), "loss_std": float(np.std(loss)),
            "num_examples": len(split), "seeds": int(seeds), "rate": float(rate)}

  def to_qwix(self, variables: Any = None) -> list:
    """One ``qwix.QtRule`` per layer (:func:`safer_jax.budgeting.deploy.to_qwix_rules`, with
    the budget's ``group_size``); bits plans only.

    ``variables``: checks every layer is one qwix quantizes (needed with a
    ``group_size``). qwix deploys its full grid (a ``full_range=False`` plan's
    deployment differs from :meth:`apply`).
    :func:`safer_jax.budgeting.deploy.from_qwix_rules` reads them back.

    Raises:
      ValueError: not a bits plan (qwix deploys bit widths; prune with :meth:`apply`).
    """
    self._require("bits", "to_qwix()", "qwix deploys bit widths; plan.apply(variables) gives "
                  "pruned variables")
    from safer_jax.budgeting import deploy  # pylint: disable=import-outside-toplevel  # qwix: ~1 s
    return deploy.to_qwix_rules(self.values, variables=variables,
                                group_size=self.budget.group_size)

  def deploy(self, model: Any, variables: Any = None) -> Any:
    """``apply(variables, inputs)`` of ``model`` quantized by qwix with :meth:`to_qwix`'s rules.

    :func:`safer_jax.budgeting.deploy.quantized_apply` (jitted; pass the *float*
    variables: qwix quantizes them). ``variables`` only check the layers.

    Raises:
      ValueError: a ratios plan, or a model qwix cannot quantize.
    """
    from safer_jax.budgeting import deploy  # pylint: disable=import-outside-toplevel
    return deploy.quantized_apply(model, self.to_qwix(variables))

  def verify(self, model: Any, variables: Any, *example_inputs: Any, **kwargs: Any) -> Any:
    """Whether qwix deploys this plan as simulated, layer by layer and all together.

    :func:`safer_jax.budgeting.deploy.verify` of :attr:`values`: prints as a table, ``.ok``
    is True when every layer's deployed output matches the simulation.

    Args:
      model: the model (linen with ``variables``, nnx or wrapped).
      variables: its float variables (None for a wrapped or nnx model).
      *example_inputs: one batch of inputs (e.g. a few images; ids and a mask).
      **kwargs: :func:`safer_jax.budgeting.deploy.verify`'s options (``atol``, ``axes``, ...;
        ``group_size``: the budget's).

    Raises:
      ValueError: not a bits plan.
    """
    self._require("bits", "verify()", "qwix deploys bit widths")
    from safer_jax.budgeting import deploy  # pylint: disable=import-outside-toplevel
    kwargs.setdefault("group_size", self.budget.group_size)
    return deploy.verify(model, variables, self.values, *example_inputs, **kwargs)

  def to_json(self) -> str:
    """The plan as JSON text (:meth:`from_json` reads it back)."""
    return json.dumps({"kind": self.kind, "values": self.values, "resource": self.resource,
                       "capacity": self.capacity, "source": self.source,
                       "budget": {"type": type(self.budget).__name__,
                                  **dataclasses.asdict(self.budget)},
                       "search": self.search, "method": self.method})

  @classmethod
  def from_json(cls, text: str) -> "Plan":
    """The plan :meth:`to_json` wrote.

    Raises:
      ValueError: not a plan's JSON (the bad field is named).
    """
    d = json.loads(text)
    budgets = {"BitBudget": BitBudget, "RatioBudget": RatioBudget, "ProtectBudget": ProtectBudget}
    if not isinstance(d, dict) or d.get("kind") not in KINDS:
      raise ValueError(f"Not a plan: kind={d.get('kind') if isinstance(d, dict) else d!r}; "
                       f"allowed: {list(KINDS)}.")
    spec = dict(d.get("budget") or {})
    kind = spec.pop("type", None)
    if kind not in budgets:
      raise ValueError(f"Not a plan: budget type {kind!r}; allowed: {list(budgets)}.")
    if "candidates" in spec:
      spec["candidates"] = tuple(spec["candidates"])
    cast = {"bits": int, "ratios": float, "protect": bool}[d["kind"]]
    source = d["source"] if isinstance(d["source"], str) else tuple(d["source"])
    return cls(kind=d["kind"], values={k: cast(v) for k, v in d["values"].items()},
               resource=int(d["resource"]), capacity=int(d["capacity"]),
               budget=budgets[kind](**spec), source=source, search=d.get("search"),
               method=d.get("method", ""))


def resolve_source(kind: str, source: str) -> str:
  """The cost source ``source`` names for a ``kind`` plan (registry names mapped).

  Bits: :data:`BIT_SOURCES`, or a criteria registry name of one
  (:data:`BIT_ALIASES`: ``hawq_v2`` -> ``hawq``, ``corruption_first_order`` ->
  ``corruption``; ``fisher``, ``integrated_gradients``, ``quant_error`` are
  the same in both). Ratios: :data:`RATIO_SOURCES`.

  Raises:
    ValueError: an unknown source (the allowed ones are listed).
  """
  if kind == "bits":
    name = BIT_ALIASES.get(source, source)
    if name not in BIT_SOURCES:
      raise ValueError(f"Unknown source {source!r} for bit widths; allowed: {list(BIT_SOURCES)} "
                       f"(or the registry names {list(BIT_ALIASES)}).")
    return name
  if source not in RATIO_SOURCES:
    raise ValueError(f"Unknown source {source!r} for pruning ratios; allowed: "
                     f"{list(RATIO_SOURCES)}.")
  return source


def _count(name: str, value: Any, low: int, what: str) -> int:
  """``value`` as an int ``>= low``.

  Raises:
    ValueError: naming ``name`` and what it counts (``what``).
  """
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
    raise ValueError(f"{name}={value!r}; allowed: an integer >= {low} ({what}).")
  return int(value)


def calibration_split(data: data_lib.Split | data_lib.Dataset, examples: int) -> data_lib.Split:
  """The first ``examples`` calibration examples: a Split's, or a Dataset's *train* split's."""
  examples = _count("calib_examples", examples, 1, "calibration examples")
  split = data.train if isinstance(data, data_lib.Dataset) else data
  if not isinstance(split, data_lib.Split):
    raise ValueError(f"data must be a safer_jax Split or Dataset; got a {type(data).__name__}.")
  return split.take(min(examples, len(split)))


def budget_kind(budget: Any) -> str:
  """``'bits'``, ``'ratios'`` or ``'protect'``: what ``budget`` allocates.

  Raises:
    ValueError: not a :class:`BitBudget`, :class:`RatioBudget` or :class:`ProtectBudget`.
  """
  for kind, cls in zip(KINDS, (BitBudget, RatioBudget, ProtectBudget)):
    if isinstance(budget, cls):
      return kind
  raise ValueError(f"budget must be a BitBudget, a RatioBudget or a ProtectBudget; got "
                   f"{budget!r}.")


def resolve_sources(kind: str, source: str | Sequence[str], evaluations: int) -> tuple[str, ...]:
  """The cost sources ``source`` names (:func:`resolve_source` of each, duplicates dropped).

  Raises:
    ValueError: no name, a name that is not a string, an unknown source, or
      several sources without a search (only a search starts from several).
  """
  names = (source,) if isinstance(source, str) else source
  if not isinstance(names, Sequence) or not names or not all(isinstance(s, str) for s in names):
    raise ValueError(f"source={source!r}; allowed: a source name, or with search > 0 a "
                     f"sequence of them (the search's starts).")
  if len(set(names)) > 1 and not evaluations:
    raise ValueError(f"source={source!r} names several sources, which only a search starts "
                     f"from; allowed: one name, or search > 0.")
  return tuple(dict.fromkeys(resolve_source(kind, s) for s in names))


def quantized_layers(variables: Any) -> list[str]:
  """The layers a bits plan gives a width, in layer order: those with a ``kernel`` leaf
  (embedding tables stay float, as qwix leaves them)."""
  return [n for n in layers_lib.find_layers(variables)
          if layers_lib.kernel_leaf(variables, n) == layers_lib.KERNEL]


def _allocate_protection(model, variables, calib, budget: ProtectBudget, source: str,
                         evaluations: int, task, seed: int) -> Plan:
  if evaluations:
    raise ValueError(f"search={evaluations}: protection plans are not searched; allowed: search=0.")
  if not isinstance(source, str) or source not in criteria.CRITERIA:
    raise ValueError(f"Unknown source {source!r} for protection; allowed: a criterion "
                     f"{sorted(criteria.CRITERIA)}.")
  names = layers_lib.find_layers(variables)
  sizes = {n: int(np.size(layers_lib.get_kernel(variables, n))) for n in names}
  scores, _ = criteria.compute_all(
      [source], train_lib.task_loss_fn(model, variables, task), variables["params"],
      calib.batches(CALIB_BATCH), key=jax.random.key(seed),
      layers=[re.escape(n) for n in names])
  score = {n: float(scores[source][n]) / (sizes[n] if budget.per_param else 1) for n in names}
  chosen = set(protection.select_protected(score, sizes, budget.fraction))
  return Plan(kind="protect", values={n: n in chosen for n in names},
              resource=sum(sizes[n] for n in chosen),
              capacity=int(math.floor(budget.fraction * sum(sizes.values()))), budget=budget,
              source=source, search=None, method="greedy")


def _search_record(found: search_lib.AllocationSearch, examples: int) -> dict:
  """The JSON-ready record of :attr:`Plan.search` (NaN z as None)."""
  r = found.result
  return {"evaluations": r.evaluations, "seconds": r.seconds, "converged": r.converged,
          "start": r.start, "calib_accuracy": r.accuracy, "calib_loss": r.loss,
          "z": None if math.isnan(r.z) else r.z, "kept_start": r.kept_start,
          "starts": {k: {"accuracy": a, "loss": l} for k, (a, l) in r.starts.items()},
          "calib_examples": examples}


@dataclasses.dataclass(frozen=True)
class _Problem:
  """One budget on one model: the layers given a value, what a value uses, the capacity.

  ``use(layer, value)``: the resource, in the budget's unit (bits: ``w_l *
  bits``; ratios: the kernel weights kept); ``ties``: the budget's tie groups
  (None: none).
  """
  names: list[str]
  weights: dict[str, int]
  capacity: int
  use: Callable[[str, Any], int]
  ties: list[list[str]] | None = None

  def resource(self, values: Mapping[str, Any]) -> int:
    return sum(self.use(n, v) for n, v in values.items())


class Planner:
  """Plans for one model on one calibration split, for many budgets.

  Each cost table (per kind, source, candidates and quantization grid) and
  each search evaluator is made once and reused: a sweep over budgets and
  sources holds one planner. ``sj.allocate(model, variables, data, budget,
  ...)`` is ``sj.Planner(model, variables, data, ...).allocate(budget, ...)``::

    planner = sj.Planner(entry.model, entry.variables, ds)
    plans = {b: planner.allocate(sj.BitBudget(b)) for b in (3.0, 4.0, 6.0)}  # one fisher table

  Args:
    model: a zoo, linen, nnx or :func:`safer_jax.wrap`-ped model.
    variables: its variables (None for a wrapped or nnx model).
    data: calibration data: a Split, or a Dataset (its *train* split; never
      calibrate on the data you report on).
    task: the loss the tables and the search measure (:mod:`safer_jax.core.tasks`;
      None: classification). Pruning's ``oracle`` / ``fisher`` tables are
      classification only.
    calib_examples: the first examples of ``data`` the cost tables use (whole
      batches of ``batch_size`` of them, or all when fewer).
    search_examples: the first examples of ``data`` a search scores whole
      models on (None: the calibration examples).
    batch_size: calibration examples per batch of the cost tables.
    seed: Hutchinson probes (``hawq``); the search's proposal order and the
      ``random`` baseline unless :meth:`allocate` is given a seed.
    search_batch: candidate allocations proposed per batched evaluation of a search.
    search_model: the model a search scores whole allocations with, when not
      ``model`` (e.g. one with quantized activations, whose tables would need
      gradients through rounding); it takes ``model``'s variables.
    progress: show the cost tables' and the searches' progress on stderr.

  Attributes:
    model, variables: as :func:`safer_jax.core.wrapping.as_model` gives them.
    calib: the calibration Split; ``search_split``: the search's.
    seconds: ``{source: wall time (s)}`` of the cost tables computed so far.
  """

  def __init__(self, model: Any, variables: Any, data: data_lib.Split | data_lib.Dataset, *,
               task: Any = None, calib_examples: int = 256, search_examples: int | None = None,
               batch_size: int = CALIB_BATCH, seed: int = 0, search_batch: int = 32,
               search_model: Any = None, progress: bool = False):
    self.calib = calibration_split(data, calib_examples)
    self.search_split = (self.calib if search_examples is None
                         else calibration_split(data, search_examples))
    self.model, self.variables = wrapping.as_model(model, variables)
    self.search_model = self.model if search_model is None else search_model
    self.task = task
    self.batch_size = _count("batch_size", batch_size, 1, "calibration examples per batch")
    self.seed = _count("seed", seed, 0, "random numbers")
    self.search_batch = _count("search_batch", search_batch, 1, "candidates per evaluation")
    self.progress = bool(progress)
    self.seconds: dict[str, float] = {}
    self.kernels = {n: np.asarray(layers_lib.get_kernel(self.variables, n))
                    for n in layers_lib.find_layers(self.variables)}
    self._tables: dict[tuple, dict] = {}
    self._evaluators: dict[tuple, search_lib.AllocationEvaluator] = {}
    self._macs: dict[str, int] | None = None

  @property
  def macs(self) -> dict[str, int]:
    """``{layer: multiply-accumulates per example}``
    (:func:`safer_jax.core.layers.macs_per_layer` on the first calibration example)."""
    if self._macs is None:
      apply = getattr(self.model, "apply", self.model)
      self._macs = layers_lib.macs_per_layer(apply, self.variables,
                                             staged.split_inputs(self.calib, self.task))
    return self._macs

  def cost_tables(self, budget: BitBudget | RatioBudget,
                  sources: Sequence[str]) -> dict[str, dict[str, dict]]:
    """``{source: {layer: {value: cost}}}`` of the cost-guided ``sources`` for ``budget``.

    The tables of ``budget``'s kind, candidates (and bits: grid) on the
    calibration examples; those not computed yet are computed together
    (:func:`safer_jax.budgeting.mixed_precision.cost_tables` or
    :func:`safer_jax.budgeting.pruning.cost_tables`), the others reused. Sources
    without a table (``uniform``, ``random``, fixed pruning rules) are skipped.

    Raises:
      ValueError: a protect budget, or an unknown source.
    """
    kind = budget_kind(budget)
    if kind == "protect":
      raise ValueError("cost_tables() of a ProtectBudget: protection scores layers with a "
                       "criterion; allowed: a BitBudget or a RatioBudget.")
    tabled = mixed_precision.COST_SOURCES if kind == "bits" else pruning.COST_SOURCES
    wanted = [s for s in dict.fromkeys(resolve_source(kind, s) for s in sources) if s in tabled]
    grid = (budget.full_range, budget.group_size) if kind == "bits" else ()
    cache = self._tables.setdefault((kind, budget.candidates, *grid), {})
    missing = [s for s in wanted if s not in cache]
    if missing:
      tables, seconds = (self._bit_tables if kind == "bits" else self._ratio_tables)(budget,
                                                                                    missing)
      cache.update(tables)
      for s, t in seconds.items():
        self.seconds[s] = self.seconds.get(s, 0.0) + t
    return {s: cache[s] for s in wanted}

  def _bit_tables(self, budget: BitBudget, sources: list[str]) -> tuple[dict, dict]:
    names = quantized_layers(self.variables)
    return mixed_precision.cost_tables(
        self.model, self.variables, self.calib, budget.candidates, tuple(sources),
        batch_size=self.batch_size, max_batches=None, seed=self.seed,
        full_range=budget.full_range, group_size=budget.group_size, progress=self.progress,
        task=self.task, layers=[re.escape(n) for n in names])

  def _ratio_tables(self, budget: RatioBudget, sources: list[str]) -> tuple[dict, dict]:
    task = tasks_lib.get(self.task).name
    measured = [s for s in sources if s in ("oracle", "fisher")]
    if measured and task != "classification":
      raise ValueError(f"source={measured[0]!r} for pruning ratios measures classification's "
                       f"loss only; task {task!r} needs a data-free or fixed source: "
                       f"{['magnitude', *pruning.FIXED_SOURCES]}.")
    return pruning.cost_tables(self.model, self.variables, self.calib, budget.candidates,
                               tuple(sources), names=list(self.kernels),
                               batch_size=self.batch_size, progress=self.progress)

  def _problem(self, budget: BitBudget | RatioBudget) -> _Problem:
    """The layers, resource and capacity of ``budget`` on this model.

    Raises:
      ValueError: no layer to quantize, or tie groups naming other layers.
    """
    if isinstance(budget, RatioBudget):
      sizes = {n: int(w.size) for n, w in self.kernels.items()}
      total = sum(sizes.values())
      return _Problem(names=list(sizes), weights=sizes,
                      capacity=total - budget_lib.prune_count(budget.sparsity, total),
                      use=lambda n, r: sizes[n] - budget_lib.prune_count(r, sizes[n]))
    names = quantized_layers(self.variables)
    if not names:
      raise ValueError("The model has no layer with a kernel to quantize.")
    unknown = [n for g in budget.tie_groups for n in g if n not in names]
    if unknown:
      raise ValueError(f"tie_groups name {unknown}, which are not layers with a kernel; "
                       f"allowed: {names}.")
    per = self.macs if budget.unit == "bops" else {n: self.kernels[n].size for n in names}
    weights = {n: int(per[n]) for n in names}
    return _Problem(names=names, weights=weights,
                    capacity=budget_lib.budget_from_avg_bits(weights, budget.avg_bits),
                    use=lambda n, b: weights[n] * b,
                    ties=[list(g) for g in budget.tie_groups] or None)

  def _solve(self, problem: _Problem, budget: BitBudget | RatioBudget, source: str,
             seed: int) -> tuple[dict, str]:
    """``(values, method)`` of one source: its knapsack solution or its fixed rule."""
    tables = self.cost_tables(budget, (source,))
    if isinstance(budget, RatioBudget):
      ratios = pruning.ratios_for(source, budget.sparsity, self.kernels, tables,
                                  budget.candidates)
      method = source if source in pruning.FIXED_SOURCES else "knapsack"
      return {n: float(ratios[n]) for n in problem.names}, method
    cands, cap = budget.candidates, problem.capacity
    if source == "uniform":
      alloc = budget_lib.uniform_allocation(problem.weights, cands, cap)
    elif source == "random":
      alloc = budget_lib.random_allocation(problem.weights, cands, cap, seed,
                                           tie_groups=problem.ties)
    else:
      alloc = budget_lib.allocate_bits(tables[source], problem.weights, cands, cap,
                                       tie_groups=problem.ties)
    return {n: int(alloc.bits[n]) for n in problem.names}, alloc.method

  def _evaluator(self, budget: BitBudget | RatioBudget, names: list[str],
                 starts: Mapping[str, Mapping[str, Any]],
                 recalibrate_bn: bool) -> search_lib.AllocationEvaluator:
    """The search's evaluator (made once per option set): bits: the candidate widths on the
    budget's grid; ratios: the candidate ratios and every start's."""
    if isinstance(budget, BitBudget):
      key = ("bits", budget.candidates, budget.full_range, budget.group_size)
    else:
      key = ("ratios",) + tuple(tuple(sorted(set(budget.candidates) | {s[n] for s in
                                                                       starts.values()}))
                                for n in names)
    key += (recalibrate_bn,)
    if key not in self._evaluators:
      if isinstance(budget, BitBudget):
        options = search_lib.quantized_options(self.variables, names, budget.candidates,
                                               full_range=budget.full_range,
                                               group_size=budget.group_size)
      else:
        options = search_lib.pruned_options(self.variables, dict(zip(names, key[1:-1])))
      transform = None
      if recalibrate_bn:
        if "batch_stats" not in self.variables:
          raise ValueError("recalibrate_bn=True: the model has no BatchNorm statistics "
                           "('batch_stats'); allowed: recalibrate_bn=False.")
        images = self.calib.images
        transform = lambda v: train_lib.recalibrate_bn(self.model, v, images)
      self._evaluators[key] = search_lib.AllocationEvaluator(
          self.search_model, self.variables, self.search_split, options, task=self.task,
          transform=transform)
    return self._evaluators[key]

  def _search(self, problem: _Problem, budget: BitBudget | RatioBudget,
              starts: dict[str, dict], evaluations: int, seed: int,
              recalibrate_bn: bool) -> tuple[dict, dict]:
    """``(values, record)``: :func:`safer_jax.budgeting.search.search_allocation` from the
    starts within the budget.

    Raises:
      ValueError: no start within the budget (fixed pruning rules floor per layer).
    """
    fits = {s: v for s, v in starts.items() if problem.resource(v) <= problem.capacity}
    if not fits:
      used = {s: problem.resource(v) for s, v in starts.items()}
      what = (f"source {next(iter(used))!r}'s ratios, which keep {next(iter(used.values()))}"
              if len(used) == 1 else f"sources {list(used)}, whose ratios keep {used}")
      raise ValueError(f"search={evaluations} starts from {what} weights, over the budget's "
                       f"{problem.capacity} (per-layer flooring); allowed: a cost-guided source "
                       f"{list(pruning.COST_SOURCES)} or 'global_magnitude', or search=0.")
    evaluator = self._evaluator(budget, problem.names, starts, recalibrate_bn)
    found = search_lib.search_allocation(
        evaluator, {n: {v: problem.use(n, v) for v in evaluator.values[n]}
                    for n in problem.names},
        problem.capacity, fits, tie_groups=problem.ties, evaluations=evaluations,
        batch=self.search_batch, seed=seed, progress=self.progress)
    cast = int if isinstance(budget, BitBudget) else float
    record = {**_search_record(found, len(self.search_split)),
              "skipped_starts": sorted(set(starts) - set(fits)), "recalibrate_bn": recalibrate_bn}
    return {n: cast(found.allocation[n]) for n in problem.names}, record

  def allocate(self, budget: Budget, *, source: str | Sequence[str] = "fisher",
               search: int = 0, seed: int | None = None, recalibrate_bn: bool = False) -> Plan:
    """Per-layer bit widths, pruning ratios or protected layers, under ``budget``.

    See :func:`allocate`. A search (``search > 0``) starts from each source's
    values (several sources: several starts; those over the budget are skipped
    and listed in ``plan.search['skipped_starts']``).

    Args:
      budget: a :class:`BitBudget`, :class:`RatioBudget` or :class:`ProtectBudget`.
      source: a source name (:data:`BIT_SOURCES`, :data:`RATIO_SOURCES`, or a
        criterion for protection), or with ``search > 0`` a sequence of them.
      search: whole-model evaluations of the search (0: none).
      seed: the ``random`` baseline's draws and the search's proposal order
        (None: the planner's seed).
      recalibrate_bn: the search scores each candidate after re-estimating its
        BatchNorm statistics on the calibration examples.

    Returns:
      A :class:`Plan`.

    Raises:
      ValueError: an unknown source or budget type, ``search`` or ``seed`` out
        of range, several sources without a search, or a budget the
        candidates cannot meet.
    """
    kind = budget_kind(budget)
    evaluations = _count("search", search, 0, "whole-model evaluations")
    seed = self.seed if seed is None else _count("seed", seed, 0, "random numbers")
    if kind == "protect":
      return _allocate_protection(self.model, self.variables, self.calib, budget, source,
                                  evaluations, self.task, seed)
    names = resolve_sources(kind, source, evaluations)
    problem = self._problem(budget)
    solved = {s: self._solve(problem, budget, s, seed) for s in names}
    values, method = solved[names[0]]
    record = None
    if evaluations:
      starts = {s: v for s, (v, _) in solved.items()}
      values, record = self._search(problem, budget, starts, evaluations, seed,
                                    bool(recalibrate_bn))
      method = "search"
    return Plan(kind=kind, values=values, resource=problem.resource(values),
                capacity=problem.capacity, budget=budget,
                source=names[0] if isinstance(source, str) else names, search=record,
                method=method)


def allocate(model: Any, variables: Any, data: data_lib.Split | data_lib.Dataset,
             budget: Budget, *, source: str | Sequence[str] = "fisher", search: int = 0,
             task: Any = None, calib_examples: int = 256, seed: int = 0) -> Plan:
  """Per-layer bit widths, pruning ratios or protected layers, under a budget.

  ``Planner(model, variables, data, task=task, calib_examples=calib_examples,
  seed=seed).allocate(budget, source=source, search=search)``: for several
  budgets, hold one :class:`Planner` (its cost tables are computed once).

  :class:`BitBudget`, :class:`RatioBudget` and :class:`ProtectBudget`
  respectively. Protection: each layer scored by the criterion ``source``
  (per kernel weight by default) on the calibration examples, layers taken
  greedily in score order while they fit.

  The cost table of ``source`` on the calibration examples, solved exactly
  under the budget (multiple-choice knapsack, :mod:`safer_jax.budgeting.budget`); with
  ``search=N``, :func:`safer_jax.budgeting.search.search_allocation` then measures up to
  ``N`` whole models on the same calibration examples, starting from that
  solution, and keeps a better one only when its improvement is significant.

  Args:
    model: a zoo, linen, nnx or :func:`safer_jax.wrap`-ped model.
    variables: its variables (None for a wrapped or nnx model).
    data: calibration data: a Split, or a Dataset (its *train* split; never
      calibrate on the data you report on).
    budget: :class:`BitBudget` (mixed precision), :class:`RatioBudget`
      (pruning) or :class:`ProtectBudget`.
    source: bits: a name of :data:`BIT_SOURCES` or a criteria registry name
      (``hawq_v2``, ``corruption_first_order``; see :func:`resolve_source`);
      ratios: a name of :data:`RATIO_SOURCES`; with ``search > 0``, a sequence
      of names: the search starts from each.
    search: whole-model evaluations of the search (0: none; the knapsack
      solution is evaluated too).
    task: the loss the tables and the search measure (:mod:`safer_jax.core.tasks`;
      None: classification). Pruning's ``oracle`` / ``fisher`` tables are
      classification only.
    calib_examples: the first examples of ``data`` used (the tables use
      whole batches of 128 of them, or all when fewer).
    seed: Hutchinson probes (``hawq``), the ``random`` baseline and the
      search's proposal order.

  Returns:
    A :class:`Plan`.

  Raises:
    ValueError: an unknown source or budget type, ``search`` or
      ``calib_examples`` out of range, or a budget the candidates cannot meet.
  """
  planner = Planner(model, variables, data, task=task, calib_examples=calib_examples, seed=seed)
  return planner.allocate(budget, source=source, search=search)


__all__ = ["BitBudget", "RatioBudget", "ProtectBudget", "Plan", "Planner", "allocate",
           "budget_kind", "quantized_layers", "resolve_source", "resolve_sources",
           "calibration_split", "BIT_SOURCES", "RATIO_SOURCES", "BIT_ALIASES", "DEFAULT_RATIOS"]
