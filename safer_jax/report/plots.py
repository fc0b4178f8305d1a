"""Figures of sensitivity tables (matplotlib, Agg backend: works headless)."""

from __future__ import annotations

import hashlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.collections  # pylint: disable=wrong-import-position
import matplotlib.colors  # pylint: disable=wrong-import-position
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position
import matplotlib.ticker  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import pandas as pd  # pylint: disable=wrong-import-position

from safer_jax.core import io  # pylint: disable=wrong-import-position

# One palette for every figure that colours sources, criteria or methods, so that a name has the
# same colour everywhere (figures of safer_jax and experiments/). Names of one figure never share a
# colour: :func:`source_colors` moves a clash to an unused fallback colour.
PALETTE: dict[str, str] = {
    # references (float32, dense, fault-free, original model: see ALIASES) and fixed allocations
    "reference": "#000000",
    "oracle": "#7b4173",
    "uniform": "#bcbd22",
    "random": "#7f7f7f",
    "none": "#843c39",
    "searched": "#2ca02c",
    "erk": "#c49c94",
    "global_magnitude": "#8c6d31",
    "magnitude": "#e6550d",
    # criteria (safer_jax.criteria.CRITERIA, mixed_precision / pruning cost sources)
    "fisher": "#1f77b4",
    "hawq_v2": "#ff7f0e",
    "corruption_first_order": "#d62728",
    "corruption_pga": "#9467bd",
    "integrated_gradients": "#8c564b",
    "quant_error": "#e377c2",
    "grad_norm": "#393b79",
    "taylor": "#8ca252",
    "taylor_abs": "#637939",
    "hessian_trace": "#17becf",
    "top_eigenvalue": "#9edae5",
    "weight_norm": "#dbdb8d",
    "spectral_norm": "#e7ba52",
    "param_count": "#c7c7c7",
    # training variants (acr_train, attribution_preservation)
    "plain": "#636363",
    "acr": "#ad494a",
    "compressed": "#756bb1",
    "plain_ft": "#3182bd",
    "wcam_ft": "#31a354",
}

# Other names of the same thing: one colour.
ALIASES: dict[str, str] = {
    "float32": "reference", "dense": "reference", "fault-free": "reference",
    "original": "reference", "baseline": "reference",
    "hawq": "hawq_v2",  # mixed_precision's hawq is HAWQ-V2's trace x perturbation
    "corruption": "corruption_first_order",  # ||g|| ||dW||, the first-order corruption
    "first_order": "corruption_first_order", "pga": "corruption_pga",
}

# Variants of a named source (``fisher_per_param``, ``searched_bn``): its colour, lighter.
VARIANT_SUFFIXES = ("_per_param", "_bn")

_FALLBACK = [c for c in dict.fromkeys(
    matplotlib.colors.to_hex(c) for name in ("tab20b", "tab20c", "tab20")
    for c in plt.get_cmap(name).colors) if c not in PALETTE.values()]

# Line styles of the sources that curves single out (the rest: thin, small circles).
_LINE_STYLES: dict[str, dict] = {
    "oracle": {"lw": 2.5},
    "uniform": {"ls": "--", "lw": 2},
    "none": {"ls": "--", "lw": 2},
    "random": {"ls": ":", "lw": 2},
    "global_magnitude": {"ls": ":", "lw": 2},
    "searched": {"lw": 2.5, "marker": "*", "ms": 8},
    "searched_bn": {"lw": 2.5, "marker": "*", "ms": 8},
}


def _stable_index(name: str, n: int) -> int:
  """An index in ``[0, n)`` from ``name`` alone (the same in every process, unlike hash())."""
  return int(hashlib.sha256(name.encode()).hexdigest(), 16) % n


def _lighter(color: str, amount: float = 0.45) -> str:
  rgb = np.asarray(matplotlib.colors.to_rgb(color))
  return matplotlib.colors.to_hex(rgb + (1.0 - rgb) * amount)


