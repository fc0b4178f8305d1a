"""Helpers of the multi-process tests: run N local processes under jax.distributed on CPU."""

import os
import socket
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  """A TCP port free on localhost now (for the jax.distributed coordinator)."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def skip_without_collectives() -> None:
  import jax  # pylint: disable=import-outside-toplevel
  if not hasattr(jax.config, "jax_cpu_collectives_implementation"):
    pytest.skip("this jax has no CPU cross-process collectives "
                "(jax_cpu_collectives_implementation)")


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
