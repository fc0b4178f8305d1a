"""Config fields and helpers shared by experiments, and the validation of configs.

Validation runs once, up front (``launch.py`` calls :func:`validate_config`
after the overrides, before any file is written or model trained): the
declarative per-key rules :data:`RULES` apply to every experiment that has the
key, cross-key rules apply by the keys present (a sensitivity-style sweep:
``families`` + ``seeds``), and an experiment module may add its own checks as
``validate(config, check)`` (``check`` a :class:`Checker`). A bad value raises a
:class:`~safer_jax.core.errors.ConfigError` naming the flag or key, the value and what
is allowed, e.g. ``--config.eval_examples=-5 is not allowed; allowed: an integer
>= 0 (0: the whole eval split)``.

Overrides are ml_collections ``--config.key=value`` flags (:func:`define_config_flag`;
:func:`apply_overrides` applies ``key=value`` items the same way in a notebook or test).
"""

from __future__ import annotations

import ast
import dataclasses
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
import pandas as pd
from absl import flags
from ml_collections import config_dict, config_flags
from ml_collections.config_flags import tuple_parser

from safer_jax import zoo
from safer_jax.core import data
from safer_jax.core.errors import ConfigError
from safer_jax.zoo import models


def base_config(**fields) -> ml_collections.ConfigDict:
  """Fields every experiment has: model, dataset, seed, data_dir, cache_dir, checkpoint.

  ``data_dir``, ``cache_dir``: None for the defaults (tensorflow-datasets' and the zoo's).
  ``checkpoint``: a user checkpoint to load instead of training a zoo model (a
  torchvision ``.npz`` state dict or an orbax directory; see :func:`pretrained`), or None.
  ``train_from_scratch``: let an ImageNet-size zoo architecture train on first use
  (refused by default: they take a ``checkpoint``).
  ``max_train``, ``max_eval``, ``image_size``: tfds datasets only (None: the
  dataset's default; for ImageNet-like names 1,024 / 2,000 images, 224x224 crops,
  see :func:`safer_jax.core.data.load_tfds`).
  """
  config = ml_collections.ConfigDict()
  config.model = "resnet8"
  config.dataset = "digits"
  config.seed = 0
  config.data_dir = config_dict.placeholder(str)
  config.cache_dir = config_dict.placeholder(str)
  config.checkpoint = config_dict.placeholder(str)
  config.train_from_scratch = False
  config.max_train = config_dict.placeholder(int)
  config.max_eval = config_dict.placeholder(int)
  config.image_size = config_dict.placeholder(int)
  config.progress = True
  config.update(fields)
  return config


# ---------------------------------------------------------------------------
# Overrides: ``--config.key=value`` flags (ml_collections ``config_flags``).
# ---------------------------------------------------------------------------

CONFIG_FLAG = "config"


class _ScalarParser(flags.ArgumentParser):
  """absl's parser of one field type (int, float, bool, str) that also reads ``None``
  (an optional field's "off"); a bad value's error says what the field takes."""

  def __init__(self, base: flags.ArgumentParser, what: str):
    self.base, self.what = base, what

  def parse(self, argument):
    if isinstance(argument, str) and argument.strip() == "None":
      return None
    try:
      return self.base.parse(argument)
    except (TypeError, ValueError):
      raise ValueError(f"expected {self.what}") from None

  def flag_type(self):
    return self.base.flag_type()


_BARE_WORD = re.compile(r"[A-Za-z_][^'\"()\[\]\s,]*")


def parse_tuple(text: str) -> tuple:
  """A tuple field's command-line value: a Python literal or bare words.

  ``(8, 4)``, ``[8, 4]``, ``()`` and ``8`` are literals (one value becomes a 1-tuple);
  words joined by commas, optionally in parentheses, are strings:
  ``quantize,prune``, ``(fisher,taylor)``, ``prune:0.5`` or ``dense.*``.

  Raises:
    ValueError: not a literal and not bare words, e.g. ``(8,4`` (says what is allowed).
  """
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError) as e:
    words = [w.strip() for w in text.strip().strip("()[]").split(",") if w.strip()]
    if words and all(_BARE_WORD.fullmatch(w) for w in words):
      return tuple(words)
    if isinstance(e, ValueError) or ("," not in text and " " not in text):
      return (text,)  # one string that is no literal, e.g. a path or a regex
    raise ValueError(f"expected a tuple such as (8, 4), 8,4, () or quantize,prune; "
                     f"{text!r} is not a Python literal ({getattr(e, 'msg', e)})") from None
  if isinstance(value, (tuple, list)):
    return tuple(value)
  return (value,)


