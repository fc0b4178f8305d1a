"""``launch.py --distributed`` over two processes (2 CPU devices each, gloo).

Process 0 alone trains and saves the zoo model and writes the results; the table
is the one a single process writes after restoring that checkpoint. (The
library under two processes -- eval, criteria, the sweep -- is tests/test_distributed.py.)
"""

import glob
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from local_cluster import ROOT, cpu_env, free_port, run_processes


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
  port = free_port()
  # Trains (process 0 alone, its variables broadcast to process 1) and saves the zoo model.
  run_processes([_launch(tmp_path, f"dist{i}", True, port, i) for i in range(2)],
                _env(tmp_path, devices=2))
  checkpoints = glob.glob(str(tmp_path / "cache" / "mlp-digits-*"))
  assert len(checkpoints) == 1, os.listdir(tmp_path / "cache")
  stamp = os.path.getmtime(os.path.join(checkpoints[0], "0", "_CHECKPOINT_METADATA"))
  assert os.path.exists(tmp_path / "dist0" / "sensitivity" / "mlp" / "table.csv")
  assert not os.path.exists(tmp_path / "dist1")  # Only process 0 writes results.
  # One process, one device, restoring the checkpoint saved under jax.distributed.
  out = subprocess.run(_launch(tmp_path, "single", False), cwd=ROOT, env=_env(tmp_path, None),
                       capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-4000:]
  assert "retraining" not in out.stdout + out.stderr
  # Restored, not rewritten.
  assert os.path.getmtime(os.path.join(checkpoints[0], "0", "_CHECKPOINT_METADATA")) == stamp
  assert os.listdir(tmp_path / "cache") == [os.path.basename(checkpoints[0])]
  want = pd.read_csv(tmp_path / "single" / "sensitivity" / "mlp" / "table.csv")
  got = pd.read_csv(tmp_path / "dist0" / "sensitivity" / "mlp" / "table.csv")
  assert len(got) == len(want) == 24
  numbers = ["accuracy", "loss", "accuracy_drop", "loss_increase"]
  pd.testing.assert_frame_equal(got.drop(columns=numbers), want.drop(columns=numbers))
  np.testing.assert_array_equal(got["accuracy"], want["accuracy"])
  np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
