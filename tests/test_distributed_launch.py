"""Two processes (jax.distributed, 2 CPU devices each, gloo): the sweep and launch.py.

(a) ``launch.py --distributed`` trains and saves the zoo model once (process 0),
restores it on a second run, and writes the single-process table; (b) the
sweep engine spreads perturbed copies over the 4 devices of both processes and
returns the single-device table.
"""

import glob
import os
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

from local_cluster import ROOT, cpu_env, free_port, run_processes


WORKER = textwrap.dedent("""
    import sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from safer_jax import distributed
    distributed.initialize(f"localhost:{sys.argv[1]}", num_processes=2, process_id=int(sys.argv[2]))
    import numpy as np
    from jax.sharding import PartitionSpec as P
    from local_cluster import assert_same_sweep
    from safer_jax import data, models, sweep, train
    assert jax.process_count() == 2 and jax.device_count() == 4
    # Bit-exact broadcast (-0.0 stays -0.0) after a barrier.
    distributed.wait_for_all("test")
    mine = np.array([-0.0, 1.5], np.float32) * (1 if distributed.is_primary() else 7)
    got = distributed.broadcast_from_primary({"x": mine})["x"]
    assert got.tobytes() == np.array([-0.0, 1.5], np.float32).tobytes(), got
    ds = data.load_dataset("digits")
    model = models.get_model("lenet")
    # Committed to one local device, as restored checkpoints are.
    variables = jax.device_put(train.init_variables(model, ds.input_shape, 0),
                               jax.local_devices()[0])
    split = ds.eval.take(96)
    config = sweep.SweepConfig(families={"quantize": (4, 2), "noise": (0.5,), "bitflip": (0.01,)},
                               seeds=(0, 1, 2), max_parallel=6)
    engine = sweep.Engine(model, variables, split, config)
    assert engine.num_devices == 4 and engine.step is None, engine.num_devices
    assert {d.process_index for d in engine.sharding.device_set} == {0, 1}
    seen = []  # Every array the engine shards over 'copies'.
    shard_batch = distributed.shard_batch
    def spy(*args, **kwargs):
      out = shard_batch(*args, **kwargs)
      seen.append(out)
      return out
    distributed.shard_batch = spy
    sharded = sweep.run_sweep(model, variables, split, config, progress=False)
    distributed.shard_batch = shard_batch
    split_over = [k for k in seen if k.sharding.spec == P("copies")]
    assert split_over and all(not k.is_fully_addressable for k in split_over)
    for k in split_over:  # Each process holds only its 2 devices' rows of the chunk.
      assert {d.process_index for d in k.sharding.device_set} == {0, 1}
      assert len(k.addressable_shards) == 2
      assert sum(s.data.shape[0] for s in k.addressable_shards) == k.shape[0] // 2
    single = sweep.run_sweep(model, variables, split,
                             sweep.SweepConfig(**{**config.__dict__, "shard": False}),
                             progress=False)
    assert_same_sweep(sharded, single, cells=4 * (2 + 3 + 3))
    print(f"process {sys.argv[2]} ok chunks={len(split_over)}", flush=True)
""")


def _env(tmp_path, devices: int | None) -> dict:
  return cpu_env(devices, SAFER_JAX_CACHE=str(tmp_path / "cache"),
                 SAFER_JAX_XLA_CACHE=str(tmp_path / "xla"))


def _launch(tmp_path, workdir: str, distributed: bool, port: int = 0, process_id: int = 0):
  cmd = [sys.executable, "launch.py", "--experiment=sensitivity", "--tiny",
         f"--workdir={tmp_path / workdir}", f"--cache_dir={tmp_path / 'cache'}", "--noxla_cache",
         "--config.progress=False"]
  if distributed:
    cmd += ["--distributed", f"--coordinator_address=localhost:{port}", "--num_processes=2",
            f"--process_id={process_id}"]
  return cmd


@pytest.mark.integration
def test_distributed_launch_writes_single_process_table_and_restores(tmp_path):
  env = _env(tmp_path, devices=2)

  def run(tag):
    port = free_port()
    return run_processes([_launch(tmp_path, f"{tag}{i}", True, port, i) for i in range(2)], env)

  run("first")  # Trains (process 0 alone) and saves the zoo model.
  checkpoints = glob.glob(str(tmp_path / "cache" / "mlp-digits-*"))
  assert len(checkpoints) == 1, os.listdir(tmp_path / "cache")
  stamp = os.path.getmtime(os.path.join(checkpoints[0], "0", "_CHECKPOINT_METADATA"))
  run("second")  # Restores it: the checkpoint is not rewritten.
  assert os.path.getmtime(os.path.join(checkpoints[0], "0", "_CHECKPOINT_METADATA")) == stamp
  assert os.listdir(tmp_path / "cache") == [os.path.basename(checkpoints[0])]
  for tag in ("first", "second"):  # Only process 0 writes results.
    assert os.path.exists(tmp_path / f"{tag}0" / "sensitivity" / "mlp" / "table.csv")
    assert not os.path.exists(tmp_path / f"{tag}1")
  # One process, one device, restoring the checkpoint saved under jax.distributed.
  out = subprocess.run(_launch(tmp_path, "single", False), cwd=ROOT, env=_env(tmp_path, None),
                       capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-4000:]
  assert "retraining" not in out.stdout + out.stderr
  want = pd.read_csv(tmp_path / "single" / "sensitivity" / "mlp" / "table.csv")
  for tag in ("first", "second"):
    got = pd.read_csv(tmp_path / f"{tag}0" / "sensitivity" / "mlp" / "table.csv")
    assert len(got) == len(want) == 24
    pd.testing.assert_frame_equal(got.drop(columns=["accuracy", "loss", "accuracy_drop",
                                                    "loss_increase"]),
                                  want.drop(columns=["accuracy", "loss", "accuracy_drop",
                                                     "loss_increase"]))
    np.testing.assert_array_equal(got["accuracy"], want["accuracy"])
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)


@pytest.mark.integration
def test_sweep_spreads_copies_over_both_processes(tmp_path):
  script = tmp_path / "worker.py"
  script.write_text(WORKER)
  port = str(free_port())
  outs = run_processes([[sys.executable, str(script), port, str(i)] for i in range(2)],
                        _env(tmp_path, devices=2))
  for i, out in enumerate(outs):
    assert f"process {i} ok" in out, out[-2000:]