class _TupleParser(tuple_parser.TupleParser):
  """ml_collections' tuple parser (repeated flags append) with :func:`parse_tuple`'s values."""

  def parse(self, argument):
    if isinstance(argument, str):
      return parse_tuple(argument)
    return super().parse(argument)


_PARSERS = {
    int: _ScalarParser(flags.IntegerParser(), "an integer (or None)"),
    float: _ScalarParser(flags.FloatParser(), "a number (or None)"),
    bool: _ScalarParser(flags.BooleanParser(), "True or False"),
    str: _ScalarParser(flags.ArgumentParser(), "a string (or None)"),
    tuple: _TupleParser(),
}


def override_keys(argv: Sequence[str], name: str = CONFIG_FLAG) -> list[str]:
  """The keys of the ``--<name>.key=value`` (or ``--<name>.key value``) flags in ``argv``."""
  found = (re.match(rf"^--?(?:no)?{re.escape(name)}\.([^=]*)", arg) for arg in argv)
  return list(dict.fromkeys(m.group(1) for m in found if m))


def legacy_overrides(argv: Sequence[str], name: str = CONFIG_FLAG) -> list[str]:
  """``argv`` with the deprecated ``--config key=value`` / ``--config=key=value`` rewritten
  as ``--config.key=value`` (the same typed path).

  Raises:
    ConfigError: an old-style override without ``=``.
  """
  out, args = [], iter(argv)
  for arg in args:
    item = None
    if arg in (f"--{name}", f"-{name}"):
      item = next(args, "")
    elif arg.startswith((f"--{name}=", f"-{name}=")):
      item = arg.split("=", 1)[1]
    if item is None:
      out.append(arg)
      continue
    if "=" not in item:
      raise ConfigError(f"--{name} {item!r} must look like key=value (better: "
                        f"--{name}.key=value).")
    key, value = item.split("=", 1)
    out.append(f"--{name}.{key.strip()}={value}")
  return out


def config_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """``key=default`` of every field, nested sections as ``section.key``, in the config's order.

  The defaults as they would be typed after ``--config.`` (``None`` for an unset
  optional field).
  """
  lines = []
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      lines += config_keys(value, f"{prefix}{key}.")
    else:
      lines.append(f"{prefix}{key}={_show(value)}")
  return lines


def config_help(config: ml_collections.ConfigDict, name: str = CONFIG_FLAG) -> str:
  """The ``--<name>`` flag's help: how to override a field, then every key with its default."""
  keys = "\n".join(f"  {line}" for line in config_keys(config))
  return (f"The experiment's config; override a field with --{name}.key=value (a nested one "
          f"with --{name}.section.key=value). Keys and defaults:\n{keys}")


