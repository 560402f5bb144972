"""Graphs as inline SVG, drawn on the server from :mod:`history` points:
no JavaScript, no graphite, nothing fetched by the browser.

Pure functions from numbers to markup; every text that reaches the SVG is
escaped.  A gap (NaN: the series or its node was not seen in a round) breaks
the line instead of being drawn as zero.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

from markupsafe import Markup, escape

from .history import Points


def nice_ceiling(value: float) -> float:
    """The smallest 1/2/5 x 10^n at or above ``value`` (an axis' top)."""
    if not value > 0 or math.isinf(value):
        return 1.0
    exp = math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        top = step * 10.0**exp
        if top >= value * (1 - 1e-9):
            return top
    return 10.0 ** (exp + 1)


def format_number(value: float) -> str:
    """Short human form: 950, 1.2k, 3.4M; rates keep one decimal below 10."""
    if math.isnan(value):
        return "–"
    v = abs(value)
    sign = "-" if value < 0 else ""
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if v >= limit:
            scaled = v / limit
            return f"{sign}{scaled:.1f}{suffix}" if scaled < 10 else f"{sign}{scaled:.0f}{suffix}"
    if v >= 10 or v == int(v):
        return f"{sign}{v:.0f}"
    return f"{sign}{v:.1f}" if v >= 1 else f"{sign}{v:.2f}"


def _segments(xs: Sequence[float], ys: Sequence[float]) -> list[list[tuple[float, float]]]:
    out: list[list[tuple[float, float]]] = []
    current: list[tuple[float, float]] = []
    for x, y in zip(xs, ys):
        if math.isnan(y):
            if current:
                out.append(current)
            current = []
        else:
            current.append((x, y))
    if current:
        out.append(current)
    return out


def _ago(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"-{int(seconds // 3600)}h"
    if seconds >= 60:
        return f"-{int(round(seconds / 60))}m"
    return f"-{int(seconds)}s"


def line_chart(
    points: Points,
    *,
    title: str,
    unit: str = "",
    window: float,
    now: float | None = None,
    width: int = 360,
    height: int = 140,
    css_class: str = "",
) -> Markup:
    """A chart of the last ``window`` seconds ending at ``now``: y from 0 to a
    round maximum, three time labels, the newest value in the title."""
    now = time.time() if now is None else now
    left, right, top, bottom = 44, 8, 22, 18
    plot_w, plot_h = width - left - right, height - top - bottom
    start = now - window
    shown = [(t, v) for t, v in zip(points.times, points.values) if t >= start]
    finite = [v for _, v in shown if not math.isnan(v)]
    top_value = nice_ceiling(max(finite) if finite else 0.0)

    def x_of(t: float) -> float:
        return left + plot_w * (t - start) / window

    def y_of(v: float) -> float:
        return top + plot_h * (1 - max(v, 0.0) / top_value)

    last = points.last()
    label = f"{title}: {format_number(last)}{unit}" if not math.isnan(last) else f"{title}: no data yet"
    parts = [
        f'<svg class="graph {escape(css_class)}" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(label)}" '
        f'data-last="{"" if math.isnan(last) else repr(float(last))}" data-points="{len(finite)}">',
        f"<title>{escape(label)}</title>",
        f'<text class="graph-title" x="{left}" y="14">{escape(label)}</text>',
        f'<rect class="graph-frame" x="{left}" y="{top}" width="{plot_w}" height="{plot_h}"/>',
    ]
    for frac in (0.5, 1.0):
        y = top + plot_h * (1 - frac)
        parts.append(f'<line class="graph-grid" x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}"/>')
        parts.append(f'<text class="graph-axis" x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{escape(format_number(top_value * frac))}</text>')
    parts.append(f'<text class="graph-axis" x="{left - 4}" y="{top + plot_h + 4}" text-anchor="end">0</text>')
    for frac, anchor in ((0.0, "start"), (0.5, "middle"), (1.0, "end")):
        x = left + plot_w * frac
        text = "now" if frac == 1.0 else _ago(window * (1 - frac))
        parts.append(f'<text class="graph-axis" x="{x:.1f}" y="{height - 4}" text-anchor="{anchor}">{text}</text>')
    xs = [x_of(t) for t, _ in shown]
    ys = [v for _, v in shown]
    for seg in _segments(xs, ys):
        if len(seg) == 1:
            x, v = seg[0]
            parts.append(f'<circle class="graph-dot" cx="{x:.1f}" cy="{y_of(v):.1f}" r="2"/>')
            continue
        coords = " ".join(f"{x:.1f},{y_of(v):.1f}" for x, v in seg)
        base = top + plot_h
        parts.append(f'<polygon class="graph-area" points="{seg[0][0]:.1f},{base} {coords} {seg[-1][0]:.1f},{base}"/>')
        parts.append(f'<polyline class="graph-line" points="{coords}"/>')
    parts.append("</svg>")
    return Markup("".join(parts))


def sparkline(points: Points, *, window: float, now: float | None = None, width: int = 120, height: int = 24, label: str = "") -> Markup:
    """A small line without axes, for table cells."""
    now = time.time() if now is None else now
    start = now - window
    shown = [(t, v) for t, v in zip(points.times, points.values) if t >= start]
    finite = [v for _, v in shown if not math.isnan(v)]
    top_value = nice_ceiling(max(finite) if finite else 0.0)
    xs = [1 + (width - 2) * (t - start) / window for t, _ in shown]
    ys = [v for _, v in shown]
    parts = [
        f'<svg class="sparkline" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="{escape(label)}" data-points="{len(finite)}">'
    ]
    for seg in _segments(xs, ys):
        coords = " ".join(f"{x:.1f},{1 + (height - 2) * (1 - max(v, 0.0) / top_value):.1f}" for x, v in seg)
        if len(seg) == 1:
            coords += f" {seg[0][0] + 1:.1f},{1 + (height - 2) * (1 - max(seg[0][1], 0.0) / top_value):.1f}"
        parts.append(f'<polyline class="graph-line" points="{coords}"/>')
    parts.append("</svg>")
    return Markup("".join(parts))
