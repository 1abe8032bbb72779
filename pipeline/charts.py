"""Charts for the HTML report, drawn as inline SVG / HTML by this module (no JavaScript,
no external file): line charts, horizontal bars and a confusion matrix. Every text is
escaped; numbers are formatted with fixed precision, so the output is byte-stable."""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

import numpy as np

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About `count` round tick values covering [lo, hi]."""
    if not math.isfinite(lo) or not math.isfinite(hi):
        return []
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(count - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first, last = math.floor(lo / step), math.ceil(hi / step)
    return [round(i * step, 10) for i in range(first, last + 1)]


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def line_chart(series: dict[str, tuple[Sequence[float], Sequence[float | None]]], *,
               title: str, x_label: str, y_label: str, width: int = 560,
               height: int = 260) -> str:
    """An SVG line chart. series: name -> (x values, y values); None / NaN y values are
    gaps (points not drawn). Returns the <svg> element as a string."""
    left, right, top, bottom = 56, 16, 42, 44
    points = {name: [(float(x), float(y)) for x, y in zip(xs, ys)
                     if y is not None and math.isfinite(float(y))]
              for name, (xs, ys) in series.items()}
    xs = [x for pts in points.values() for x, _ in pts]
    ys = [y for pts in points.values() for _, y in pts]
    parts = [f'<svg width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">',
             f'<text x="{width / 2:.1f}" y="18" text-anchor="middle" class="chart-title">'
             f'{escape(title)}</text>']
    if not xs:
        parts.append(f'<text x="{width / 2:.1f}" y="{height / 2:.1f}" text-anchor="middle">'
                     'no data</text></svg>')
        return "".join(parts)
    x_ticks, y_ticks = _ticks(min(xs), max(xs)), _ticks(min(ys), max(ys))
    x0, x1 = x_ticks[0], x_ticks[-1]
    y0, y1 = y_ticks[0], y_ticks[-1]
    pw, ph = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + (x - x0) / ((x1 - x0) or 1.0) * pw

    def sy(y: float) -> float:
        return top + ph - (y - y0) / ((y1 - y0) or 1.0) * ph

    for t in y_ticks:
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" '
                     'class="grid"/>'
                     f'<text x="{left - 6}" y="{sy(t) + 4:.1f}" text-anchor="end">'
                     f'{_fmt(t)}</text>')
    for t in x_ticks:
        parts.append(f'<text x="{sx(t):.1f}" y="{top + ph + 16}" text-anchor="middle">'
                     f'{_fmt(t)}</text>')
    parts.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="frame"/>')
    legend = []  # between the title and the plot
    for i, (name, pts) in enumerate(points.items()):
        colour = PALETTE[i % len(PALETTE)]
        if pts:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" '
                         'stroke-width="1.8"/>')
        lx = left + 10 + i * 190
        legend.append(f'<rect x="{lx}" y="{top - 12}" width="12" height="3" fill="{colour}"/>'
                      f'<text x="{lx + 16}" y="{top - 7}">{escape(name)}</text>')
    parts += legend
    parts.append("</svg>")
    return "".join(parts)


def bar_rows(values: dict[str, float | None], *, highlight: str | None = None) -> str:
    """Table rows (<tr>) of name, value and a horizontal bar of value in [0, 1]."""
    rows = []
    for name, value in values.items():
        cls = ' class="highlight"' if name == highlight else ""
        if value is None:
            rows.append(f"<tr{cls}><th>{escape(name)}</th><td>n/a</td><td></td></tr>")
            continue
        pct = max(0.0, min(1.0, float(value))) * 100
        rows.append(f'<tr{cls}><th>{escape(name)}</th><td class="num">{value:.4f}</td>'
                    f'<td class="barcell"><div class="bar" style="width:{pct:.1f}%"></div>'
                    "</td></tr>")
    return "".join(rows)


def confusion_matrix(actual: np.ndarray, predicted: np.ndarray, class_names: Sequence[str]
                     ) -> str:
    """An HTML table of counts, rows = true class, columns = predicted class; each cell is
    shaded by its share of the row (the diagonal is recall). actual, predicted: (n,) int64
    in [0, C)."""
    c = len(class_names)
    counts = np.zeros((c, c), dtype=np.int64)
    np.add.at(counts, (actual, predicted), 1)
    totals = counts.sum(axis=1)
    head = "".join(f'<th class="col" title="{escape(n)}">{escape(n)}</th>'
                   for n in class_names)
    rows = [f'<table class="confusion"><tr><th class="corner">true \\ predicted</th>{head}'
            "</tr>"]
    for i, name in enumerate(class_names):
        cells = []
        for j in range(c):
            share = counts[i, j] / totals[i] if totals[i] else 0.0
            hue = "46,125,50" if i == j else "198,40,40"
            text = str(counts[i, j]) if counts[i, j] else ""
            cells.append(f'<td style="background:rgba({hue},{share:.3f})"'
                         f'{" class=dark" if share > 0.55 else ""}>{text}</td>')
        rows.append(f'<tr><th class="row">{escape(name)}</th>{"".join(cells)}</tr>')
    rows.append("</table>")
    return "".join(rows)


def key_values(items: dict[str, object]) -> str:
    """A two-column table of a flat mapping (floats with 4 decimals)."""
    rows = []
    for key, value in items.items():
        if isinstance(value, float):
            value = f"{value:.4f}"
        elif value is None:
            value = "n/a"
        rows.append(f"<tr><th>{escape(str(key))}</th><td>{escape(str(value))}</td></tr>")
    return f'<table class="kv">{"".join(rows)}</table>'
