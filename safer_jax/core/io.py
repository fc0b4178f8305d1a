"""Result files written atomically (temp file + ``os.replace``): never half-written.

Each writer uses its own temporary file (``mkstemp``: a unique name per call,
the process id in it), so concurrent writers of one path never interleave: the
last rename wins with a whole file. Files get the permissions of an ordinary
``open()`` (``0o666`` less the process umask, e.g. ``0o644`` under umask 022),
not ``mkstemp``'s ``0o600``, so a group or a web server can read the results.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any

import numpy as np


def current_umask() -> int:
  """The process umask, read without changing it where the OS allows (Linux ``/proc``)."""
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except (OSError, ValueError, IndexError):
    pass
  mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, but brief).
  os.umask(mask)
  return mask


@contextlib.contextmanager
def atomic_path(path: str):
  """Yields a temporary path in the same directory; renames it to ``path`` on success.

  The temporary name is unique per call (and names the process), and the final
  file has mode ``0o666 & ~umask`` like any file ``open()`` creates.
  """
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".tmp-{os.getpid()}-",
                             suffix="-" + os.path.basename(path))
  os.close(fd)
  try:
    yield tmp
    os.chmod(tmp, 0o666 & ~current_umask())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _default(o: Any):
  if isinstance(o, (np.integer,)):
    return int(o)
  if isinstance(o, (np.floating,)):
    return float(o)
  if isinstance(o, np.ndarray) or hasattr(o, "__array__"):
    return np.asarray(o).tolist()
  if isinstance(o, (set, tuple)):
    return list(o)
  raise TypeError(f"Not JSON serialisable: {type(o)}")


def write_json(path: str, obj: Any) -> str:
  with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=_default)
  return path


def read_json(path: str) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def write_text(path: str, text: str) -> str:
  with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  return path


def exact_float(value: float) -> str:
  """The shortest text that reads back as exactly the same float64 (``repr``)."""
  return repr(float(value))


def write_csv(path: str, frame, *, exact: bool = False) -> str:
  """Writes a pandas DataFrame as CSV (no index).

  ``exact``: every float as :func:`exact_float` of its float64 value, so a file
  read back with :func:`read_csv` and written again is byte-identical (a float32
  column and its float64 copy are written alike). Otherwise pandas' default.
  """
  with atomic_path(path) as tmp:
    frame.to_csv(tmp, index=False, float_format=exact_float if exact else None)
  return path


def read_csv(path: str):
  """Reads a CSV written by :func:`write_csv`, floats parsed exactly (``round_trip``)."""
  import pandas as pd  # pylint: disable=import-outside-toplevel
  return pd.read_csv(path, float_precision="round_trip")


def save_figure(path: str, fig) -> str:
  """Saves a matplotlib figure as PNG atomically and closes it."""
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  with atomic_path(path) as tmp:
    fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
  plt.close(fig)
  return path


def versions() -> dict[str, str]:
  """Versions of the packages that determine results."""
  from importlib import metadata  # pylint: disable=import-outside-toplevel
  out = {}
  for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"):
    try:
      out[pkg] = metadata.version(pkg)
    except metadata.PackageNotFoundError:
      out[pkg] = "not installed"
  import jax  # pylint: disable=import-outside-toplevel
  out["backend"] = jax.default_backend()
  out["devices"] = str(jax.devices())
  return out