def define_config_flag(config: ml_collections.ConfigDict, argv: Sequence[str],
                       flag_values: flags.FlagValues = flags.FLAGS,
                       name: str = CONFIG_FLAG) -> flags.FlagHolder:
  """Defines ``--<name>`` over ``config`` (locked) and a typed flag per ``--<name>.key`` in argv.

  ml_collections' ``config_flags.DEFINE_config_dict(..., lock_config=True)``:
  parsing ``argv`` with ``flag_values`` then sets each ``--config.key=value``
  (nested sections ``--config.section.key=value``) in ``config`` itself, parsed
  by the type of the field's default (a placeholder's type for ``None``
  defaults); the word ``None`` sets any field to ``None``; tuples take
  literals, bare words (``families=quantize,prune``) or repeated flags.

  Args:
    config: the experiment's config; locked here (no new keys).
    argv: the full command line (program name first), after :func:`legacy_overrides`.
    flag_values: where to define the flags (absl's global ``FLAGS`` by default).
    name: the flag's name.

  Its help (``--help`` where the flag is a key flag, ``--helpfull``) lists every
  key with its default (:func:`config_help`).

  Returns:
    The flag's holder (its ``.value`` is ``config``).

  Raises:
    ConfigError: a key ``config`` does not have (lists the valid keys of that section;
      ``--config.=5`` names the key ``''``).
  """
  for key in override_keys(argv, name):
    node, parts = config, key.split(".")
    for i, part in enumerate(parts):
      section = ".".join(parts[:i])
      if not isinstance(node, ml_collections.ConfigDict):
        raise ConfigError(f"Unknown config key {key!r} (--{name}.{key}): {section!r} is a "
                          f"{type(node).__name__}, not a section; set it with "
                          f"--{name}.{section}=VALUE")
      if part not in node:
        where = f" in {section}" if section else ""
        raise ConfigError(f"Unknown config key {key!r} (--{name}.{key}); valid keys{where}: "
                          f"{sorted(node.keys())}")
      node = node[part]
  for field_type, parser in _PARSERS.items():  # process-wide: launch.py's and tests' configs
    config_flags.register_flag_parser_for_type(field_type, parser)
  holder = config_flags.DEFINE_config_dict(name, config, config_help(config, name),
                                           flag_values=flag_values, lock_config=True,
                                           sys_argv=list(argv))
  flag_values[name].default_as_str = ""  # the help lists the defaults, not absl's YAML dump
  return holder


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
  """Applies ``key=value`` items to ``config`` exactly as ``--config.key=value`` flags would.

  For tests and notebooks; ``launch.py`` parses the same flags from its command line.

  Raises:
    ConfigError: an item without ``=``, an unknown key (lists the valid keys) or a value
      its field's type cannot take (names ``--config.key=value`` and what is expected).
  """
  argv = legacy_overrides(["apply_overrides"] + [a for item in overrides
                                                 for a in (f"--{CONFIG_FLAG}", item)])
  flag_values = flags.FlagValues()
  define_config_flag(config, argv, flag_values)
  try:
    flag_values(argv)
  except flags.Error as e:
    raise ConfigError(str(e)) from None


# ---------------------------------------------------------------------------
# Validation: declarative per-key rules, cross-key rules, per-experiment checks.
# ---------------------------------------------------------------------------


def _show(value: Any) -> str:
  """A value as the user would type it after ``key=`` (``''`` for an empty string)."""
  if isinstance(value, str):
    return value if value else "''"
  if isinstance(value, ml_collections.ConfigDict):
    return repr(value.to_dict())
  return repr(value)


@dataclasses.dataclass(frozen=True)
class Rule:
  """A check of one value: ``test(value) -> bool``, the text of what is allowed, and
  optionally ``why(value) -> str`` saying what is wrong (e.g. which element)."""
  test: Callable[[Any], bool]
  allowed: str
  why: Callable[[Any], str] | None = None

  def __call__(self, value: Any) -> bool:
    try:
      return bool(self.test(value))
    except (TypeError, ValueError):
      return False

  def problem(self, value: Any) -> str:
    return self.why(value) if self.why is not None else ""


def _is_int(v) -> bool:
  import numpy as np  # pylint: disable=import-outside-toplevel
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_num(v) -> bool:
  import math  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  return (isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
          and math.isfinite(float(v)))


def integer(lo: int | None = None, hi: int | None = None, note: str = "") -> Rule:
  """An integer in ``[lo, hi]`` (either bound optional)."""
  if lo is not None and hi is not None:
    text = f"an integer in {lo}..{hi}"
  elif lo is not None:
    text = f"an integer >= {lo}"
  else:
    text = "an integer" + (f" <= {hi}" if hi is not None else "")
  return Rule(lambda v: _is_int(v) and (lo is None or v >= lo) and (hi is None or v <= hi),
              text + (f" ({note})" if note else ""))


