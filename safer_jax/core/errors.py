"""Error types shared by the library and ``launch.py``.

* :class:`ConfigError` — a value the user chose (a flag, a ``--config`` key, a
  path) is not allowed. ``launch.py`` prints it as one ``error:`` line and
  exits with status 2; any other exception is a bug and keeps its traceback.
  It is a ``ValueError``, so code catching ``ValueError`` keeps working.
* :class:`Interrupted` — Ctrl-C during a resumable computation, after the
  finished part was saved; ``launch.py`` prints how much was kept (status 130).

And the argument checks the library shares (:func:`check_bits`,
:func:`check_positive_int`, :func:`check_nonneg_float`): each raises a
``ValueError`` that names the bad value and says what is allowed.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


class ConfigError(ValueError):
  """A user-supplied value is invalid; the message names it and says what is allowed."""


class Interrupted(KeyboardInterrupt):
  """Ctrl-C (``KeyboardInterrupt``) after ``saved`` finished cells were written to ``path``."""

  def __init__(self, saved: int, path: str | None):
    super().__init__(f"interrupted: {saved} cells saved in {path}; rerun to resume")
    self.saved, self.path = saved, path


def check_bits(bits: Any) -> int:
  """Validates a quantization bit width: an integer in [1, 16] (1 = binary, sign codes)."""
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= int(bits) <= 16:
    raise ValueError(f"Unsupported bit width bits={bits!r}; allowed: an integer from 1 to 16.")
  return int(bits)


def check_positive_int(name: str, value: Any) -> int:
  """``value`` as an ``int`` if it is an integer >= 1; else ``ValueError`` naming ``name``."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
    raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
  return int(value)


def check_nonneg_float(name: str, value: Any) -> float:
  """``value`` as a ``float`` if it is finite and >= 0; else ``ValueError`` naming ``name``."""
  try:
    out = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"`{name}` must be a non-negative number, got {value!r}.") from None
  if not math.isfinite(out) or out < 0:
    raise ValueError(f"`{name}` must be a finite non-negative number, got {value!r}.")
  return out
