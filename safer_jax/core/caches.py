"""One registry of what safer_jax keeps compiled between calls, and :func:`clear_caches`.

Several modules memoise jitted functions, XLA programs or traced shapes keyed on
a model (the criteria's compiled functions, the sweep's programs, the memory
analyses, evaluation and initialisation, the task's output check). Each one
registers a function that forgets its entries; :func:`clear_caches`
(``safer_jax.clear_caches()``) calls them all, e.g. between models in one
process, so the executables and the models they hold can be freed. JAX's own
caches are left alone (``jax.clear_caches()`` empties those too).
"""

from __future__ import annotations

from collections.abc import Callable

_CLEARERS: list[Callable[[], None]] = []


def register(clear: Callable[[], None]) -> Callable[[], None]:
  """Adds ``clear`` (called with no arguments) to :func:`clear_caches`; returns it.

  Registering the same function again does nothing, so a module may be reloaded.
  """
  if clear not in _CLEARERS:
    _CLEARERS.append(clear)
  return clear


def clear_caches() -> None:
  """Forgets every compiled program and traced shape safer_jax keeps (all registered caches)."""
  for clear in list(_CLEARERS):
    clear()