def number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
           hi_open: bool = False, note: str = "") -> Rule:
  """A finite number in the interval ``lo..hi`` (open or closed ends)."""
  if lo is not None and hi is not None:
    text = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
  elif lo is not None:
    text = f"a number {'>' if lo_open else '>='} {lo:g}"
  elif hi is not None:
    text = f"a number {'<' if hi_open else '<='} {hi:g}"
  else:
    text = "a finite number"

  def test(v):
    if not _is_num(v):
      return False
    v = float(v)
    return ((lo is None or (v > lo if lo_open else v >= lo))
            and (hi is None or (v < hi if hi_open else v <= hi)))
  return Rule(test, text + (f" ({note})" if note else ""))


def choice(options: Sequence[Any], note: str = "") -> Rule:
  """One of ``options``."""
  options = list(options)
  shown = ", ".join(_show(o) for o in options)
  return Rule(lambda v: v in options, f"one of {shown}" + (f" ({note})" if note else ""))


def boolean() -> Rule:
  return Rule(lambda v: isinstance(v, bool), "True or False")


def text(nonempty: bool = False, note: str = "") -> Rule:
  return Rule(lambda v: isinstance(v, str) and (bool(v) or not nonempty),
              ("a non-empty string" if nonempty else "a string") + (f" ({note})" if note else ""))


def optional(rule: Rule) -> Rule:
  """``None`` or a value ``rule`` allows."""
  return Rule(lambda v: v is None or rule(v), f"None or {rule.allowed}")


def sequence(item: Rule, *, nonempty: bool = True, unique: bool = False,
             note: str = "") -> Rule:
  """A tuple (or list) whose every element ``item`` allows."""
  def why(v):
    if not isinstance(v, (tuple, list)):
      return "not a tuple"
    if nonempty and not v:
      return "empty"
    bad = [x for x in v if not item(x)]
    if bad:
      return f"{_show(bad[0])} is not {item.allowed}"
    if unique and len(set(v)) != len(v):
      return "repeated values"
    return ""

  what = ("a non-empty tuple" if nonempty else "a tuple") + (" of distinct values" if unique
                                                              else "")
  return Rule(lambda v: not why(v), f"{what}, each {item.allowed}" + (f" ({note})" if note
                                                                         else ""), why)


COUNT = integer(1)
SEED = integer(0, 2**31 - 1)
SEEDS = sequence(SEED, unique=True)

# Keys with one meaning in every experiment that has them.
RULES: dict[str, Rule] = {
    "seed": SEED,
    "dataset": text(nonempty=True, note="'digits' or a prepared tensorflow-datasets name"),
    "data_dir": optional(text()),
    "cache_dir": optional(text()),
    "checkpoint": optional(text()),
    "max_train": optional(COUNT),
    "max_eval": optional(COUNT),
    "image_size": optional(COUNT),
    "progress": boolean(),
    "train_from_scratch": boolean(),
    "eval_examples": integer(0, note="0: the whole eval split"),
    "eval_batch_size": COUNT,
    "max_parallel": COUNT,
    "memory_budget_gb": optional(number(0, lo_open=True, note="10**9 bytes; None: no budget")),
    "calib_examples": COUNT,
    "calib_batch_size": COUNT,
    "calib_batches": COUNT,
    "batch_size": COUNT,
    "learning_rate": number(0, lo_open=True),
    "devices": sequence(COUNT),
    "timeout_s": number(0, lo_open=True),
}


