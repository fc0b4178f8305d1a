"""Helpers of the multi-device and multi-process tests: fake CPU devices, N local processes.

The subprocess scripts can ``from local_cluster import assert_same_sweep``: :func:`cpu_env`
puts this directory on their ``PYTHONPATH``.
"""

import os
import socket
import subprocess
import sys

import numpy as np

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


def cpu_env(devices: int | None = None, **extra: str) -> dict:
  """The environment of a CPU subprocess with ``devices`` fake devices (None: the default one)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([ROOT, TESTS]), **extra)
  # Only the suite's optimisation level (tests/conftest.py) carries over, then the device count.
  flags = [f for f in env.pop("XLA_FLAGS", "").split() if "backend_optimization_level" in f]
  if devices:
    flags.append(f"--xla_force_host_platform_device_count={devices}")
  if flags:
    env["XLA_FLAGS"] = " ".join(flags)
  return env


def run_script(script: str, devices: int, timeout: int = 600) -> str:
  """Runs Python ``script`` in a CPU subprocess with ``devices`` fake devices; returns stdout.

  Asserts the exit code is 0 (the message holds the stderr tail).
  """
  out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=cpu_env(devices),
                       capture_output=True, text=True, timeout=timeout, check=False)
  assert out.returncode == 0, out.stderr[-4000:]
  return out.stdout


def free_port() -> int:
  """A TCP port free on localhost now (for the jax.distributed coordinator)."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def run_processes(commands, env, timeout: int = 300) -> list[str]:
  """Runs ``commands[i]`` as process ``i`` in the repository root; returns their outputs.

  Asserts every exit code is 0 (the message holds that process's output tail); a
  process still running when another fails or times out is killed.
  """
  procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for cmd in commands]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=timeout)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"process {i}:\n{out[-4000:]}"
  return outs


def assert_same_sweep(sharded, single, cells: int) -> None:
  """Sharded and single-device sweep tables: ``cells`` rows, accuracy exact, loss to 1e-6."""
  assert len(sharded) == len(single) == cells
  np.testing.assert_array_equal(sharded["accuracy"].to_numpy(), single["accuracy"].to_numpy())
  np.testing.assert_allclose(sharded["loss"].to_numpy(), single["loss"].to_numpy(),
                             rtol=1e-6, atol=0)
