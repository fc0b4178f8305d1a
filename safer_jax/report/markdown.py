"""One report per workdir: ``<workdir>/report.md`` and ``report.html`` gathering the Markdown
tables and PNG figures that the experiments wrote, so results can be read without code.

Results live in ``<workdir>/<experiment>/<model>/`` (several models per
experiment) or, for files spanning models, ``<workdir>/<experiment>/``; the
report has a section per experiment and a sub-section per model. ``launch.py``
rebuilds the report after every experiment; ``build_report(workdir)`` can be
called from a notebook.
"""

from __future__ import annotations

import base64
import html
import os
import re

from safer_jax.core import io

# Markdown files an experiment may write, in the order they are shown.
SUMMARIES = ("summary.md", "bench.md", "bench_criteria.md", "devices.md", "agreement.md",
             "costs.md", "metrics.md", "memory.md")


def _files(folder: str) -> tuple[list[str], list[str]]:
  """The Markdown summaries and PNG figures directly in ``folder``."""
  mds = [os.path.join(folder, f) for f in SUMMARIES if os.path.exists(os.path.join(folder, f))]
  pngs = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".png"))
  return mds, pngs


def _subdirs(folder: str) -> list[str]:
  return sorted(n for n in os.listdir(folder)
                if not n.startswith(".") and os.path.isdir(os.path.join(folder, n)))


def _sections(workdir: str) -> list[tuple[str, list[tuple[str | None, list[str], list[str]]]]]:
  """``[(experiment, [(model or None, summaries, figures), ...])]``, empty parts left out.

  ``None``: files in the experiment's own folder (e.g. criteria_benchmark's
  aggregate over models); then one entry per model folder holding files.
  """
  out = []
  for name in _subdirs(workdir):
    folder = os.path.join(workdir, name)
    parts = []
    for sub in [None, *_subdirs(folder)]:
      mds, pngs = _files(folder if sub is None else os.path.join(folder, sub))
      if mds or pngs:
        parts.append((sub, mds, pngs))
    if parts:
      out.append((name, parts))
  return out


def _demote(text: str, levels: int = 2) -> str:
  """Turns the summaries' own headings into sub-headings of the report (``levels`` deeper)."""
  return re.sub(r"^(#+) ", lambda m: "#" * levels + m.group(1) + " ", text, flags=re.M)


def build_report(workdir: str) -> dict[str, str]:
  """Writes ``report.md`` and a self-contained ``report.html`` (figures inlined) in ``workdir``.

  Returns:
    ``{'md': path, 'html': path}``.
  """
  sections = _sections(workdir)
  md = [f"# safer_jax report: {os.path.abspath(workdir)}", ""]
  if len(sections) > 1 or any(len(parts) > 1 for _, parts in sections):
    md += ["Contents: " + "; ".join(
        f"{name} ({', '.join(sub or 'all models' for sub, _, _ in parts)})"
        for name, parts in sections), ""]
  for name, parts in sections:
    md += [f"## {name}", ""]
    for sub, mds, pngs in parts:
      if sub is not None:
        md += [f"### {name} / {sub}", ""]
      rel = name if sub is None else f"{name}/{sub}"
      for path in mds:
        with open(path, encoding="utf-8") as f:
          md += [_demote(f.read().strip(), 2 if sub is None else 3), ""]
      for path in pngs:
        md += [f"![{rel}/{os.path.basename(path)}]({rel}/{os.path.basename(path)})", ""]
  md_path = io.write_text(os.path.join(workdir, "report.md"), "\n".join(md) + "\n")
  html_path = io.write_text(os.path.join(workdir, "report.html"), _to_html(md, workdir))
  return {"md": md_path, "html": html_path}


def _inline(text: str) -> str:
  text = html.escape(text)
  text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
  return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def _to_html(lines: list[str], workdir: str) -> str:
  """A small Markdown subset (headings, tables, lists, images, paragraphs) to HTML."""
  body, table = [], []

  def flush_table():
    if not table:
      return
    rows = [r for r in table if not re.fullmatch(r"\|[\s\-:|]*\|", r.strip())]
    cells = [[c.strip() for c in r.strip().strip("|").split("|")] for r in rows]
    out = ["<table>"]
    for i, row in enumerate(cells):
      tag = "th" if i == 0 else "td"
      out.append("<tr>" + "".join(f"<{tag}>{_inline(c)}</{tag}>" for c in row) + "</tr>")
    body.append("\n".join(out + ["</table>"]))
    table.clear()

  for line in "\n".join(lines).splitlines():
    if line.startswith("|"):
      table.append(line)
      continue
    flush_table()
    image = re.fullmatch(r"!\[(.*)\]\((.+)\)", line.strip())
    heading = re.match(r"^(#+) (.*)", line)
    if image:
      with open(os.path.join(workdir, image.group(2)), "rb") as f:
        data = base64.b64encode(f.read()).decode()
      body.append(f'<p><img alt="{html.escape(image.group(1))}" style="max-width:100%" '
                  f'src="data:image/png;base64,{data}"></p>')
    elif heading:
      level = min(len(heading.group(1)), 6)
      body.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
    elif line.startswith("- "):
      body.append(f"<li>{_inline(line[2:])}</li>")
    elif line.strip():
      body.append(f"<p>{_inline(line)}</p>")
  flush_table()
  style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
           "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}")
  return (f"<!doctype html><html><head><meta charset='utf-8'><title>safer_jax report</title>"
          f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
