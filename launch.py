"""Runs one experiment: ``python launch.py --experiment=NAME [--model=...] [--config key=value]``.

Output goes to ``<workdir>/<experiment>/``. Experiments are listed in
``experiments/__init__.py``; ``--experiment=help`` prints them.
"""

from __future__ import annotations

import os
import sys
import tempfile

from absl import app, flags, logging

import experiments
from experiments import common
from safer_jax.report import build_report

FLAGS = flags.FLAGS
flags.DEFINE_string("experiment", "quant_sweep", "Experiment to run; one of "
                    f"{experiments.list_experiments()}.")
flags.DEFINE_string("workdir", "workdir", "Results go to <workdir>/<experiment>/.")
flags.DEFINE_string("model", None, "Zoo model (overrides the experiment's default).")
flags.DEFINE_string("dataset", None, "'digits' (embedded) or a prepared tfds name.")
flags.DEFINE_integer("seed", None, "Seed (model training and stochastic perturbations).")
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
flags.DEFINE_integer("num_processes", None, "--distributed: total number of processes.")
flags.DEFINE_integer("process_id", None, "--distributed: this process's index.")
flags.DEFINE_multi_string("config", [], "Config override key=value, repeatable, e.g. "
                          "--config epochs=5 --config bits='(8,4,2)'.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  primary = True
  if FLAGS.distributed:  # Before anything touches a device.
    from safer_jax import distributed  # pylint: disable=import-outside-toplevel
    try:
      distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    except ValueError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    primary = distributed.is_primary()
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # keep orbax/jax INFO chatter out; -v 0 restores it.
  if FLAGS.xla_cache:
    import jax  # pylint: disable=import-outside-toplevel
    jax.config.update("jax_compilation_cache_dir", os.environ.get("SAFER_JAX_XLA_CACHE") or
                      os.path.join(os.path.expanduser("~"), ".cache", "safer_jax", "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
  try:
    module = experiments.get_experiment(FLAGS.experiment)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  config = module.get_config(tiny=FLAGS.tiny)
  for name in ("model", "dataset", "seed", "data_dir", "cache_dir"):
    value = getattr(FLAGS, name)
    if value is not None and name in config:
      config[name] = value
  try:
    common.apply_overrides(config, FLAGS.config)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if not primary:
    return _run_secondary(module, config)
  workdir = os.path.join(FLAGS.workdir, FLAGS.experiment)
  os.makedirs(workdir, exist_ok=True)
  print(f"safer_jax: experiment {FLAGS.experiment} -> {os.path.abspath(workdir)}", flush=True)
  try:
    result = module.run(config, workdir)
  except ValueError as e:  # bad input: the message names the value and what is allowed
    if FLAGS.verbosity >= 1:  # -v 1: the full traceback
      raise
    print(f"error: {e}", file=sys.stderr)
    return 2
  for key, path in sorted(result.get("paths", {}).items()):
    print(f"  wrote {key}: {path}")
  report = build_report(FLAGS.workdir)
  print(f"report (every experiment in {FLAGS.workdir}): {report['md']} and {report['html']}")
  return 0


def _run_secondary(module, config) -> int:
  """A process other than 0 under --distributed: computes in lockstep, writes nothing kept.

  The experiment writes into a throw-away directory. Zoo models come from
  process 0 (:func:`safer_jax.zoo.pretrained` broadcasts its weights), so this
  process writes no checkpoint.
  """
  with tempfile.TemporaryDirectory(prefix="safer_jax_secondary_") as scratch:
    workdir = os.path.join(scratch, FLAGS.experiment)
    os.makedirs(workdir)
    module.run(config, workdir)
  return 0


if __name__ == "__main__":
  app.run(main)
