"""Error types shared by the library and ``launch.py``.

* :class:`ConfigError` — a value the user chose (a flag, a ``--config`` key, a
  path) is not allowed. ``launch.py`` prints it as one ``error:`` line and
  exits with status 2; any other exception is a bug and keeps its traceback.
  It is a ``ValueError``, so code catching ``ValueError`` keeps working.
* :class:`Interrupted` — Ctrl-C during a resumable computation, after the
  finished part was saved; ``launch.py`` prints how much was kept (status 130).
"""

from __future__ import annotations


class ConfigError(ValueError):
  """A user-supplied value is invalid; the message names it and says what is allowed."""


class Interrupted(KeyboardInterrupt):
  """Ctrl-C (``KeyboardInterrupt``) after ``saved`` finished cells were written to ``path``."""

  def __init__(self, saved: int, path: str | None):
    super().__init__(f"interrupted: {saved} cells saved in {path}; rerun to resume")
    self.saved, self.path = saved, path
