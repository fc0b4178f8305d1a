"""End-to-end tests of launch.py and the experiment registry."""

import json
import os

import ml_collections
import pytest

import experiments
from experiments import common


def test_unknown_experiment_lists_valid_ones(tmp_path, launch):
  out = launch(["--experiment=nope", f"--workdir={tmp_path}"], str(tmp_path))
  assert out.returncode == 2
  assert "Unknown experiment 'nope'" in out.stderr and "train" in out.stderr


def test_registry_error():
  with pytest.raises(ValueError, match="valid experiments"):
    experiments.get_experiment("nope")


def test_config_overrides():
  config = common.base_config(bits=(8, 4), lr=0.1, names=("a",),
                              search=ml_collections.ConfigDict({"evals": 8}))
  common.apply_overrides(config, ["bits=(6,2)", "lr=1", "model=lenet", "seed=3", "names=b,c",
                                  "search.evals=2", "max_train=100", "checkpoint=x.npz"])
  assert config.bits == (6, 2) and config.lr == 1.0 and config.model == "lenet"
  assert config.seed == 3 and config.names == ("b", "c") and config.search.evals == 2
  assert config.max_train == 100 and config.checkpoint == "x.npz"  # None placeholders
  common.apply_overrides(config, ["max_train=None", "bits=4", "names=()"])
  assert config.max_train is None and config.bits == (4,) and config.names == ()
  with pytest.raises(ValueError, match="Unknown config key 'nope'"):
    common.apply_overrides(config, ["nope=1"])
  with pytest.raises(ValueError, match=r"Unknown config key 'search.nope'.*\['evals'\]"):
    common.apply_overrides(config, ["search.nope=1"])
  with pytest.raises(ValueError, match=r"^flag --config.seed=abc: expected an integer"):
    common.apply_overrides(config, ["seed=abc"])
  with pytest.raises(ValueError, match=r"--config.bits=\(8,4: expected a tuple"):
    common.apply_overrides(config, ["bits=(8,4"])
  with pytest.raises(ValueError, match="key=value"):
    common.apply_overrides(config, ["seed"])
  assert config.is_locked  # lock_config=True: no new keys


def test_old_config_spelling_becomes_config_dot_flags():
  argv = ["launch.py", "--config", "seed=3", "--config=acr.eps=0.1", "--config.lr=2", "--tiny"]
  assert common.legacy_overrides(argv) == ["launch.py", "--config.seed=3",
                                           "--config.acr.eps=0.1", "--config.lr=2", "--tiny"]
  assert common.override_keys(common.legacy_overrides(argv)) == ["seed", "acr.eps", "lr"]


def test_unknown_or_mistyped_config_key_through_launch(tmp_path, launch):
  out = launch(["--experiment=quant_sweep", "--tiny", f"--workdir={tmp_path}",
                "--config.search.nope=1"])
  assert out.returncode == 2 and "Traceback" not in out.stderr
  assert out.stderr.strip() == ("error: Unknown config key 'search.nope' (--config.search.nope); "
                                "valid keys in search: ['batch', 'evals', 'examples']")
  out = launch(["--experiment=quant_sweep", "--tiny", f"--workdir={tmp_path}",
                "--config", "group_size=abc"])  # the old spelling: the same typed flag
  assert out.returncode == 2
  assert out.stderr.strip() == "error: flag --config.group_size=abc: expected an integer (or None)"
  assert not os.listdir(tmp_path)


def test_config_flag_without_a_key_is_one_error_line(capsys):
  """``--config.=5`` (no key): one ``error:`` line and status 2, not ml_collections' traceback."""
  import launch  # pylint: disable=import-outside-toplevel
  with pytest.raises(SystemExit) as stop:
    launch.parse_flags(["launch.py", "--experiment=quant_sweep", "--config.=5"])
  assert stop.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("error: Unknown config key '' (--config.); valid keys: ['act_bits', ")
  assert err.count("\n") == 1
  config = experiments.get_experiment("quant_sweep").get_config(tiny=True)
  with pytest.raises(ValueError, match=r"Unknown config key '' \(--config\.\)"):
    common.apply_overrides(config, ["=5"])


def test_help_lists_the_chosen_experiments_config_keys(tmp_path, launch):
  out = launch(["--experiment=quant_sweep", "--tiny", "--help"], str(tmp_path))
  assert out.returncode in (0, 1), out.stderr[-2000:]  # (absl's --help exits with 1)
  help_text = out.stdout
  assert "--config: The experiment's config" in help_text
  for line in ("budgets=(3.0, 6.0)", "model=mlp", "search.evals=", "group_size=None"):
    assert f"\n    {line}" in help_text, line  # the tiny setting's defaults, nested keys dotted
  assert "!!python/tuple" not in help_text  # not absl's YAML dump of the default
  config = experiments.get_experiment("quant_sweep").get_config(tiny=True)
  assert common.config_keys(config)[:2] == ["act_bits=8", "budget_unit=bits"]