class Checker:
  """Checks the values of one config and raises :class:`ConfigError` naming the flag or key.

  ``names`` maps keys set from a flag to that flag (``{'seed': '--seed'}``);
  others are named ``--config.key``.
  """

  def __init__(self, config: ml_collections.ConfigDict, names: Mapping[str, str] | None = None):
    self.config = config
    self.names = dict(names or {})

  def value(self, key: str) -> Any:
    node = self.config
    for part in key.split("."):
      node = node[part]
    return node

  def has(self, key: str) -> bool:
    node = self.config
    for part in key.split("."):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        return False
      node = node[part]
    return True

  def name(self, key: str) -> str:
    return self.names.get(key, f"--{CONFIG_FLAG}.{key}")

  def fail(self, key: str, allowed: str, value: Any = None, *, problem: str = "") -> None:
    """Raises the ConfigError for ``key`` (its current value unless ``value`` is given)."""
    value = self.value(key) if value is None else value
    raise ConfigError(f"{self.name(key)}={_show(value)} is not allowed"
                      + (f" ({problem})" if problem else "") + f"; allowed: {allowed}")

  def rule(self, key: str, rule: Rule) -> None:
    """Checks ``key`` (when the config has it) against ``rule``."""
    if self.has(key) and not rule(self.value(key)):
      self.fail(key, rule.allowed, problem=rule.problem(self.value(key)))

  def require(self, ok: bool, key: str, allowed: str, *, problem: str = "") -> None:
    if not ok:
      self.fail(key, allowed, problem=problem)


def model_names(extra: Sequence[str | None] = ()) -> list[str | None]:
  from safer_jax.zoo import models  # pylint: disable=import-outside-toplevel
  return [*models.list_models(), *models.ALIASES, *extra]


def check_sweep_keys(check: Checker) -> None:
  """A sensitivity-style sweep config (``families``, per-family grid keys, ``seeds``, ...)."""
  from safer_jax.core import perturb  # pylint: disable=import-outside-toplevel
  config = check.config
  check.rule("families", sequence(choice(sorted(perturb.FAMILIES)), unique=True))
  for family in config.families:
    if family in config:
      grid = config[family]
      check.require(isinstance(grid, (tuple, list)) and len(grid) > 0, family,
                    f"a non-empty tuple of {perturb.FAMILIES[family].magnitude_name} values "
                    f"(the {family} family's magnitude grid)")
      check_magnitudes(check, family, family, grid)
  check.rule("seeds", sequence(SEED, nonempty=False, unique=True))
  stochastic = [f for f in config.families if perturb.FAMILIES[f].stochastic]
  check.require(bool(config.seeds) or not stochastic, "seeds",
                f"a non-empty tuple of integers >= 0 (the stochastic families {stochastic} need "
                f"at least one seed; or drop them from families)")
  if "bitflip_representation" in config:
    check.rule("bitflip_representation", choice(("int8", "float32", "bfloat16")))
  check.rule("layers", optional(sequence(text(nonempty=True), note="regexes; None: every layer")))
  check_layers(check, "layers", list(check.value("layers") or ()))
  check.rule("act_quantize", sequence(integer(2, 16), nonempty=False, unique=True,
                                      note="activation bit widths; (): off"))
  check.rule("act_calib_examples", integer(1, note="training images for activation ranges"))


def check_magnitudes(check: Checker, key: str, family: str, grid: Sequence[Any]) -> None:
  from safer_jax.core import perturb  # pylint: disable=import-outside-toplevel
  for m in grid:
    if not _is_num(m):
      check.fail(key, f"numbers ({perturb.FAMILIES[family].magnitude_name} values)")
    try:
      perturb.validate_magnitude(family, float(m))
    except ValueError as e:
      check.fail(key, str(e).split("allowed: ")[-1], problem=str(e).split(";")[0])


def _check_regex(check: Checker, key: str, pattern: str) -> None:
  try:
    re.compile(pattern)
  except re.error as e:
    check.fail(key, "valid regular expressions", problem=f"{pattern!r}: {e}")


def layer_names(config: ml_collections.ConfigDict, model: str | None = None) -> list[str] | None:
  """The layer paths of ``model`` (default ``config.model``) without training or loading weights.

  Known up front for the embedded ``'digits'`` (its input shape and classes are
  fixed); ``None`` for other datasets (known only once their data is loaded).
  """
  if config.get("dataset") != "digits":
    return None
  from safer_jax.core import layers  # pylint: disable=import-outside-toplevel
  from safer_jax.zoo import models  # pylint: disable=import-outside-toplevel
  ds = data.load_dataset("digits")
  net = models.get_model(model or config.model, num_classes=ds.num_classes)
  return layers.find_layers(layers.abstract_variables(net, ds.input_shape))