def source_color(name: str) -> str:
  """The colour of a source, criterion or method ``name`` (hex), the same in every figure.

  :data:`PALETTE` (through :data:`ALIASES`); ``<known>_per_param`` / ``<known>_bn``: the known
  name's colour, lighter; any other name: a fallback colour chosen from the name alone.
  """
  key = ALIASES.get(name, name)
  if key in PALETTE:
    return PALETTE[key]
  for suffix in VARIANT_SUFFIXES:
    base = ALIASES.get(name[:-len(suffix)], name[:-len(suffix)])
    if name.endswith(suffix) and base in PALETTE:
      return _lighter(PALETTE[base])
  return _FALLBACK[_stable_index(name, len(_FALLBACK))]


def source_colors(names) -> dict[str, str]:
  """``{name: colour}`` for the names of one figure, no two alike.

  Each name gets :func:`source_color` unless an earlier name of the figure holds that colour;
  then the first unused fallback colour from a place chosen by the name.
  """
  colors: dict[str, str] = {}
  for name in dict.fromkeys(names):
    color = source_color(name)
    if color in colors.values():
      start = _stable_index(name, len(_FALLBACK))
      free = [c for c in _FALLBACK[start:] + _FALLBACK[:start] if c not in colors.values()]
      color = free[0] if free else matplotlib.colors.to_hex(
          plt.get_cmap("viridis")(_stable_index(name, 256) / 255))
    colors[name] = color
  return colors


def source_styles(names) -> dict[str, dict]:
  """Line keywords (``color``, ``ls``, ``lw``, ``marker``, ``ms``) per name of one figure.

  Colours from :func:`source_colors`; oracle thick, uniform / none dashed, random / global
  magnitude dotted, searched with stars; every other name thin with small circles.
  """
  return {name: {"marker": "o", "ms": 3.5, "lw": 1.4, **_LINE_STYLES.get(name, {}),
                 "color": color} for name, color in source_colors(names).items()}


def draw_curves(ax, curves: dict, styles: dict, errors: dict | None = None,
                dash: float = 4.0) -> None:
  """Draws ``curves`` (``{name: (xs, ys)}``) in ``styles`` (:func:`source_styles`), each named in
  the axes' legend handles, with ``errors`` (``{name: y errors}``) as error bars.

  A segment that several curves share (criteria often give the same allocation) is drawn once
  in dashes of their colours taking turns: every curve stays visible, where drawing one after
  the other would leave only the last. The markers of a curve are a line of gid ``name``.
  """
  shared: dict[tuple, list[str]] = {}
  for name, (xs, ys) in curves.items():
    pts = [(round(float(x), 9), round(float(y), 9)) for x, y in zip(xs, ys)]
    for seg in zip(pts[:-1], pts[1:]):
      shared.setdefault(seg, []).append(name)
  for name, (xs, ys) in curves.items():
    style = styles[name]
    own = [seg for seg, names in shared.items() if names == [name]]
    ax.add_collection(matplotlib.collections.LineCollection(
        own, colors=style["color"], linewidths=style.get("lw", 1.4),
        linestyles=style.get("ls", "-")))
    ax.plot(xs, ys, ls="none", marker=style.get("marker", "o"), ms=style.get("ms", 3.5),
            color=style["color"], gid=name)
    err = None if errors is None else errors.get(name)
    if err is not None and np.any(np.asarray(err, dtype=float) > 0):
      ax.errorbar(xs, ys, yerr=err, fmt="none", ecolor=style["color"], capsize=2, lw=0.8)
    ax.plot([], [], label=name, **style)  # (the legend's handle)
  for seg, names in shared.items():
    for k, name in enumerate(names if len(names) > 1 else []):
      ax.add_collection(matplotlib.collections.LineCollection(
          [seg], colors=styles[name]["color"],
          linewidths=max(styles[m].get("lw", 1.4) for m in names),
          linestyles=[(k * dash, (dash, (len(names) - 1) * dash))]))
  ax.autoscale_view()


def symlog_threshold(values) -> float:
  """The linear range of a symlog axis for ``values``: a power of ten at or below the
  smallest nonzero magnitude, at least 1e-4 of the largest (1 when all are zero; rounding
  noise, below 1e-6 of the largest, counts as zero)."""
  mags = np.abs(np.asarray(values, dtype=float))
  mags = mags[np.isfinite(mags)]
  mags = mags[mags > 1e-6 * mags.max()] if mags.size else mags
  if not mags.size or mags.max() == 0:
    return 1.0
  return float(10.0 ** np.floor(np.log10(max(mags.min(), 1e-4 * mags.max())) + 1e-9))


