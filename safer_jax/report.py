"""One report per workdir: ``<workdir>/report.md`` and ``report.html`` gathering the Markdown
tables and PNG figures that the experiments wrote, so results can be read without code.

``launch.py`` rebuilds the report after every experiment; ``build_report(workdir)``
can be called from a notebook.
"""

from __future__ import annotations

import base64
import html
import os
import re

from safer_jax import io

# Markdown files an experiment may write, in the order they are shown.
SUMMARIES = ("summary.md", "bench.md", "agreement.md", "costs.md", "metrics.md", "memory.md")


def _sections(workdir: str) -> list[tuple[str, list[str], list[str]]]:
  out = []
  for name in sorted(os.listdir(workdir)):
    folder = os.path.join(workdir, name)
    if not os.path.isdir(folder):
      continue
    mds = [os.path.join(folder, f) for f in SUMMARIES if os.path.exists(os.path.join(folder, f))]
    pngs = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".png"))
    if mds or pngs:
      out.append((name, mds, pngs))
  return out


def _demote(text: str) -> str:
  """Turns the summaries' own headings into sub-headings of the report."""
  return re.sub(r"^(#+) ", lambda m: "##" + m.group(1) + " ", text, flags=re.M)


def build_report(workdir: str) -> dict[str, str]:
  """Writes ``report.md`` and a self-contained ``report.html`` (figures inlined) in ``workdir``.

  Returns:
    ``{'md': path, 'html': path}``.
  """
  sections = _sections(workdir)
  md = [f"# safer_jax report: {os.path.abspath(workdir)}", ""]
  for name, mds, pngs in sections:
    md += [f"## {name}", ""]
    for path in mds:
      with open(path, encoding="utf-8") as f:
        md += [_demote(f.read().strip()), ""]
    for path in pngs:
      md += [f"![{name}/{os.path.basename(path)}]({name}/{os.path.basename(path)})", ""]
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
