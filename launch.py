"""Runs one experiment: ``python launch.py --experiment=NAME [--tiny] [--config.key=value ...]``.

Output goes to ``<workdir>/<experiment>/<model>/`` (several models of one
experiment coexist; ``criteria_benchmark`` keeps its aggregate files in
``<workdir>/criteria_benchmark/``), and ``<workdir>/report.{md,html}`` gathers
every experiment and model. Experiments are listed in ``experiments/__init__.py``;
``--experiment=help`` (or ``list``) prints them; ``--experiment=NAME --help`` lists that
experiment's config keys with their defaults.

``--config`` is the chosen experiment's ``get_config(tiny)`` as an ml_collections
config flag (locked): ``--config.key=value`` overrides a field, ``--config.section.key=value``
a nested one (:func:`experiments.common.define_config_flag`; the old spelling
``--config key=value`` still works, deprecated, through the same typed flags).
An unknown key or a value its field's type cannot take is refused while parsing;
every flag and ``--config`` value is then checked before any work
(:func:`experiments.common.validate_config`, each experiment's ``validate``):
a bad one, an unwritable workdir or cache, or a missing checkpoint is one
``error:`` line and exit status 2, with nothing written. Ctrl-C prints one
``interrupted:`` line (a resumable sweep says how many cells it kept) and exits
with 130. Other exceptions are bugs and keep their traceback.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import threading

from absl import app, flags, logging

import experiments
from experiments import common
from safer_jax.core.errors import ConfigError
from safer_jax.report.markdown import build_report

FLAGS = flags.FLAGS
flags.DEFINE_string("experiment", "quant_sweep", "Experiment to run; one of "
                    f"{experiments.list_experiments()}; 'help' or 'list' describes them.")
flags.DEFINE_string("workdir", "workdir", "Results go to <workdir>/<experiment>/<model>/.")
flags.DEFINE_string("model", None, "Zoo model (overrides the experiment's default).")
flags.DEFINE_string("dataset", None, "'digits' (embedded) or a prepared tfds name.")
flags.DEFINE_integer("seed", None, "Seed (model training and stochastic perturbations).",
                     lower_bound=0)
flags.DEFINE_string("data_dir", None, "tensorflow-datasets data directory.")
flags.DEFINE_string("cache_dir", None, "Zoo checkpoint cache (default ~/.cache/safer_jax/zoo).")
flags.DEFINE_bool("tiny", False, "Run the experiment's tiny setting (seconds; used by tests).")
flags.DEFINE_bool("xla_cache", True, "Keep compiled XLA programs in ~/.cache/safer_jax/xla "
                  "($SAFER_JAX_XLA_CACHE) so reruns skip most compilation.")
flags.DEFINE_bool("distributed", False, "Multi-host run: call jax.distributed.initialize() first "
                  "(auto-detects Cloud TPU / SLURM / Open MPI; or give the three flags below). "
                  "Every process runs the experiment, evaluation and criteria shard their batches "
                  "and the sweep its perturbed copies over the devices of all hosts; process 0 "
                  "trains or restores zoo models (the others receive its weights) and alone "
                  "writes results and the report.")
flags.DEFINE_string("coordinator_address", None, "--distributed: 'host:port' of process 0.")
flags.DEFINE_integer("num_processes", None, "--distributed: total number of processes.",
                     lower_bound=1)
flags.DEFINE_integer("process_id", None, "--distributed: this process's index.", lower_bound=0)
# --config: defined by parse_flags from the chosen experiment's get_config(tiny).


FLAG_KEYS = ("model", "dataset", "seed", "data_dir", "cache_dir")  # flags copied into the config


def chosen_experiment(argv: list[str]) -> tuple[str, bool]:
  """``--experiment`` and ``--tiny`` read from ``argv`` alone (before ``--config`` exists)."""
  early = flags.FlagValues()
  flags.DEFINE_string("experiment", FLAGS["experiment"].default, "", flag_values=early)
  flags.DEFINE_bool("tiny", False, "", flag_values=early)
  early(argv, known_only=True)
  return early.experiment, early.tiny


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with ``--config`` from the chosen experiment's ``get_config(tiny)``.

  A bad flag, an unknown experiment or ``--config`` key (``--config.=5`` names none), or a
  value of the wrong type is one ``error:`` line naming it, exit status 2. ``--help`` (and
  ``--helpfull``) list the chosen experiment's config keys with their defaults.
  """
  try:
    argv = common.legacy_overrides(argv)
    name, tiny = chosen_experiment(argv)
    if name not in ("help", "list"):
      module = experiments.get_experiment(name)
      common.define_config_flag(module.get_config(tiny=tiny), argv)
      flags.declare_key_flag(common.CONFIG_FLAG)  # shown by --help, with launch.py's flags
    return FLAGS(argv)
  except (flags.Error, ConfigError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def list_experiments() -> str:
  """One line per experiment: its name and the first line of its module docstring."""
  names = experiments.list_experiments()
  width = max(map(len, names))
  lines = ["Experiments (python launch.py --experiment=NAME [--tiny] [--config.key=value]):"]
  for name in names:
    doc = (experiments.get_experiment(name).__doc__ or "").strip().splitlines()
    lines.append(f"  {name:<{width}}  {doc[0] if doc else ''}")
  return "\n".join(lines)


def results_dir(workdir: str, name: str, module, config) -> str:
  """``<workdir>/<experiment>/<model>/``; ``<workdir>/<experiment>/`` where the experiment
  sets ``RESULTS_PER_MODEL = False`` (it spans models) or has no model."""
  from safer_jax.zoo import models  # pylint: disable=import-outside-toplevel
  base = os.path.join(workdir, name)
  model = config.get("model") if getattr(module, "RESULTS_PER_MODEL", True) else None
  return os.path.join(base, models.ALIASES.get(model, model)) if model else base


def check_writable(path: str, flag: str) -> list[str]:
  """Creates ``path`` and a probe file in it, or raises a ConfigError naming ``flag``.

  Returns the folders it created, deepest first (see :func:`remove_if_empty`).
  """
  created, parent = [], os.path.abspath(path)
  while not os.path.exists(parent):
    created.append(parent)
    parent = os.path.dirname(parent)
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
      pass
  except OSError as e:
    remove_if_empty(created)
    raise ConfigError(f"{flag} is not writable: cannot create files in {path!r} "
                      f"({e.strerror or e}).") from e
  return created


def remove_if_empty(folders: list[str]) -> None:
  """Removes each of ``folders`` (deepest first) that is still empty."""
  for folder in folders:
    try:
      os.rmdir(folder)
    except OSError:
      return


def redeliver_swallowed_interrupts() -> None:
  """Makes a Ctrl-C that Python dropped as "unraisable" interrupt the main thread again.

  A ``KeyboardInterrupt`` raised while a garbage-collection callback runs (jax
  registers one) is printed as "Exception ignored in ..." and dropped, and the
  run would go on to the end. This hook sends SIGINT to the main thread again
  10 ms later, when that callback has returned. Only while SIGINT raises
  ``KeyboardInterrupt`` (Python's default handler); other unraisable exceptions
  go to the previous hook.
  """
  previous = sys.unraisablehook

  def hook(unraisable):
    if (isinstance(unraisable.exc_value, KeyboardInterrupt)
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
      threading.Timer(0.01, signal.pthread_kill,
                      (threading.main_thread().ident, signal.SIGINT)).start()
      return
    previous(unraisable)

  sys.unraisablehook = hook


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  redeliver_swallowed_interrupts()
  if FLAGS.experiment in ("help", "list"):
    print(list_experiments())
    return 0
  try:
    return _main()
  except ConfigError as e:  # a bad value: the message names it and what is allowed
    if FLAGS.verbosity >= 1:  # -v 1: the full traceback
      raise
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt as e:
    path = getattr(e, "path", None)
    if path:
      print(f"interrupted: {e.saved} cells saved in {path}; rerun to resume", file=sys.stderr)
    else:
      print(f"interrupted: {FLAGS.experiment} stopped; it keeps no partial results (rerun to "
            f"start again).", file=sys.stderr)
    return 130


def _main() -> int:
  primary = True
  if FLAGS.distributed:  # Before anything touches a device.
    from safer_jax.core import distributed  # pylint: disable=import-outside-toplevel
    try:
      distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    except ValueError as e:
      raise ConfigError(str(e)) from e
    primary = distributed.is_primary()
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # keep orbax/jax INFO chatter out; -v 0 restores it.
  if FLAGS.xla_cache:
    import jax  # pylint: disable=import-outside-toplevel
    jax.config.update("jax_compilation_cache_dir", os.environ.get("SAFER_JAX_XLA_CACHE") or
                      os.path.join(os.path.expanduser("~"), ".cache", "safer_jax", "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
  module = experiments.get_experiment(FLAGS.experiment)
  config = FLAGS.config  # get_config(tiny) with the --config.key=value overrides
  names = {}
  for name in FLAG_KEYS:  # a --config.<name> override wins over the flag
    value = getattr(FLAGS, name)
    if value is not None and name in config and name not in FLAGS["config"].override_values:
      config[name] = value
      names[name] = f"--{name}"
  common.validate_config(module, config, names)  # every value, before any work
  if not primary:
    return _run_secondary(module, config)
  workdir = results_dir(FLAGS.workdir, FLAGS.experiment, module, config)
  created = check_writable(workdir, f"--workdir={FLAGS.workdir}")
  print(f"safer_jax: experiment {FLAGS.experiment} -> {os.path.abspath(workdir)}", flush=True)
  try:
    result = module.run(config, workdir)
  except (ConfigError, KeyboardInterrupt):  # e.g. an unwritable zoo cache: leave nothing behind
    remove_if_empty(created)
    raise
  for key, path in sorted(result.get("paths", {}).items()):
    print(f"  wrote {key}: {path}")
  report = build_report(FLAGS.workdir)
  print(f"report (every experiment in {FLAGS.workdir}): {report['md']} and {report['html']}")
  return 0


def _run_secondary(module, config) -> int:
  """A process other than 0 under --distributed: computes in lockstep, writes nothing kept.

  The experiment writes into a throw-away directory. Zoo models come from
  process 0 (:func:`safer_jax.zoo.cache.pretrained` broadcasts its weights), so this
  process writes no checkpoint.
  """
  with tempfile.TemporaryDirectory(prefix="safer_jax_secondary_") as scratch:
    workdir = results_dir(scratch, FLAGS.experiment, module, config)
    os.makedirs(workdir)
    module.run(config, workdir)
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