def drop_axis(ax, values, label: str, reference: tuple[str, str] | None = None) -> None:
  """A y axis for differences to a reference (0 = the reference), where small and large both read.

  Symmetric log scale, linear within :func:`symlog_threshold` of 0, plain tick labels at 1, 2
  and 5 times the powers of ten. With
  ``reference = (color, label)`` a dash-dotted line at 0 in the legend.
  """
  threshold = symlog_threshold(values)
  ax.set_yscale("symlog", linthresh=threshold, linscale=0.6)
  ax.yaxis.set_major_locator(matplotlib.ticker.SymmetricalLogLocator(
      linthresh=threshold, base=10, subs=(1.0, 2.0, 5.0)))
  ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
  finite = np.asarray(values, dtype=float)
  finite = np.append(finite[np.isfinite(finite)], 0.0)
  ends = ax.yaxis.get_transform().transform(np.array([finite.min(), finite.max()]))
  pad = 0.06 * max(ends[1] - ends[0], 1e-9)  # (a margin in the scaled space, not in data units)
  ax.set_ylim(*ax.yaxis.get_transform().inverted().transform(ends + np.array([-pad, pad])))
  ax.set_ylabel(label)
  if reference is not None:
    ax.axhline(0.0, color=reference[0], lw=0.9, ls="-.", label=reference[1])


def freeze_layout(fig):
  """Draws ``fig`` once (its layout engine places axes, legends, colour bars) and keeps that
  layout, so that text placed in display coordinates afterwards stays clear; the renderer."""
  fig.canvas.draw()
  fig.set_layout_engine("none")
  return fig.canvas.get_renderer()


# Directions tried around a point: (unit offset, horizontal and vertical alignment of the text).
_DIRECTIONS = (((1, 0), "left", "center"), ((1, 1), "left", "bottom"), ((0, 1), "center", "bottom"),
               ((-1, 1), "right", "bottom"), ((-1, 0), "right", "center"),
               ((-1, -1), "right", "top"), ((0, -1), "center", "top"), ((1, -1), "left", "top"))
_RINGS = (3, 9, 16, 25, 36, 50, 66)  # distances tried (points); beyond the first, a leader line


def _box_at(anchor, size, offset, ha, va):
  """(x0, y0, x1, y1) of a ``size`` text aligned ``ha``/``va`` at ``anchor + offset`` (pixels)."""
  w, h = size
  x = anchor[0] + offset[0] - w * {"left": 0.0, "center": 0.5, "right": 1.0}[ha]
  y = anchor[1] + offset[1] - h * {"bottom": 0.0, "center": 0.5, "top": 1.0}[va]
  return (x, y, x + w, y + h)


def _free(box, obstacles, inside, pad: float) -> bool:
  x0, y0, x1, y1 = box
  if x0 < inside.x0 + pad or x1 > inside.x1 - pad or y0 < inside.y0 + pad or y1 > inside.y1 - pad:
    return False
  return not any(x0 < b[2] + pad and b[0] < x1 + pad and y0 < b[3] + pad and b[1] < y1 + pad
                 for b in obstacles)