def check_layers(check: Checker, key: str, patterns: Sequence[str],
                 model: str | None = None) -> None:
  """Each regex of ``patterns`` is valid and (when the layers are known) matches a layer."""
  for pattern in patterns:
    _check_regex(check, key, pattern)
  names = layer_names(check.config, model) if patterns else None
  for pattern in patterns if names else ():
    if not any(re.fullmatch(pattern, n) for n in names):
      check.fail(key, f"regexes matching layers of {model or check.config.model}: {names}",
                 problem=f"{pattern!r} matches no layer")


def _check_paths(check: Checker) -> None:
  """Paths that must exist before any work: the user checkpoint and the tfds data dir."""
  config = check.config
  if config.get("checkpoint"):
    path = os.path.expanduser(config.checkpoint)
    if not os.path.exists(path):
      check.fail("checkpoint", "an existing .npz file or orbax checkpoint directory",
                 problem="no such file or directory")
    if not (os.path.isdir(path) or path.endswith(".npz")):
      check.fail("checkpoint", "a .npz file (torchvision state_dict) or an orbax checkpoint "
                 "directory")
  if config.get("data_dir") and not os.path.isdir(os.path.expanduser(config.data_dir)):
    check.fail("data_dir", "an existing tensorflow-datasets directory (or None)",
               problem="no such directory")
  if config.get("cache_dir") and os.path.exists(config.cache_dir) and not os.path.isdir(
      config.cache_dir):
    check.fail("cache_dir", "a directory (created if missing)", problem="it is a file")


def validate_config(module: Any, config: ml_collections.ConfigDict,
                    names: Mapping[str, str] | None = None) -> None:
  """Every check of ``config`` for the experiment ``module``, before any work.

  Args:
    module: the experiment module (its optional ``validate(config, check)``,
      ``EXTRA_MODELS``, names besides the zoo's allowed as ``model``, and
      ``TEXT_MODELS_OK``: it runs the language models too).
    config: the config after flags and overrides.
    names: keys set from flags -> the flag (``{'seed': '--seed'}``).

  Raises:
    ConfigError: the first bad value (flag or key, value, what is allowed).
  """
  check = Checker(config, names)
  for key, rule in RULES.items():
    check.rule(key, rule)
  if "model" in config:
    check.rule("model", choice(model_names(getattr(module, "EXTRA_MODELS", ()))))
    if not getattr(module, "TEXT_MODELS_OK", False):
      name = models.ALIASES.get(config.model, config.model)
      check.require(name not in models.TEXT_MODELS, "model",
                    f"an image classifier: this experiment measures accuracy on images (the "
                    f"language models {list(models.TEXT_MODELS)} run in the experiments "
                    f"sensitivity and quant_sweep)")
  if "families" in config and "seeds" in config:
    check_sweep_keys(check)
  _check_paths(check)
  own = getattr(module, "validate", None)
  if own is not None:
    own(config, check)


def dataset_name(config, model: str | None = None) -> str:
  """``config.dataset``, where the default embedded ``'digits'`` means the embedded text corpus
  (``'pydoc'``) for a language model (:data:`safer_jax.zoo.models.TEXT_MODELS`)."""
  model = models.ALIASES.get(model or config.model, model or config.model)
  if config.dataset == "digits" and model in models.TEXT_MODELS:
    return zoo.cache.DEFAULT_TEXT_DATASET
  return config.dataset


def load_dataset(config, model: str | None = None) -> data.Dataset:
  """``config.dataset`` (with data_dir, max_train, max_eval, image_size); see :func:`dataset_name`.

  Raises:
    ConfigError: an unknown or unprepared dataset, or options that do not apply to it.
  """
  name = dataset_name(config, model)
  try:
    return data.load_dataset(name, data_dir=config.data_dir or None,
                             max_train=config.get("max_train"), max_eval=config.get("max_eval"),
                             image_size=config.get("image_size"))
  except ValueError as e:
    raise ConfigError(f"--dataset={name}: {e}") from e


