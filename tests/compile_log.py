"""Counting XLA compilations in a test (``jax.monitoring`` compile events).

The test session keeps a persistent XLA cache (conftest.py) that a program
compiled by any earlier test or worker is loaded from instead of compiled, and
a load emits no compile event. :func:`compile_log` switches that cache off while
it counts, so a count is the number of programs the code builds, whatever ran
before it.
"""

import collections
import contextlib

import jax
from jax.experimental.compilation_cache import compilation_cache

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def persistent_cache_off():
  """No persistent XLA cache (neither read nor written) inside the block."""
  enabled = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()  # is_cache_used() is latched: check the flag again
  try:
    yield
  finally:
    jax.config.update("jax_enable_compilation_cache", enabled)
    compilation_cache.reset_cache()


@contextlib.contextmanager
def compile_log():
  """``Counter`` of XLA compilations by jitted function name (``'jit(f)'``) while active.

  Counts JAX's compile events from every thread, with the persistent cache off
  (:func:`persistent_cache_off`): every program built inside counts.
  """
  counts = collections.Counter()

  def listener(event, seconds, **kwargs):
    del seconds
    if event == COMPILE_EVENT:
      counts[kwargs.get("fun_name", "")] += 1

  with persistent_cache_off():
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
      yield counts
    finally:
      jax.monitoring.unregister_event_duration_listener(listener)