def place_labels(ax, points, texts, renderer, *, fontsize: float = 7, bold=None) -> list[int]:
  """Writes ``texts[i]`` next to ``points[i]`` (data coordinates) where it overprints nothing.

  Labels are placed in the given order (most important first): the first spot, around the
  point at growing distances (a thin leader line beyond the nearest), that stays inside the
  axes and clears every text already there, the axes' legend, the other points and the labels
  placed before. Call after :func:`freeze_layout`. Returns the indices left unlabelled (no
  free spot): say them elsewhere, e.g. in a legend.
  """
  bold = bold or [False] * len(texts)
  to_px = renderer.points_to_pixels(1.0)
  anchors = ax.transData.transform(np.asarray(points, dtype=float).reshape(-1, 2))
  dot = 3.0 * to_px  # a marker's half width
  obstacles = [(x - dot, y - dot, x + dot, y + dot) for x, y in anchors]
  obstacles += [tuple(t.get_window_extent(renderer).extents) for t in ax.texts if t.get_visible()]
  if ax.get_legend() is not None:
    obstacles.append(tuple(ax.get_legend().get_window_extent(renderer).extents))
  inside = ax.get_window_extent(renderer)
  unplaced = []
  for i, (text, anchor) in enumerate(zip(texts, anchors)):
    weight = "bold" if bold[i] else "normal"
    probe = ax.text(0, 0, text, fontsize=fontsize, fontweight=weight)
    extent = probe.get_window_extent(renderer)
    probe.remove()
    own = [b for j, b in enumerate(obstacles) if j != i]  # (its own point is no obstacle)
    spot = next(((ring, unit, ha, va) for ring in _RINGS for unit, ha, va in _DIRECTIONS
                 if _free(_box_at(anchor, (extent.width, extent.height),
                                  np.multiply(unit, ring * to_px), ha, va), own, inside,
                          pad=1.5 * to_px)), None)
    if spot is None:
      unplaced.append(i)
      continue
    ring, unit, ha, va = spot
    offset = np.multiply(unit, ring)
    ax.annotate(text, points[i], xytext=offset, textcoords="offset points", ha=ha, va=va,
                fontsize=fontsize, fontweight=weight, annotation_clip=False,
                arrowprops=None if ring == _RINGS[0] else
                {"arrowstyle": "-", "lw": 0.5, "color": "0.4", "shrinkA": 0, "shrinkB": 2})
    obstacles.append(_box_at(anchor, (extent.width, extent.height), offset * to_px, ha, va))
  return unplaced


def _magnitude_name(family: str) -> str:
  from safer_jax.core import perturb  # pylint: disable=import-outside-toplevel
  return perturb.FAMILIES[family].magnitude_name if family in perturb.FAMILIES else "magnitude"


def _families(table: pd.DataFrame) -> list[str]:
  return list(dict.fromkeys(table["family"]))


def _layers(table: pd.DataFrame) -> list[str]:
  return list(dict.fromkeys(table["layer"]))


def layer_styles(n: int) -> list[dict]:
  """``n`` distinguishable line styles, in network order.

  Up to 10: the ``tab10`` colours; up to 20: ``tab20``; more: ``viridis`` sampled
  over ``n`` (first layer dark, last yellow), with the line style and marker
  cycling so that neighbouring layers (close colours) still differ.
  """
  if n <= 10:
    return [{"color": plt.get_cmap("tab10")(i)} for i in range(n)]
  if n <= 20:
    return [{"color": plt.get_cmap("tab20")(i)} for i in range(n)]
  cmap = plt.get_cmap("viridis")
  dashes, markers = ("-", "--", ":", "-."), ("o", "s", "^", "D", "v")
  return [{"color": cmap(i / (n - 1)), "ls": dashes[i % len(dashes)],
           "marker": markers[i % len(markers)], "ms": 3} for i in range(n)]


