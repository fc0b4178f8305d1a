"""A dependency-free progress line: ``label  37/120 [31%] 2.1 it/s, ETA 0:00:39``.

Writes to stderr, redrawing in place on a terminal and every ~10% otherwise (so
logs of batch jobs stay short).
"""

from __future__ import annotations

import datetime
import sys
import time


def _fmt(seconds: float) -> str:
  return str(datetime.timedelta(seconds=int(max(seconds, 0))))


class Progress:
  """Counts units of work done out of ``total`` and prints rate and ETA."""

  def __init__(self, total: int, label: str = "", *, enabled: bool = True, stream=None,
               unit: str = "it"):
    self.total = max(int(total), 0)
    self.label = label
    self.enabled = enabled
    self.stream = stream or sys.stderr
    self.unit = unit
    self.done = 0
    self.start = time.perf_counter()
    self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()
    self._last_decile = -1
    self.postfix = ""

  def update(self, n: int = 1, postfix: str | None = None) -> None:
    self.done += n
    if postfix is not None:
      self.postfix = postfix
    if not self.enabled:
      return
    decile = int(10 * self.done / self.total) if self.total else 10
    if self._tty or decile != self._last_decile or self.done >= self.total:
      self._last_decile = decile
      self._print(end="\r" if self._tty and self.done < self.total else "\n")

  def line(self) -> str:
    elapsed = time.perf_counter() - self.start
    rate = self.done / elapsed if elapsed > 0 else 0.0
    pct = 100.0 * self.done / self.total if self.total else 100.0
    eta = (self.total - self.done) / rate if rate > 0 else 0.0
    tail = f" {self.postfix}" if self.postfix else ""
    return (f"{self.label} {self.done}/{self.total} [{pct:3.0f}%] {rate:.1f} {self.unit}/s, "
            f"elapsed {_fmt(elapsed)}, ETA {_fmt(eta)}{tail}")

  def _print(self, end: str) -> None:
    self.stream.write("\x1b[2K" + self.line() + end if self._tty else self.line() + end)
    self.stream.flush()

  def close(self) -> float:
    """Returns the elapsed seconds."""
    return time.perf_counter() - self.start