def pretrained(config, *, model: str | None = None, recipe=None) -> zoo.ZooEntry:
  """The trained zoo model named by ``config`` (model, dataset, seed, cache_dir, data_dir).

  When ``config.checkpoint`` is set, the model's weights come from that file or
  directory (:func:`safer_jax.zoo.cache.from_checkpoint`) and ``seed``/``cache_dir`` are unused.
  ``model`` overrides ``config.model``; ``recipe`` (a ``train.TrainConfig``) the zoo's
  training recipe.
  """
  model = model or config.model
  dataset = load_dataset(config, model)
  if config.get("checkpoint"):
    try:
      return zoo.from_checkpoint(model, os.path.expanduser(config.checkpoint), dataset)
    except (ValueError, FileNotFoundError) as e:  # keys, shapes, classes, NaN weights
      raise ConfigError(f"--config.checkpoint={config.checkpoint}: {e}") from e
  return zoo.pretrained(model, dataset, config.seed, config=recipe,
                        cache_dir=config.cache_dir or None, data_dir=config.data_dir or None,
                        progress=config.progress,
                        train_from_scratch=bool(config.get("train_from_scratch", False)))


# ---------------------------------------------------------------------------
# The interaction-aware search's files and paragraphs (quant_sweep, prune_sweep).
# ---------------------------------------------------------------------------


def search_config(tiny: bool = False) -> ml_collections.ConfigDict:
  """The ``search`` section of the allocation experiments (quant_sweep, prune_sweep).

  ``evals`` whole-model evaluations per budget (0: no search), selected by loss on
  ``examples`` training images (never the eval split), ``batch`` candidates per
  batched evaluation.
  """
  return ml_collections.ConfigDict({"evals": 24 if tiny else 256,
                                    "examples": 256 if tiny else 1024,
                                    "batch": 8 if tiny else 32})


def validate_search(check: "Checker", magnitude: str, rule: Callable) -> None:
  """The search and interaction fields (``magnitude``: the interaction figure's, with ``rule``)."""
  check.rule("search.evals", integer(0, note="whole-model evaluations per budget; 0: off"))
  check.rule("search.examples", integer(1, note="training images the search scores on"))
  check.rule("search.batch", integer(1, note="candidates per batched evaluation"))
  check.rule(magnitude, rule)
  check.rule("interaction.top", integer(2, note="layers paired in the interaction figure"))


def search_record(record: dict) -> dict:
  """What ``search.json`` keeps of one search: a :class:`safer_jax.Plan`'s ``search`` record.

  Evaluations, seconds, where the result came from, its calibration scores and those of the
  best start (lowest calibration loss) and of every start.
  """
  starts = record["starts"]
  best_start = min(starts, key=lambda k: starts[k]["loss"])
  return {"evaluations": record["evaluations"], "seconds": record["seconds"],
          "converged": record["converged"], "from": record["start"],
          "calib_loss": record["calib_loss"], "calib_accuracy": record["calib_accuracy"],
          "best_start": best_start, "best_start_calib_loss": starts[best_start]["loss"],
          "z": float("nan") if record["z"] is None else record["z"],
          "kept_start": record["kept_start"], "starts": starts}


def write_allocation_files(workdir: str, results: pd.DataFrame, costs: dict, summary: str,
                           plot: Callable[[str], str], plot_name: str, search_record: dict,
                           interactions, title: str, extra: dict | None = None) -> dict:
  """The files of an allocation experiment (quant_sweep, prune_sweep); their paths.

  ``results.csv``, ``costs.json`` (``costs`` plus the package versions),
  ``summary.md``, the figure ``plot_name`` (``plot(path) -> path``), ``extra``
  JSON files (``{key: (file name, object)}``), then :func:`write_search_files`.
  """
  from safer_jax.core import io  # pylint: disable=import-outside-toplevel
  paths = {"results": io.write_csv(os.path.join(workdir, "results.csv"), results)}
  for key, (name, obj) in (extra or {}).items():
    paths[key] = io.write_json(os.path.join(workdir, name), obj)
  paths["costs"] = io.write_json(os.path.join(workdir, "costs.json"),
                                 {**costs, "versions": io.versions()})
  paths["summary"] = io.write_text(os.path.join(workdir, "summary.md"), summary)
  paths["plot"] = plot(os.path.join(workdir, plot_name))
  paths.update(write_search_files(workdir, search_record, interactions, title))
  return paths