def sensitivity_heatmap(table: pd.DataFrame, path: str, metric: str = "accuracy_drop",
                        title: str = "") -> str:
  """Layers x magnitude heatmap of the seed-averaged ``metric``, one panel per family.

  Each panel has its own colour scale and colour bar (families differ by orders of magnitude:
  one shared scale leaves the milder ones blank); 0 to the panel's largest value, or from its
  smallest when that is negative.
  """
  families, layer_order = _families(table), _layers(table)
  # constrained layout: the figure title, panel titles, tick labels and colour bars never overlap.
  fig, axes = plt.subplots(1, len(families), figsize=(4.0 * len(families) + 1.5,
                                                      0.32 * len(layer_order) + 2.2),
                           squeeze=False, sharey=True, layout="constrained")
  for ax, family in zip(axes[0], families):
    sub = table[table.family == family]
    grid = sub.groupby(["layer", "magnitude_index"])[metric].mean().unstack()
    grid = grid.reindex(layer_order)
    mags = sub.drop_duplicates("magnitude_index").sort_values("magnitude_index")["magnitude"]
    values = grid.to_numpy(dtype=float)
    lo = min(float(np.nanmin(values)), 0.0) if np.isfinite(values).any() else 0.0
    hi = max(float(np.nanmax(values)) if np.isfinite(values).any() else 0.0, lo + 1e-9)
    image = ax.imshow(values, aspect="auto", cmap="magma_r", vmin=lo, vmax=hi)
    ax.set_xticks(range(len(mags)))
    ax.set_xticklabels([f"{m:g}" for m in mags], rotation=45)
    ax.set_xlabel(_magnitude_name(family))
    ax.set_title(family)
    ax.set_yticks(range(len(layer_order)))
    ax.set_yticklabels(layer_order, fontsize=8)
    bar = fig.colorbar(image, ax=ax, shrink=0.8, pad=0.02)
    bar.ax.tick_params(labelsize=7)
    bar.set_label(metric.replace("_", " "), fontsize=8)
  if title:
    fig.suptitle(title, fontsize=11)
  return io.save_figure(path, fig)


def sensitivity_lines(table: pd.DataFrame, path: str, metric: str = "accuracy",
                      title: str = "") -> str:
  """Seed-averaged ``metric`` vs magnitude, one line per layer, one panel per family."""
  families, layer_order = _families(table), _layers(table)
  styles = layer_styles(len(layer_order))
  fig, axes = plt.subplots(1, len(families), figsize=(4 * len(families) + 2.2, 3.9),
                           squeeze=False, layout="constrained")
  for ax, family in zip(axes[0], families):
    sub = table[table.family == family]
    for style, layer in zip(styles, layer_order):
      curve = sub[sub.layer == layer].groupby("magnitude_index").agg(
          m=("magnitude", "first"), y=(metric, "mean"), s=(metric, "std")).fillna(0.0)
      x = np.arange(len(curve))
      ax.errorbar(x, curve["y"], yerr=curve["s"], label=layer, lw=1.2, capsize=2, **style)
      ax.set_xticks(x)
      ax.set_xticklabels([f"{m:g}" for m in curve["m"]], rotation=45)
    ax.set_title(family)
    ax.set_xlabel(_magnitude_name(family))
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
  # One legend for the figure, outside the panels (one column per 20 layers).
  handles, labels = axes[0][-1].get_legend_handles_labels()
  fig.legend(handles, labels, loc="outside right center", fontsize=7,
             ncols=max(1, -(-len(layer_order) // 20)), title="layer (network order)",
             title_fontsize=7)
  if title:
    fig.suptitle(title, fontsize=11)
  return io.save_figure(path, fig)


def _text_color(cmap, norm, value: float) -> str:
  """Black or white, whichever reads on the colour ``cmap(norm(value))``."""
  r, g, b, _ = cmap(norm(value))
  return "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black"


def interaction_figure(table: pd.DataFrame, path: str, title: str = "") -> str:
  """How far additivity fails (:func:`safer_jax.budgeting.search.interactions`), two panels.

  Left: joint loss increase of each layer pair vs the sum of the two
  single-layer increases (nats, log-log when all are positive and span more
  than a decade; the diagonal is additivity); the three pairs furthest from it are marked and named in the
  legend below the figure (names inline overprint each other). Right: pairs x
  pairs matrix of ``joint / additive`` (values written while cells are wide
  enough).
  """
  order = list(dict.fromkeys(list(table["layer_a"]) + list(table["layer_b"])))
  fig, (ax, bx) = plt.subplots(1, 2, figsize=(11.5, 5.2), layout="constrained")
  ax.scatter(table["additive"], table["joint"], s=22, color="0.45", label="layer pair")
  lo = float(min(table["additive"].min(), table["joint"].min()))
  hi = float(max(table["additive"].max(), table["joint"].max()))
  if lo > 0 and hi > 10 * lo:  # (within a decade, log axes label their minor ticks: crowded)
    ax.set_xscale("log")
    ax.set_yscale("log")
    few = np.log10(hi / lo) <= 2.5  # decades: 1, 2, 5 times the powers of ten; more: powers
    for axis in (ax.xaxis, ax.yaxis):
      axis.set_major_locator(matplotlib.ticker.LogLocator(
          base=10, subs=(1.0, 2.0, 5.0) if few else (1.0,), numticks=12 if few else "auto"))
      axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
      axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  ax.plot([lo, hi], [lo, hi], color="black", lw=0.8, ls="--", label="additive (joint = sum)")
  worst = table.reindex(table["excess"].abs().sort_values(ascending=False).index)[:3]
  for k, (row, color) in enumerate(zip(worst.itertuples(), ("#d62728", "#ff7f0e", "#9467bd"))):
    ax.scatter([row.additive], [row.joint], s=70, facecolor="none", edgecolor=color, lw=1.8,
               label=f"{k + 1}. {row.layer_a} + {row.layer_b}: {row.excess:+.2f} nats "
               f"(joint / additive {row.ratio:.2f})")
  ax.set_xlabel("sum of single-layer loss increases (nats)")
  ax.set_ylabel("joint loss increase, both layers perturbed (nats)", fontsize=9)
  ax.set_title("pairs of the most sensitive layers")
  ax.grid(alpha=0.3)
  fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", fontsize=7,
             ncols=2)
  ratio = np.full((len(order), len(order)), np.nan)
  for row in table.itertuples():
    i, j = order.index(row.layer_a), order.index(row.layer_b)
    ratio[i, j] = ratio[j, i] = row.ratio
  finite = ratio[np.isfinite(ratio)]
  span = max(float(np.max(np.abs(np.log2(finite)))) if finite.size else 1.0, 0.1)
  cmap, norm = plt.get_cmap("RdBu_r"), matplotlib.colors.Normalize(-span, span)
  image = bx.imshow(np.log2(ratio), cmap=cmap, norm=norm)
  if len(order) <= 10:  # (wider matrices: cells too narrow for the value; the colour bar says it)
    for (i, j), v in np.ndenumerate(ratio):
      if np.isfinite(v):
        bx.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                color=_text_color(cmap, norm, np.log2(v)))
  fontsize = 7 if len(order) <= 16 else 5
  bx.set_xticks(range(len(order)))
  bx.set_xticklabels(order, rotation=45 if len(order) <= 10 else 90,
                     ha="right" if len(order) <= 10 else "center", fontsize=fontsize)
  bx.set_yticks(range(len(order)))
  bx.set_yticklabels(order, fontsize=fontsize)
  bx.set_title("joint / additive (red: worse than additive)")
  fig.colorbar(image, ax=bx, shrink=0.8, label="log2(joint / additive)")
  if title:
    fig.suptitle(title, fontsize=11)
  return io.save_figure(path, fig)


