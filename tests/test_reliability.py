"""Reliability (issue 13): concurrent runs, bad values refused before any work, readable results.

One test (or parametrised case) per measured failure: validation in-process over
every experiment, a few bad values through ``launch.py`` (in parallel), three
processes on an empty zoo cache, Ctrl-C, resume byte-identity, umask, plots.
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time

import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

import experiments
from experiments import common
from safer_jax import zoo
from safer_jax.budgeting import mixed_precision
from safer_jax.core import errors, io, layers
from safer_jax.measure import sweep
from safer_jax.training import train
from safer_jax.zoo import models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---------------------------------------------------------------------------
# Every bad --config.key value of every experiment: refused by the validation step.
# ---------------------------------------------------------------------------

# Keys of experiments.common.RULES (any experiment that has them) -> a bad value.
GENERIC_BAD = {
    "seed": "-1", "eval_examples": "-5", "eval_batch_size": "0", "max_parallel": "0",
    "memory_budget_gb": "-1.0", "calib_examples": "0", "calib_batch_size": "0",
    "calib_batches": "0", "batch_size": "0", "learning_rate": "0", "max_train": "0",
    "max_eval": "-3", "image_size": "0", "devices": "(0,)", "timeout_s": "0",
    "checkpoint": "/missing/model.npz", "data_dir": "/missing/tfds", "model": "vgg",
    "progress": "3",
}
# Experiment-specific keys -> bad values (the rows of the table among them).
SPECIFIC_BAD = {
    "sensitivity": ["seeds=()", "quantize=(0,)", "prune=(1.5,)", "quantize=()",
                    "families=(blur,)", "families=(quantize,quantize)", "layers=nope.*",
                    "layers=(", "bitflip_representation=int4", "bitflip=(2.0,)"],
    "bench_sweep": ["seeds=()", "noise=(-1.0,)", "warm_runs=0"],
    "bench_devices": ["seeds=()", "devices=()"],
    "prune_sweep": ["targets=(1.5,)", "targets=(0.5,1.5)", "targets=()", "candidates=(1.2,)",
                    "sources=(nope,)", "finetune_steps=-1", "finetune_lr=0"],
    "quant_sweep": ["candidates=(0,4)", "candidates=(4,17)", "budgets=(1.0,)", "sources=(nope,)",
                    "random_seeds=(-1,)", "tie_groups=(('nope','head/fc'),)"],
    "bitflip_protect": ["rates=(2.0,)", "budget_fractions=(1.5,)", "rules=(nope,)",
                        "num_seeds=0", "seed_chunk=0", "random_seeds=()",
                        "representation=int4", "oracle_metric=nope"],
    "attribution_preservation": ["levels=(prune:1.5,)", "levels=(blur:1,)", "levels=()",
                                 "top_k=0", "layer=nope", "num_examples=0", "steps=-1",
                                 "channel_drop=1.0"],
    "corruption": ["eps=(0.0,)", "norms=(3,)", "n_sparse=(-1,)", "layers=nope", "num_random=0",
                   "pga_steps=-1", "bar_eps=0"],
    "acr_train": ["seeds=()", "epochs=0", "acr.mix=2.0", "acr.scope=nope", "acr.p=3",
                  "quant_bits=(0,)", "bitflip_rates=(1.5,)", "bitflip_trials=0"],
    "memory_check": ["budget_gb=0", "margin=0.5", "max_parallels=(0,)", "batch_sizes=()",
                     "channels=0"],
    "criteria_benchmark": ["sweep_seeds=()", "criteria=(nope,)", "models=(vgg,)",
                           "metrics=(nope,)", "grids.prune=(1.5,)", "k_frac=0", "n_boot=-1",
                           "families=(blur,)"],
    "train": ["model=vgg"],
    "bench_criteria": ["trace_probes=0", "warm_runs=0", "metric=nope", "models=(vgg,)"],
}


def _cases():
  cases = []
  for name in experiments.list_experiments():
    config = experiments.get_experiment(name).get_config(tiny=True)
    cases += [(name, f"{key}={value}") for key, value in GENERIC_BAD.items() if key in config]
    cases += [(name, item) for item in SPECIFIC_BAD.get(name, [])]
  return cases


@pytest.mark.parametrize("name,item", _cases())
def test_bad_config_value_is_refused_by_validation(name, item):
  module = experiments.get_experiment(name)
  config = module.get_config(tiny=True)
  key, value = item.split("=", 1)
  with pytest.raises(errors.ConfigError) as info:
    common.apply_overrides(config, [item])
    common.validate_config(module, config)
  message = str(info.value)
  assert f"--config.{key}=" in message, message  # names the key, then the value
  assert "\n" not in message
  assert ("allowed" in message or "expected" in message or "must" in message), message
  del value


@pytest.mark.parametrize("name", experiments.list_experiments())
def test_default_and_tiny_configs_are_valid(name):
  module = experiments.get_experiment(name)
  for tiny in (False, True):
    common.validate_config(module, module.get_config(tiny=tiny))


@pytest.mark.parametrize("name", ["criteria_benchmark", "bench_criteria"])
def test_criteria_options_refuse_an_option_the_criterion_lacks(name):
  module = experiments.get_experiment(name)
  config = module.get_config(tiny=True)
  config.criteria_options.corruption_pga = {"stepz": 2}
  with pytest.raises(errors.ConfigError, match=r"^--config.criteria_options.corruption_pga=.*"
                     r"\(unknown options \['stepz'\]\); allowed: options of corruption_pga: "
                     r"\[.*'setting', 'step_size', 'steps'"):
    common.validate_config(module, config)


def test_flags_are_named_and_literal_errors_name_the_key():
  module = experiments.get_experiment("sensitivity")
  config = module.get_config(tiny=True)
  config.seed = -1
  with pytest.raises(errors.ConfigError, match=r"^--seed=-1 is not allowed; allowed: an integer"):
    common.validate_config(module, config, {"seed": "--seed"})
  with pytest.raises(errors.ConfigError, match=r"--config.quantize=\(8,4: expected a tuple"):
    common.apply_overrides(module.get_config(tiny=True), ["quantize=(8,4"])
  config = module.get_config(tiny=True)
  common.apply_overrides(config, ["families=quantize,prune", "seeds=[3, 4]"])
  assert config.families == ("quantize", "prune") and config.seeds == (3, 4)
  common.validate_config(module, config)


def _parallel(commands, env, timeout=240):
  procs = [subprocess.Popen([sys.executable, "launch.py", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for args in commands]
  return [(p.wait(timeout=timeout), *p.communicate()) for p in procs]


def _cpu_env(cache, **extra):
  return dict(os.environ, SAFER_JAX_CACHE=str(cache), JAX_PLATFORMS="cpu", **extra)


@pytest.mark.integration
def test_bad_values_through_launch_one_error_line_nothing_written(tmp_path, zoo_cache):
  """A few cases end to end (the rest are in-process above), in parallel to save time."""
  afile = tmp_path / "afile"
  afile.write_text("x")
  work = tmp_path / "work"
  common_args = ["--tiny", f"--workdir={work}", "--config.progress=False"]
  cases = [
      (["--experiment=sensitivity", "--config.seeds=()"], "--config.seeds=() is not allowed"),
      (["--experiment=prune_sweep", "--config.targets=(0.5,1.5)"], "1.5 is not a number in"),
      (["--experiment=train", "--seed=-1"], "--seed=-1"),
      # Found by the zoo (the cache may hold the entry): before training; the folder is removed.
      (["--experiment=train", f"--cache_dir={afile}/cache", "--model=lenet"], "not writable"),
  ]
  results = _parallel([common_args + args for args, _ in cases] + [["--experiment=help"]],
                      _cpu_env(zoo_cache))
  for (args, needle), (rc, out, err) in zip(cases, results):
    errors_ = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2, (args, rc, err[-2000:])
    assert len(errors_) == 1 and needle in errors_[0], (args, err[-2000:])
    assert "Traceback" not in err, (args, err[-2000:])
  assert not work.exists()  # nothing written, not even the results folder
  rc, out, err = results[-1]
  assert rc == 0, err[-2000:]
  for name in experiments.list_experiments():
    assert f"\n  {name} " in out
  assert len(out.strip().splitlines()) == len(experiments.list_experiments()) + 1


def test_launch_checks_the_workdir_and_lists_experiments(tmp_path):
  import launch  # pylint: disable=import-outside-toplevel
  (tmp_path / "afile").write_text("x")
  with pytest.raises(errors.ConfigError, match=r"--workdir=w is not writable.*Not a directory"):
    launch.check_writable(str(tmp_path / "afile" / "w" / "train"), "--workdir=w")
  created = launch.check_writable(str(tmp_path / "a" / "b"), "--workdir=a")
  assert created == [str(tmp_path / "a" / "b"), str(tmp_path / "a")]
  launch.remove_if_empty(created)
  assert os.listdir(tmp_path) == ["afile"]
  listing = launch.list_experiments().splitlines()
  assert len(listing) == len(experiments.list_experiments()) + 1
  assert all(len(line.split()) > 2 for line in listing[1:])  # a name and a description


# ---------------------------------------------------------------------------
# Library functions refuse empty data, zero batch sizes and NaN weights.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlp(digits):
  net = models.get_model("mlp")
  return net, train.init_variables(net, digits.input_shape, 0)


def test_evaluate_refuses_non_finite_weights_naming_the_leaf(mlp, digits):
  net, variables = mlp
  bad = layers.replace_kernel(variables, "dense2/fc",
                              layers.get_kernel(variables, "dense2/fc").at[0, 1].set(jnp.inf))
  with pytest.raises(ValueError, match=r"\['dense2'\]\['fc'\]\['kernel'\] holds NaN or inf"):
    train.evaluate(net.apply, bad, digits.eval)
  assert train.evaluate(net.apply, bad, digits.eval, check_finite=False)["num_examples"] > 0
  with pytest.raises(ValueError, match="Checkpoint leaf .*dense2"):
    zoo.cache.check_finite(bad)
  with pytest.raises(ValueError, match="dense2.*NaN or inf"):
    layers.check_finite(bad)


def test_empty_data_and_zero_batch_sizes_are_refused(mlp, digits):
  net, variables = mlp
  with pytest.raises(ValueError, match="must be an integer >= 0"):
    digits.eval.take(-5)
  with pytest.raises(ValueError, match="eval_batch_size=0"):
    sweep.run_sweep(net, variables, digits.eval.take(8),
                    sweep.SweepConfig(families={"quantize": (4,)}, eval_batch_size=0),
                    progress=False)
  with pytest.raises(ValueError, match="non-empty"):
    sweep.run_sweep(net, variables, digits.eval.take(0),
                    sweep.SweepConfig(families={"quantize": (4,)}), progress=False)
  empty = dataclasses.replace(digits, train=digits.train.take(0))
  with pytest.raises(ValueError, match="empty training split"):
    train.train(net, empty, train.TrainConfig(epochs=1), progress=False)
  with pytest.raises(ValueError, match="no examples"):
    mixed_precision.fisher_diagonal(lambda p, b: 0.0, variables["params"],
                                    [digits.train.take(0).as_batch() | {}], ["head/fc"])


# ---------------------------------------------------------------------------
# Zoo cache: one trainer per entry, the others wait; stale locks; read-only cache.
# ---------------------------------------------------------------------------

TINY = train.TrainConfig(epochs=1)


@pytest.mark.integration
def test_three_processes_on_an_empty_cache_train_once(tmp_path):
  cache = tmp_path / "cache"
  commands = [["--experiment=train", "--tiny", f"--workdir={tmp_path / 'a'}"],
              ["--experiment=sensitivity", "--tiny", f"--workdir={tmp_path / 'b'}",
               "--config.families=quantize"],
              ["--experiment=train", "--tiny", f"--workdir={tmp_path / 'c'}"]]
  results = _parallel([c + ["--config.progress=False"] for c in commands], _cpu_env(cache))
  for rc, out, err in results:
    assert rc == 0, err[-3000:]
    assert "Traceback" not in err
  restored = [json.load(open(tmp_path / w / "train" / "mlp" / "metrics.json"))["rows"][0]
              for w in ("a", "c")]
  assert restored[0]["accuracy"] == restored[1]["accuracy"]
  everything = [f for _, _, files in os.walk(cache) for f in files] + [
      d for _, dirs, _ in os.walk(cache) for d in dirs]
  assert not [f for f in everything if "tmp" in f or f.endswith(".lock") or "stale" in f]
  entries = os.listdir(cache)
  assert len(entries) == 1, entries
  # At most one of the train runs trained (the sensitivity run may have); the other restored.
  outputs = "".join(out for _, out, _ in results)
  assert outputs.count("(trained in") <= 1 and outputs.count("(restored in") >= 1


def test_lock_waits_for_the_holder_then_restores(tmp_path, digits, monkeypatch, capsys):
  entry = zoo.pretrained("mlp", digits, cache_dir=str(tmp_path), config=TINY, progress=False)
  lock = zoo.cache.EntryLock(entry.path, "mlp")
  saved = tmp_path / "saved"
  os.rename(entry.path, saved)  # the entry is "being trained" by the lock holder
  assert lock.try_acquire()

  def finish():
    time.sleep(1.0)
    os.rename(saved, entry.path)
    lock.release()

  threading.Thread(target=finish).start()
  monkeypatch.setattr(train, "train", lambda *a, **k: pytest.fail("trained again"))
  again = zoo.pretrained("mlp", digits, cache_dir=str(tmp_path), config=TINY, progress=False)
  assert again.restored
  assert "zoo: waiting for process" in capsys.readouterr().out
  assert not os.path.exists(lock.path)


def test_stale_lock_of_a_dead_process_is_broken(tmp_path, digits):
  path = os.path.join(str(tmp_path), "entry")
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  import socket  # pylint: disable=import-outside-toplevel
  with open(path + ".lock", "w", encoding="utf-8") as f:
    json.dump({"pid": int(dead.stdout), "host": socket.gethostname(), "time": 0,
               "token": "old"}, f)
  lock = zoo.cache.EntryLock(path, "x")
  assert not lock.try_acquire()
  assert lock.acquire() is False  # broken at once, never waited
  assert json.load(open(lock.path))["token"] == lock.token
  lock.release()
  # Silent for longer than the stale timeout (another host, or a hung process): broken too.
  with open(path + ".lock", "w", encoding="utf-8") as f:
    json.dump({"pid": 1, "host": "elsewhere", "time": 0, "token": "old"}, f)
  os.utime(path + ".lock", (0, 0))
  other = zoo.cache.EntryLock(path, "x", stale_seconds=5)
  other.acquire()
  other.release()
  assert os.listdir(tmp_path) == []
  del digits


def test_unwritable_cache_is_refused_before_training(tmp_path, digits, monkeypatch):
  (tmp_path / "file").write_text("x")
  monkeypatch.setattr(train, "train", lambda *a, **k: pytest.fail("trained"))
  with pytest.raises(errors.ConfigError, match="zoo cache .* is not writable"):
    zoo.pretrained("mlp", digits, cache_dir=str(tmp_path / "file" / "cache"), config=TINY)
  real_open = os.open

  def read_only(path, flags, *args):
    if str(path).endswith(".lock"):
      raise PermissionError(13, "Permission denied")
    return real_open(path, flags, *args)

  monkeypatch.setattr(os, "open", read_only)
  with pytest.raises(errors.ConfigError, match="Permission denied"):
    zoo.pretrained("mlp", digits, cache_dir=str(tmp_path / "ro"), config=TINY)


# ---------------------------------------------------------------------------
# Results: umask, resume byte-identity and its summary, Ctrl-C, per-model folders.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_result_files_honour_the_umask(tmp_path, umask, mode):
  old = os.umask(umask)
  try:
    for path in (io.write_text(str(tmp_path / "a.md"), "# x\n"),
                 io.write_json(str(tmp_path / "a.json"), {"a": 1}),
                 io.write_csv(str(tmp_path / "a.csv"), pd.DataFrame({"a": [1.5]}))):
      assert os.stat(path).st_mode & 0o777 == mode, path
  finally:
    os.umask(old)
  assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


class _Killed(BaseException):
  """Stands for SIGKILL: nothing runs after it (no interrupt handler, no final save)."""


SMALL = sweep.SweepConfig(families={"quantize": (8, 2), "noise": (0.5,)}, seeds=(0, 1),
                          max_parallel=4)


def _kill_after(monkeypatch, calls, exc):
  original = sweep.Engine.evaluate_kernels
  count = {"n": 0}

  def flaky(self, layer, kernels):
    count["n"] += 1
    if count["n"] == calls:
      raise exc
    return original(self, layer, kernels)

  monkeypatch.setattr(sweep.Engine, "evaluate_kernels", flaky)
  return original


def test_resume_after_kill_is_byte_identical_and_counts_reused(tmp_path, mlp, digits,
                                                               monkeypatch):
  net, variables = mlp
  split = digits.eval.take(64)
  config = dataclasses.replace(SMALL, workers=1)
  whole = str(tmp_path / "whole.csv")
  table = sweep.run_sweep(net, variables, split, config, progress=False, results_path=whole)
  assert table.attrs["reused_cells"] == 0 and table.attrs["computed_cells"] == len(table)
  path = str(tmp_path / "resumed.csv")
  original = _kill_after(monkeypatch, 3, _Killed())  # baseline + first layer, then killed
  with pytest.raises(_Killed):
    sweep.run_sweep(net, variables, split, config, progress=False, results_path=path)
  partial = len(pd.read_csv(path))
  assert 0 < partial < len(table)
  monkeypatch.setattr(sweep.Engine, "evaluate_kernels", original)
  resumed = sweep.run_sweep(net, variables, split, config, progress=False, results_path=path)
  assert open(path, "rb").read() == open(whole, "rb").read()
  assert resumed.attrs["reused_cells"] == partial
  assert resumed.attrs["computed_cells"] == len(table) - partial
  from experiments import sensitivity  # pylint: disable=import-outside-toplevel
  assert sensitivity.cells_summary(resumed) == (
      f"{len(table) - partial} computed, {partial} reused from table.csv")


def test_ctrl_c_saves_finished_layers_and_says_so(tmp_path, mlp, digits, monkeypatch):
  net, variables = mlp
  path = str(tmp_path / "table.csv")
  _kill_after(monkeypatch, 3, KeyboardInterrupt())
  with pytest.raises(errors.Interrupted) as info:
    sweep.run_sweep(net, variables, digits.eval.take(64), dataclasses.replace(SMALL, workers=1),
                    progress=False, results_path=path)
  assert isinstance(info.value, KeyboardInterrupt)
  assert info.value.saved == len(pd.read_csv(path)) > 0 and info.value.path == path
  saved = info.value.saved
  assert str(info.value) == f"interrupted: {saved} cells saved in {path}; rerun to resume"


def test_ctrl_c_dropped_inside_a_gc_callback_still_interrupts(monkeypatch):
  # Python drops an exception raised in a garbage-collection callback (jax registers one) as
  # "unraisable": a Ctrl-C landing there let launch.py run to the end with status 0.
  import gc  # pylint: disable=import-outside-toplevel
  import launch  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # restored after the test
  launch.redeliver_swallowed_interrupts()
  fired = []

  def callback(phase, info):
    del info
    if phase == "start" and not fired:
      fired.append(phase)
      raise KeyboardInterrupt

  previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # xdist workers ignore it
  gc.callbacks.append(callback)
  try:
    with pytest.raises(KeyboardInterrupt):
      gc.collect()
      threading.Event().wait(5)  # the redelivered SIGINT ends this wait within ~10 ms
  finally:
    gc.callbacks.remove(callback)
    signal.signal(signal.SIGINT, previous)
  assert fired


@pytest.mark.integration
def test_ctrl_c_through_launch_is_one_line_and_status_130(tmp_path, zoo_cache):
  grid = lambda lo, hi: str(tuple(np.round(np.linspace(lo, hi, 24), 5).tolist()))  # noqa: E731
  # lenet, 4 layers x 48 magnitudes x 8 seeds: the first layer is saved early and most of the
  # sweep is still to run, so the interrupt lands mid-sweep (on the 3-layer mlp, two layers
  # run at once and the rest could finish before the signal).
  table = tmp_path / "sensitivity" / "lenet" / "table.csv"
  args = [sys.executable, "launch.py", "--experiment=sensitivity", "--tiny", "--model=lenet",
          f"--workdir={tmp_path}", "--config.progress=False", "--config.eval_examples=0",
          f"--config.noise={grid(0.01, 2.0)}", f"--config.bitflip={grid(1e-4, 0.05)}",
          f"--config.seeds={tuple(range(8))}", "--config.act_quantize=()"]
  # SIGINT back to its default in the child: a process started while SIGINT is ignored
  # inherits the ignore, and Python then installs no KeyboardInterrupt handler (in the full
  # suite under pytest-xdist this launch ran to the end, rc 0, untouched by the signal).
  proc = subprocess.Popen(args, cwd=ROOT, env=_cpu_env(zoo_cache), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  deadline = time.monotonic() + 120
  while not table.exists() and proc.poll() is None and time.monotonic() < deadline:
    time.sleep(0.02)  # until the first finished layer is saved
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, (out[-2000:], err[-3000:])
  lines = [line for line in err.splitlines() if line.startswith("interrupted:")]
  assert len(lines) == 1, err[-3000:]
  assert "Traceback" not in err
  saved = len(pd.read_csv(table))
  assert lines[0] == f"interrupted: {saved} cells saved in {table}; rerun to resume"


def test_results_per_model_and_one_report_for_all(tmp_path):
  import launch  # pylint: disable=import-outside-toplevel
  from safer_jax.report import markdown  # pylint: disable=import-outside-toplevel
  sens = experiments.get_experiment("sensitivity")
  dirs = []
  for model in ("mlp", "lenet", "resnet"):
    config = sens.get_config(tiny=True)
    config.model = model
    dirs.append(launch.results_dir(str(tmp_path), "sensitivity", sens, config))
  assert [os.path.relpath(d, tmp_path) for d in dirs] == [
      "sensitivity/mlp", "sensitivity/lenet", "sensitivity/resnet8"]
  bench = experiments.get_experiment("criteria_benchmark")
  assert launch.results_dir(str(tmp_path), "criteria_benchmark", bench,
                            bench.get_config(tiny=True)) == str(tmp_path / "criteria_benchmark")
  for d in dirs[:2]:
    io.write_text(os.path.join(d, "summary.md"), f"# sensitivity: {os.path.basename(d)}\n")
  io.write_text(str(tmp_path / "criteria_benchmark" / "agreement.md"), "# agreement\n")
  io.write_csv(str(tmp_path / "criteria_benchmark" / "mlp" / "sweep.csv"),
               pd.DataFrame({"a": [1]}))
  md = open(markdown.build_report(str(tmp_path))["md"]).read()
  assert "### sensitivity / mlp" in md and "### sensitivity / lenet" in md
  assert "#### sensitivity: mlp" in md and "### agreement" in md
  assert "criteria_benchmark / mlp" not in md  # no summary or figure there


# ---------------------------------------------------------------------------
# Plots: titles never overprint, many layers stay distinguishable, bars dodge.
# ---------------------------------------------------------------------------


def _capture(monkeypatch):
  figures = []
  monkeypatch.setattr(io, "save_figure", lambda path, fig: figures.append(fig) or path)
  return figures


def _overlap(a, b) -> bool:
  return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def _table(n_layers):
  rows = []
  for li in range(n_layers):
    for family, grid in (("quantize", (8, 4, 2)), ("noise", (0.1, 1.0))):
      for mi, m in enumerate(grid):
        for s in (0, 1):
          rows.append({"layer": f"stage{li}/conv", "family": family, "magnitude": m,
                       "magnitude_index": mi, "seed": s, "accuracy": 0.9 - 0.01 * li * mi,
                       "accuracy_drop": 0.01 * li * mi})
  return pd.DataFrame(rows)


@pytest.mark.parametrize("kind", ["heatmap", "lines"])
def test_figure_title_does_not_overprint_panel_titles(kind, monkeypatch):
  from safer_jax.report import plots  # pylint: disable=import-outside-toplevel
  figures = _capture(monkeypatch)
  fn = plots.sensitivity_heatmap if kind == "heatmap" else plots.sensitivity_lines
  fn(_table(12), "unused.png", title="a long figure title " * 3)
  fig = figures[0]
  fig.canvas.draw()
  renderer = fig.canvas.get_renderer()
  top = fig._suptitle.get_window_extent(renderer)  # pylint: disable=protected-access
  for ax in fig.axes:
    if ax.get_title():
      assert not _overlap(top, ax.title.get_window_extent(renderer)), ax.get_title()


def test_many_layers_get_distinct_styles():
  from safer_jax.report import plots  # pylint: disable=import-outside-toplevel
  for n in (3, 10, 15, 20, 40):
    styles = plots.layer_styles(n)
    keys = {(tuple(s["color"]), s.get("ls", "-"), s.get("marker")) for s in styles}
    assert len(keys) == n
    if n <= 20:
      assert len({tuple(s["color"]) for s in styles}) == n


def test_metrics_error_bars_are_dodged(monkeypatch):
  from experiments import attribution_preservation as ap  # pylint: disable=import-outside-toplevel
  figures = _capture(monkeypatch)
  rows = [{"label": label, "variant": v, "accuracy": 0.9, "spearman_mean": 0.5,
           "spearman_std": 0.1, "iou_mean": 0.5, "iou_std": 0.1, "cosine_mean": 0.5,
           "cosine_std": 0.1} for label in ("a", "b") for v in ap.VARIANTS]
  ap.plot_metrics(pd.DataFrame(rows), {"accuracy": 0.95}, "unused.png")
  ax = figures[0].axes[1]
  xs = [tuple(np.round(line.get_xdata(), 6)) for line in ax.get_lines() if len(line.get_xdata())
        == 2 and line.get_linestyle() != "None"]
  assert len(set(xs)) == len(ap.VARIANTS), xs