@pytest.mark.parametrize("name", experiments.list_experiments())
def test_every_experiment_has_a_tiny_config(name):
  module = experiments.get_experiment(name)
  config = module.get_config(tiny=True)
  assert "model" in config and "dataset" in config


# train, sensitivity and quant_sweep run in this process (conftest's tiny_experiment, as
# launch.py runs them); launch.py's own success path is covered by bench_sweep and
# bench_devices below (subprocesses: they clear JAX's caches, or need 2 devices) and by
# tests/test_distributed_launch.py.


def test_train_experiment_writes_files(tiny_experiment):
  work = tiny_experiment("train")
  metrics = json.load(open(work / "metrics.json"))
  assert metrics["rows"][0]["model"] == "mlp"
  assert metrics["rows"][0]["accuracy"] > 0.9


def test_sensitivity_experiment_writes_table_and_plots(tiny_experiment):
  work = tiny_experiment("sensitivity")
  for name in ("table.csv", "summary.csv", "importance.csv", "meta.json", "heatmap.png",
               "lines.png"):
    assert (work / name).stat().st_size > 0, name
  import pandas as pd
  table = pd.read_csv(work / "table.csv")
  assert set(table.family) == {"quantize", "prune", "bitflip", "noise"}
  assert set(table.layer) == {"dense1/fc", "dense2/fc", "head/fc"}
  # activations: each layer's input at 8 and 2 bits, in their own file and in the importance
  acts = pd.read_csv(work / "act_table.csv")
  assert set(acts.family) == {"act_quantize"} and len(acts) == 3 * 2
  assert "act_quantize" in pd.read_csv(work / "importance.csv").columns
  # a second run resumes: nothing left to compute, same table.
  assert tiny_experiment("sensitivity") == work
  pd.testing.assert_frame_equal(pd.read_csv(work / "table.csv"), table)


def test_bench_sweep_tiny_checks_equal_numbers(tmp_path, launch):
  out = launch(["--experiment=bench_sweep", "--tiny", f"--workdir={tmp_path}",
                 "--config.progress=False"])
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.load(open(tmp_path / "bench_sweep" / "mlp" / "bench.json"))
  assert result["same_numbers"] is True
  assert result["speedup_warm"] > 0 and result["cells"] > 0
  # The FLOP ratio against a hand count: the tiny mlp is 64 -> 128 -> 64 -> 10, so a copy
  # perturbed at dense1 re-runs all 8192 + 8192 + 640 multiply-adds per image, at dense2 the
  # last 8832, at the head 640 (elementwise ops add a little).
  fractions = result["per_copy_flop_fraction"]
  expected = {"dense1/fc": 1.0, "dense2/fc": 8832 / 17024, "head/fc": 640 / 17024}
  assert set(fractions) == set(expected)
  for layer, value in expected.items():
    assert abs(fractions[layer] - value) < 0.03, (layer, fractions[layer], value)
  assert abs(result["flop_ratio"] - 3 / sum(fractions.values())) < 1e-6


def test_bench_devices_tiny_same_table_on_1_and_2_devices(tmp_path, launch):
  out = launch(["--experiment=bench_devices", "--tiny", f"--workdir={tmp_path}",
                "--config.progress=False"])
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.load(open(tmp_path / "bench_devices" / "mlp" / "devices.json"))
  assert result["same_table"] is True
  assert [r["devices"] for r in result["rows"]] == [1, 2]


def test_quant_sweep_tiny_end_to_end(tiny_experiment):
  import pandas as pd
  work = tiny_experiment("quant_sweep")
  results = pd.read_csv(work / "results.csv")
  assert set(results.source) == {"oracle", "quant_error", "fisher", "uniform", "random",
                                 "searched"}
  assert (results.avg_bits <= results.budget_avg_bits + 1e-9).all()
  # the interaction-aware search: its evaluations, its file, the interaction figure
  searched = results[results.source == "searched"]
  assert len(searched) == 2 and (searched.search_evals <= 24).all()
  found = json.load(open(work / "search.json"))
  assert [b["budget_avg_bits"] for b in found["budgets"]] == [3.0, 6.0]
  assert all(b["calib_loss"] <= b["best_start_calib_loss"] for b in found["budgets"])
  assert (work / "interactions.png").stat().st_size > 0
  assert len(pd.read_csv(work / "interactions.csv")) == 3  # 3 layers: 3 pairs
  assert (work / "accuracy_vs_bits.png").stat().st_size > 0
  assert "At 3 bits average" in (work / "summary.md").read_text()
  # deployed through qwix: the same accuracy as the simulated model, rules that round-trip.
  assert (abs(results.qwix_accuracy - results.accuracy) * 128 <= 1 + 1e-6).all()
  from safer_jax.budgeting import deploy
  rules = json.load(open(work / "qwix_rules.json"))
  for row in results.itertuples():
    label = row.source if row.seed < 0 else f"{row.source}_seed{row.seed}"
    bits = json.loads(row.bits)
    assert deploy.from_qwix_rules(rules[label][f"{row.budget_avg_bits:g}"], list(bits)) == bits



