"""Result files written atomically (temp file + ``os.replace``): never half-written."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str):
  """Yields a temporary path in the same directory; renames it to ``path`` on success."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
  os.close(fd)
  try:
    yield tmp
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


def write_csv(path: str, frame) -> str:
  """Writes a pandas DataFrame as CSV (no index)."""
  with atomic_path(path) as tmp:
    frame.to_csv(tmp, index=False)
  return path


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
