"""The experiments' documents, regenerated from a run's files so their numbers cannot drift.

Each ``experiments/<name>.md`` is prose around *generated blocks* and *figures*:

  <!-- generated from quant_sweep/resnet8/summary.md -->
  ... (the file, headings demoted one level) ...
  <!-- end generated -->

  <!-- figure from quant_sweep/resnet8/accuracy_vs_bits.png -->
  ![accuracy vs bits](figures/quant_sweep_resnet8.png)

Paths are relative to a launch.py workdir (``DIR/NAME/MODEL/...``). After
``python launch.py --experiment=NAME --workdir=DIR``:

  python -m experiments.docs DIR            # every document whose files DIR holds
  python -m experiments.docs DIR quant_sweep

replaces each block with its file and copies each figure over the image that
follows its marker (relative to the document). A block whose file DIR lacks is
left as it was and named on stdout; nothing is half-written (each document is
replaced atomically).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
BLOCK = re.compile(r"(<!-- generated from (?P<path>\S+) -->\n)(?P<body>.*?)(<!-- end generated -->)",
                   re.S)
FIGURE = re.compile(r"<!-- figure from (?P<path>\S+) -->\n!\[[^\]]*\]\((?P<target>[^)\s]+)\)")


@dataclasses.dataclass
class Update:
  """What regenerating one document did.

  Attributes:
    doc: the document's path.
    blocks: workdir paths of the blocks replaced.
    figures: workdir paths of the figures copied.
    missing: workdir paths the document names that the workdir lacks.
  """
  doc: str
  blocks: list[str] = dataclasses.field(default_factory=list)
  figures: list[str] = dataclasses.field(default_factory=list)
  missing: list[str] = dataclasses.field(default_factory=list)


def demote(text: str, levels: int = 1) -> str:
  """Markdown headings one (``levels``) deeper, outside code fences; trailing blank lines dropped."""
  out, fenced = [], False
  for line in text.rstrip().splitlines():
    if line.startswith("```"):
      fenced = not fenced
    out.append("#" * levels + line if not fenced and re.match(r"#+ ", line) else line)
  return "\n".join(out) + "\n"


def sources(doc_text: str) -> list[str]:
  """The workdir paths a document's blocks and figures come from, in order."""
  return [m.group("path") for m in BLOCK.finditer(doc_text)] + [
      m.group("path") for m in FIGURE.finditer(doc_text)]


def regenerate(doc: str, workdir: str) -> Update:
  """Replaces ``doc``'s generated blocks and figures with ``workdir``'s files (see module doc)."""
  text = open(doc, encoding="utf-8").read()
  update = Update(doc)

  def block(m):
    path = os.path.join(workdir, m.group("path"))
    if not os.path.isfile(path):
      update.missing.append(m.group("path"))
      return m.group(0)
    update.blocks.append(m.group("path"))
    return m.group(1) + demote(open(path, encoding="utf-8").read()) + m.group(4)

  new = BLOCK.sub(block, text)
  copies = []
  for m in FIGURE.finditer(new):
    path = os.path.join(workdir, m.group("path"))
    if os.path.isfile(path):
      copies.append((path, os.path.join(os.path.dirname(doc), m.group("target"))))
      update.figures.append(m.group("path"))
    else:
      update.missing.append(m.group("path"))
  for src, dst in copies:
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.copyfile(src, dst + ".tmp")
    os.replace(dst + ".tmp", dst)
  if new != text:
    with open(doc + ".tmp", "w", encoding="utf-8") as f:
      f.write(new)
    os.replace(doc + ".tmp", doc)
  return update


def documents(names: list[str] | None = None) -> list[str]:
  """``experiments/<name>.md`` for ``names`` (None: every document with a generated part).

  Raises:
    ValueError: a name with no document, naming the documents there are.
  """
  have = sorted(f[:-3] for f in os.listdir(HERE) if f.endswith(".md"))
  docs = [n for n in have if sources(open(os.path.join(HERE, n + ".md"), encoding="utf-8").read())]
  if names:
    bad = [n for n in names if n not in docs]
    if bad:
      raise ValueError(f"No generated document for {bad}; allowed: {docs}.")
    docs = list(names)
  return [os.path.join(HERE, n + ".md") for n in docs]


def main(argv: list[str]) -> int:
  if len(argv) < 2 or argv[1] in ("-h", "--help"):
    print(__doc__)
    return 0 if len(argv) >= 2 else 2
  workdir = argv[1]
  if not os.path.isdir(workdir):
    print(f"error: workdir {workdir!r} is not a directory (a launch.py --workdir)")
    return 2
  try:
    docs = documents(argv[2:])
  except ValueError as e:
    print(f"error: {e}")
    return 2
  for doc in docs:
    u = regenerate(doc, workdir)
    name = os.path.relpath(doc)
    if u.blocks or u.figures:
      print(f"{name}: {len(u.blocks)} tables, {len(u.figures)} figures from {workdir}")
    for path in u.missing:
      print(f"{name}: kept as it was: {path} (not in {workdir})")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