def test_quant_sweep_bops_budget(tmp_path, zoo_cache):
  """A BOPs budget (in process): weight bits per MAC within the budget, BOPs as counted."""
  from experiments import quant_sweep
  from safer_jax.budgeting import budget
  from safer_jax.core import layers
  from safer_jax import zoo
  config = quant_sweep.get_config(tiny=True)
  config.update(budget_unit="bops", sources=("fisher",), qwix=False, progress=False,
                cache_dir=str(zoo_cache))
  results = quant_sweep.run(config, str(tmp_path))["results"]
  assert (results.avg_bits_per_mac <= results.budget_avg_bits + 1e-9).all()
  assert set(results.budget_unit) == {"bops"}
  entry = zoo.pretrained("mlp", cache_dir=str(zoo_cache), progress=False)
  macs = layers.macs_per_layer(entry.model.apply, entry.variables,
                               entry.dataset.eval.images[:1])
  for row in results.itertuples():
    assert row.bops == budget.bops(json.loads(row.bits), macs, config.act_bits)


def test_quant_sweep_rejects_bad_bits(tmp_path, launch):
  out = launch(["--experiment=quant_sweep", "--tiny", f"--workdir={tmp_path}",
                 "--config.candidates=(0,4)"])
  assert out.returncode == 2 and "candidates=(0, 4)" in out.stderr and "1..16" in out.stderr
  assert not (tmp_path / "quant_sweep" / "mlp" / "results.csv").exists()


def test_bad_input_is_one_error_line_not_a_traceback(tmp_path, launch):
  out = launch(["--experiment=sensitivity", "--tiny", f"--workdir={tmp_path}",
                "--config.progress=False", "--config.memory_budget_gb=0.00001"])
  assert out.returncode == 2
  assert "error: memory budget 10000 bytes" in out.stderr and "is too small" in out.stderr
  assert "Traceback" not in out.stderr
  assert not (tmp_path / "sensitivity" / "mlp" / "table.csv").exists()


def test_bench_criteria_tiny_writes_its_table(tmp_path, zoo_cache):
  """In-process: every criterion at its default timed against the sweep, its full rho interval."""
  import json
  from experiments import bench_criteria
  config = bench_criteria.get_config(tiny=True)
  config.cache_dir = zoo_cache
  config.progress = False
  config.criteria = ("fisher", "hessian_trace", "quant_error")
  config.trace_probes = 4
  config.families = ("quantize", "noise")
  out = bench_criteria.run(config, str(tmp_path))
  result = json.load(open(out["paths"]["json"]))
  m = result["models"]["mlp"]
  assert m["sweep_seconds"] > 0 and m["sweep_seconds_cold"] > 0
  assert set(m["criteria"]) == {"fisher", "hessian_trace", "quant_error"}
  # The expensive criteria also ran at their full setting; quant_error has one setting.
  assert set(n for n, r in m["criteria"].items() if "full" in r) == {"fisher", "hessian_trace"}
  for name, r in m["criteria"].items():
    assert r["needs_data"] == (name != "quant_error")
    assert r["fraction_of_sweep"] == r["seconds"] / m["sweep_seconds"]
    assert r["fraction_of_sweep_cold"] == r["seconds_cold"] / m["sweep_seconds_cold"]
    assert set(r["spearman_vs_truth"]) == set(config.families)
    ref = r.get("full", r)["spearman_vs_truth"]
    assert r["within_full_ci"] == {f: ref[f]["lo"] <= x["rho"] <= ref[f]["hi"]
                                   for f, x in r["spearman_vs_truth"].items()}
  assert m["max_fraction"] == max(r["fraction_of_sweep"] for r in m["criteria"].values()
                                  if r["needs_data"])
  assert m["per_probe"] == {}  # the MLP has no conv layer
  assert result["targets_met"]["per_probe_vs_reference"] is None
  md = open(out["paths"]["md"]).read()
  assert "| fisher |" in md and "| quant_error (data-free) |" in md and "## mlp on digits" in md
