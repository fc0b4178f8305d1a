"""One call per user task: a model, data and a budget in, a deployable :class:`Plan` out.

:func:`allocate` chooses per-layer bit widths under an average-bits budget
(:class:`BitBudget`) or per-layer pruning ratios under a global sparsity
(:class:`RatioBudget`) from one cost source, optionally improved by a search
over whole models, and returns a :class:`Plan`: the values per layer (named by
their pytree path), what they use of the budget, and how they were found. A
plan applies itself to variables, evaluates, deploys through qwix and saves as
JSON. It is a thin layer over the functions that do the work:

* bits: :func:`safer_jax.budgeting.mixed_precision.cost_tables` ->
  :func:`safer_jax.budgeting.budget.allocate_bits` (exact knapsack; ``source='uniform'``:
  :func:`safer_jax.budgeting.budget.uniform_allocation`) -> optionally
  :func:`safer_jax.budgeting.search.search_allocation`;
  :meth:`Plan.apply` is :func:`safer_jax.budgeting.mixed_precision.quantize_model` and
  :meth:`Plan.to_qwix` :func:`safer_jax.budgeting.deploy.to_qwix_rules`.
* ratios: :func:`safer_jax.budgeting.pruning.cost_tables` ->
  :func:`safer_jax.budgeting.pruning.ratios_for` (the knapsack
  :func:`safer_jax.budgeting.budget.allocate_ratios`, or a fixed rule) -> optionally
  :func:`safer_jax.budgeting.search.search_allocation`; :meth:`Plan.apply` is
  :func:`safer_jax.budgeting.pruning.prune_model`.

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
from collections.abc import Mapping, Sequence
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
from safer_jax.core import tasks as tasks_lib
from safer_jax.core import wrapping
from safer_jax.training import train as train_lib

KINDS = ("bits", "ratios", "protect")
BIT_UNITS = ("bits",)  # average bits per kernel weight (weighted by parameter count)
BIT_SOURCES = mixed_precision.COST_SOURCES + ("uniform",)
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
  """A size budget for mixed precision: ``sum_l n_l * b_l <= floor(avg_bits * sum_l n_l)``.

  Attributes:
    avg_bits: average bits per kernel weight, weighted by parameter count
      (``n_l``: the kernel weights of layer ``l``), in
      ``[min(candidates), max(candidates)]``.
    candidates: the bit widths a layer may take: distinct ints in 1..16
      (qwix deploys 2..8).
    unit: what the budget counts: ``'bits'`` (kernel bits; scales and biases
      are not counted).

  Raises:
    ValueError: a bad value, naming it and what is allowed.
  """
  avg_bits: float
  candidates: tuple[int, ...] = (2, 3, 4, 5, 6, 8)
  unit: str = "bits"

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
    object.__setattr__(self, "candidates", cands)
    object.__setattr__(self, "avg_bits", float(self.avg_bits))


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
      :data:`RATIO_SOURCES`; registry aliases resolved, e.g. ``'hawq'``), or for
      protect the criterion (a :data:`safer_jax.criteria.CRITERIA` name).
    search: None, or what the search did (JSON-ready): ``evaluations``,
      ``seconds``, ``converged``, ``start`` (the start it descends from),
      ``calib_accuracy`` / ``calib_loss`` (of the result on the calibration
      examples), ``z``, ``kept_start``, ``starts`` (``{name: {accuracy,
      loss}}``) and ``calib_examples``.
  """
  kind: str
  values: dict
  resource: int
  capacity: int
  budget: Budget
  source: str
  search: dict | None = None

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

    Bits: :func:`safer_jax.budgeting.mixed_precision.quantize_model` (per output channel,
    qwix's full grid: what :meth:`deploy` runs); ratios:
    :func:`safer_jax.budgeting.pruning.prune_model` (unstructured magnitude). Other
    leaves are unchanged; an ``nnx.State`` gives its pure dict.
    """
    if self.kind == "protect":
      raise ValueError("apply() of a protect plan: protection changes no weight; plan.evaluate("
                       "model, data, rate=...) measures it under random bit flips, "
                       "safer_jax.budgeting.protection.inject(variables, names, mask, rate, key) "
                       "injects them.")
    if self.kind == "bits":
      return mixed_precision.quantize_model(variables, self.values)
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

  def to_qwix(self, variables: Any = None, *, group_size: int | None = None) -> list:
    """One ``qwix.QtRule`` per layer (:func:`safer_jax.budgeting.deploy.to_qwix_rules`); bits
    plans only.

    ``variables``: checks every layer is one qwix quantizes (needed with
    ``group_size``). :func:`safer_jax.budgeting.deploy.from_qwix_rules` reads them back.

    Raises:
      ValueError: not a bits plan (qwix deploys bit widths; prune with :meth:`apply`).
    """
    self._require("bits", "to_qwix()", "qwix deploys bit widths; plan.apply(variables) gives "
                  "pruned variables")
    from safer_jax.budgeting import deploy  # pylint: disable=import-outside-toplevel  # qwix: ~1 s
    return deploy.to_qwix_rules(self.values, variables=variables, group_size=group_size)

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
      **kwargs: :func:`safer_jax.budgeting.deploy.verify`'s options (``atol``, ``axes``, ...).

    Raises:
      ValueError: not a bits plan.
    """
    self._require("bits", "verify()", "qwix deploys bit widths")
    from safer_jax.budgeting import deploy  # pylint: disable=import-outside-toplevel
    return deploy.verify(model, variables, self.values, *example_inputs, **kwargs)

  def to_json(self) -> str:
    """The plan as JSON text (:meth:`from_json` reads it back)."""
    return json.dumps({"kind": self.kind, "values": self.values, "resource": self.resource,
                       "capacity": self.capacity, "source": self.source,
                       "budget": {"type": type(self.budget).__name__,
                                  **dataclasses.asdict(self.budget)},
                       "search": self.search})

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
    return cls(kind=d["kind"], values={k: cast(v) for k, v in d["values"].items()},
               resource=int(d["resource"]), capacity=int(d["capacity"]),
               budget=budgets[kind](**spec), source=d["source"], search=d.get("search"))


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


def calibration_split(data: data_lib.Split | data_lib.Dataset, examples: int) -> data_lib.Split:
  """The first ``examples`` calibration examples: a Split's, or a Dataset's *train* split's."""
  if isinstance(examples, bool) or not isinstance(examples, (int, np.integer)) or examples < 1:
    raise ValueError(f"calib_examples={examples!r}; allowed: an integer >= 1.")
  split = data.train if isinstance(data, data_lib.Dataset) else data
  if not isinstance(split, data_lib.Split):
    raise ValueError(f"data must be a safer_jax Split or Dataset; got a {type(data).__name__}.")
  return split.take(min(int(examples), len(split)))


def _allocate_protection(model, variables, calib, budget: ProtectBudget, source: str,
                         evaluations: int, task, seed: int) -> Plan:
  if evaluations:
    raise ValueError(f"search={evaluations}: protection plans are not searched; allowed: search=0.")
  if source not in criteria.CRITERIA:
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
              source=source, search=None)