def write_search_files(workdir: str, search_record: dict, interactions, title: str) -> dict:
  """``search.json`` (when a search ran) and ``interactions.csv`` / ``.png``; their paths."""
  from safer_jax.core import io  # pylint: disable=import-outside-toplevel
  from safer_jax.report import plots  # pylint: disable=import-outside-toplevel
  paths = {}
  if any(search_record.get(k) for k in ("budgets", "targets")):
    paths["search"] = io.write_json(os.path.join(workdir, "search.json"), search_record)
  if interactions is not None:
    paths["interactions"] = io.write_csv(os.path.join(workdir, "interactions.csv"),
                                         interactions)
    paths["interactions_plot"] = plots.interaction_figure(
        interactions, os.path.join(workdir, "interactions.png"), title)
  return paths


def search_summary(results: pd.DataFrame, searches: list, examples: int, budget_column: str,
                   unit: str, source: str = "searched", metric: str = "accuracy",
                   scored: str = "") -> str:
  """A paragraph on the ``source`` rows (a search): cost, where they came from, how they compare.

  Compares held-out ``metric`` with the best other non-random, non-searched source per budget.
  """
  searches = [s for s in searches if s.get("source", "searched") == source]
  evals = sum(s["evaluations"] for s in searches)
  secs = sum(s["seconds"] for s in searches)
  others = results[~results.source.str.startswith("searched") & (results.source != "random")]
  lower = metric in ("perplexity", "loss")  # lower is better
  unit_ex = "sequences" if metric == "perplexity" else "images"
  best = (others.groupby(budget_column)[metric].min() if lower
          else others.groupby(budget_column)[metric].max())
  found = results[results.source == source].set_index(budget_column)[metric]
  if lower:
    behind = [f"{b:g} {unit} ({found[b]:.2f} vs {best[b]:.2f})"
              for b in found.index if found[b] > best[b] + 1e-9]
  else:
    behind = [f"{b:g} {unit} ({100 * found[b]:.2f}% vs {100 * best[b]:.2f}%)"
              for b in found.index if found[b] < best[b] - 1e-9]
  moved = [s for s in searches if s["calib_loss"] < s["best_start_calib_loss"]]
  kept = [s for s in searches if s.get("kept_start")]
  text = (f"{source}: a batched local search over whole models (raise one layer, lower another "
          f"until the budget holds) from every non-random source's allocation, scored by "
          f"loss{scored} on {examples} training {unit_ex} (never the eval split): {evals} "
          f"whole-model evaluations in {secs:.1f} s over {len(searches)} budgets. It lowered "
          f"the calibration loss significantly (paired z >= 2 over the calibration {unit_ex}) "
          f"below its best start at {len(moved)} of {len(searches)} budgets"
          + (f"; at {len(kept)} more it found lower but not significantly lower losses and "
             f"kept the best start" if kept else "") + ". ")
  what = (metric if metric in ("accuracy", "perplexity", "loss")
          else "accuracy with BatchNorm re-estimated")
  if behind:
    text += (f"On held-out {what} it is below the best other source at "
             + ", ".join(behind) + f": selection on training {unit_ex} does not carry over "
             "exactly to the eval split.")
  else:
    text += (f"On held-out {what} it is at least as good as every other "
             f"source at every budget.")
  return text


def interaction_summary(table: pd.DataFrame, what: str) -> str:
  """One sentence on how far the joint loss of layer pairs departs from additivity."""
  ratio = table["ratio"].dropna()
  worst = table.loc[table["excess"].idxmax()]
  return (f"Interactions (`interactions.csv`, `interactions.png`): for {len(table)} pairs of the "
          f"most sensitive layers at {what}, the joint loss increase is {ratio.min():.2f}x to "
          f"{ratio.max():.2f}x the sum of the single-layer increases (median "
          f"{ratio.median():.2f}x); the largest excess is {worst.layer_a} + {worst.layer_b} "
          f"({worst.joint:.4f} vs {worst.additive:.4f} nats).")