def grouped_bars(path: str, labels: list[str], series: list[tuple], *, ylabel: str, title: str,
                 width: float, log: bool = False, rotation: int = 35,
                 figsize: tuple[float, float] = (0.9, 4.2)) -> str:
  """One group of bars per label, one bar per series; saved to ``path`` (returned).

  Args:
    path: the PNG to write.
    labels: the groups' x tick labels (G).
    series: ``(name, color, values (G,), errors (G,) or None)`` per bar of a group.
    ylabel, title: axis label and title.
    width: one bar's width (groups are 1 apart).
    log: log-scaled y axis.
    rotation: of the tick labels (degrees).
    figsize: ``(inches per group, height)``; the width is at least 6 inches.
  """
  x = np.arange(len(labels))
  fig, ax = plt.subplots(figsize=(max(6, figsize[0] * len(labels) + 2), figsize[1]))
  for k, (name, color, values, errors) in enumerate(series):
    offset = (k - (len(series) - 1) / 2) * width
    if errors is None:
      ax.bar(x + offset, values, width, label=name, color=color)
    else:
      ax.bar(x + offset, values, width, yerr=errors, capsize=2, label=name, color=color)
  if log:
    ax.set_yscale("log")
  ax.set_xticks(x)
  ax.set_xticklabels(labels, rotation=rotation, ha="right", fontsize=8)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3, axis="y")
  fig.tight_layout()
  return io.save_figure(path, fig)