def _search_record(found: search_lib.AllocationSearch, examples: int) -> dict:
  """The JSON-ready record of :attr:`Plan.search` (NaN z as None)."""
  r = found.result
  return {"evaluations": r.evaluations, "seconds": r.seconds, "converged": r.converged,
          "start": r.start, "calib_accuracy": r.accuracy, "calib_loss": r.loss,
          "z": None if math.isnan(r.z) else r.z, "kept_start": r.kept_start,
          "starts": {k: {"accuracy": a, "loss": l} for k, (a, l) in r.starts.items()},
          "calib_examples": examples}


def _allocate_bits(model, variables, calib, budget: BitBudget, source: str, evaluations: int,
                   task, seed: int) -> Plan:
  names = [n for n in layers_lib.find_layers(variables)
           if layers_lib.kernel_leaf(variables, n) == layers_lib.KERNEL]
  if not names:
    raise ValueError("The model has no layer with a kernel to quantize.")
  sizes = {n: int(np.size(layers_lib.get_kernel(variables, n))) for n in names}
  cands = budget.candidates
  capacity = budget_lib.budget_from_avg_bits(sizes, budget.avg_bits)
  if source == "uniform":
    alloc = budget_lib.uniform_allocation(sizes, cands, capacity)
  else:
    tables, _ = mixed_precision.cost_tables(
        model, variables, calib, cands, (source,), batch_size=CALIB_BATCH,
        max_batches=max(1, len(calib) // CALIB_BATCH), seed=seed, task=task,
        layers=[re.escape(n) for n in names])
    alloc = budget_lib.allocate_bits(tables[source], sizes, cands, capacity)
  bits = {n: int(alloc.bits[n]) for n in names}
  record = None
  if evaluations:
    evaluator = search_lib.AllocationEvaluator(
        model, variables, calib, search_lib.quantized_options(variables, names, cands), task=task)
    found = search_lib.search_allocation(
        evaluator, {n: {b: sizes[n] * b for b in cands} for n in names}, capacity,
        {source: bits}, evaluations=evaluations, seed=seed)
    bits = {n: int(found.allocation[n]) for n in names}
    record = _search_record(found, len(calib))
  return Plan(kind="bits", values=bits, resource=sum(sizes[n] * b for n, b in bits.items()),
              capacity=capacity, budget=budget, source=source, search=record)


def _allocate_ratios(model, variables, calib, budget: RatioBudget, source: str,
                     evaluations: int, task, seed: int) -> Plan:
  if source in ("oracle", "fisher") and tasks_lib.get(task).name != "classification":
    raise ValueError(f"source={source!r} for pruning ratios measures classification's loss "
                     f"only; task {tasks_lib.get(task).name!r} needs a data-free or fixed "
                     f"source: {['magnitude', *pruning.FIXED_SOURCES]}.")
  names = layers_lib.find_layers(variables)
  kernels = {n: np.asarray(layers_lib.get_kernel(variables, n)) for n in names}
  sizes = {n: int(w.size) for n, w in kernels.items()}
  cands = budget.candidates
  tables = {}
  if source in pruning.COST_SOURCES:
    tables, _ = pruning.cost_tables(model, variables, calib, cands, (source,), names=names,
                                    batch_size=min(CALIB_BATCH, len(calib)))
  ratios = pruning.ratios_for(source, budget.sparsity, kernels, tables, cands)
  ratios = {n: float(ratios[n]) for n in names}
  total = sum(sizes.values())
  capacity = total - budget_lib.prune_count(budget.sparsity, total)

  def kept(n, r):
    return sizes[n] - budget_lib.prune_count(r, sizes[n])

  record = None
  if evaluations:
    used = sum(kept(n, r) for n, r in ratios.items())
    if used > capacity:
      raise ValueError(f"search={evaluations} starts from source {source!r}'s ratios, which keep "
                       f"{used} weights, over the budget's {capacity} (per-layer flooring); "
                       f"allowed: a cost-guided source {list(pruning.COST_SOURCES)} or "
                       f"'global_magnitude', or search=0.")
    options = search_lib.pruned_options(variables, {n: sorted(set(cands) | {ratios[n]})
                                                    for n in names})
    evaluator = search_lib.AllocationEvaluator(model, variables, calib, options, task=task)
    found = search_lib.search_allocation(
        evaluator, {n: {r: kept(n, r) for r in evaluator.values[n]} for n in names}, capacity,
        {source: ratios}, evaluations=evaluations, seed=seed)
    ratios = {n: float(found.allocation[n]) for n in names}
    record = _search_record(found, len(calib))
  return Plan(kind="ratios", values=ratios, resource=sum(kept(n, r) for n, r in ratios.items()),
              capacity=capacity, budget=budget, source=source, search=record)


def allocate(model: Any, variables: Any, data: data_lib.Split | data_lib.Dataset,
             budget: Budget, *, source: str = "fisher", search: int = 0, task: Any = None,
             calib_examples: int = 256, seed: int = 0) -> Plan:
  """Per-layer bit widths, pruning ratios or protected layers, under a budget.

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
    budget: :class:`BitBudget` (mixed precision) or :class:`RatioBudget` (pruning).
    source: bits: a name of :data:`BIT_SOURCES` or a criteria registry name
      (``hawq_v2``, ``corruption_first_order``; see :func:`resolve_source`);
      ratios: a name of :data:`RATIO_SOURCES`.
    search: whole-model evaluations of the search (0: none; the knapsack
      solution is evaluated too).
    task: the loss the tables and the search measure (:mod:`safer_jax.core.tasks`;
      None: classification). Pruning's ``oracle`` / ``fisher`` tables are
      classification only.
    calib_examples: the first examples of ``data`` used (the tables use
      whole batches of 128 of them, or all when fewer).
    seed: Hutchinson probes (``hawq``) and the search's proposal order.

  Returns:
    A :class:`Plan`.

  Raises:
    ValueError: an unknown source or budget type, ``search`` or
      ``calib_examples`` out of range, or a budget the candidates cannot meet.
  """
  if isinstance(budget, BitBudget):
    kind = "bits"
  elif isinstance(budget, RatioBudget):
    kind = "ratios"
  elif isinstance(budget, ProtectBudget):
    kind = "protect"
  else:
    raise ValueError(f"budget must be a BitBudget, a RatioBudget or a ProtectBudget; got "
                     f"{budget!r}.")
  if kind != "protect":
    source = resolve_source(kind, source)
  if isinstance(search, bool) or not isinstance(search, (int, np.integer)) or search < 0:
    raise ValueError(f"search={search!r}; allowed: an integer >= 0 (whole-model evaluations).")
  calib = calibration_split(data, calib_examples)
  model, variables = wrapping.as_model(model, variables)
  fn = {"bits": _allocate_bits, "ratios": _allocate_ratios, "protect": _allocate_protection}[kind]
  return fn(model, variables, calib, budget, source, int(search), task, seed)


__all__ = ["BitBudget", "RatioBudget", "ProtectBudget", "Plan", "allocate", "resolve_source",
           "calibration_split", "BIT_SOURCES", "RATIO_SOURCES", "BIT_ALIASES", "DEFAULT_RATIOS"]
