"""Small inline SVG charts for report.html: no script, no network, readable without a browser plug-in.

Each function returns one ``<svg>`` element as text; every label is escaped.
"""
from __future__ import annotations

from html import escape
from typing import Sequence

WIDTH, HEIGHT, PAD = 500, 240, 60
PALETTE = ("#3b6ea8", "#d9822b", "#5b9a4b", "#a84b6e")


def bar_chart(labels: Sequence[str], series: dict[str, Sequence[float]], *, title: str, unit: str = "") -> str:
    """Grouped vertical bars: one group per label, one bar per series."""
    if not labels or not series:
        return ""
    top = max((v for values in series.values() for v in values), default=0.0) or 1.0
    n, k = len(labels), len(series)
    inner_w, inner_h = WIDTH - 2 * PAD, HEIGHT - 2 * PAD
    group_w = inner_w / n
    bar_w = max(group_w * 0.8 / k, 1.0)
    parts = [_frame(title)]
    for j, (name, values) in enumerate(series.items()):
        colour = PALETTE[j % len(PALETTE)]
        for i, v in enumerate(values):
            h = inner_h * (v / top)
            x = PAD + i * group_w + group_w * 0.1 + j * bar_w
            y = PAD + inner_h - h
            parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_w:.1f}" height="{h:.1f}" fill="{colour}"><title>{escape(labels[i])} {escape(name)}: {v:.4g}{escape(unit)}</title></rect>')
        parts.append(_legend(j, name, colour))
    for i, label in enumerate(labels):
        x = PAD + (i + 0.5) * group_w
        parts.append(f'<text x="{x:.1f}" y="{HEIGHT - PAD + 14}" font-size="10" text-anchor="end" transform="rotate(-25 {x:.1f} {HEIGHT - PAD + 14})">{escape(_short(label))}</text>')
    parts.append(f'<text x="{PAD - 6}" y="{PAD + 4}" font-size="10" text-anchor="end">{top:.3g}{escape(unit)}</text>')
    parts.append(f'<text x="{PAD - 6}" y="{PAD + inner_h}" font-size="10" text-anchor="end">0</text>')
    return _svg(parts)


def scatter(points: Sequence[tuple[float, float, str]], *, title: str, x_label: str, y_label: str,
            front: Sequence[tuple[float, float]] = (), highlight: Sequence[tuple[float, float, str]] = ()) -> str:
    """Points ``(x, y, label)``; ``front`` is joined by a line (a Pareto front); ``highlight`` drawn larger."""
    every = [(x, y) for x, y, _ in points] + [(x, y) for x, y, _ in highlight]
    if not every:
        return ""
    xs, ys = [p[0] for p in every], [p[1] for p in every]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-3)
    inner_w, inner_h = WIDTH - 2 * PAD, HEIGHT - 2 * PAD

    def at(x: float, y: float) -> tuple[float, float]:
        return PAD + inner_w * (x - x0) / (x1 - x0), PAD + inner_h * (1 - (y - y0) / (y1 - y0))

    parts = [_frame(title)]
    if front:
        path = " ".join(f"{px:.1f},{py:.1f}" for px, py in (at(x, y) for x, y in sorted(front)))
        parts.append(f'<polyline points="{path}" fill="none" stroke="{PALETTE[1]}" stroke-width="1.5"/>')
    for x, y, label in points:
        px, py = at(x, y)
        parts.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3" fill="{PALETTE[0]}"><title>{escape(label)}: {x:.4g}, {y:.4g}</title></circle>')
    for x, y, label in highlight:
        px, py = at(x, y)
        parts.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="6" fill="none" stroke="{PALETTE[2]}" stroke-width="2"><title>{escape(label)}</title></circle>')
        parts.append(f'<text x="{px + 8:.1f}" y="{py - 6:.1f}" font-size="10">{escape(_short(label))}</text>')
    parts.append(f'<text x="{WIDTH / 2}" y="{HEIGHT - 8}" font-size="11" text-anchor="middle">{escape(x_label)} ({x0:.3g} to {x1:.3g})</text>')
    parts.append(f'<text x="12" y="{HEIGHT / 2}" font-size="11" text-anchor="middle" transform="rotate(-90 12 {HEIGHT / 2})">{escape(y_label)} ({y0:.4g} to {y1:.4g})</text>')
    return _svg(parts)


def _frame(title: str) -> str:
    return (f'<text x="{PAD}" y="18" font-size="13" font-weight="bold">{escape(title)}</text>'
            f'<rect x="{PAD}" y="{PAD}" width="{WIDTH - 2 * PAD}" height="{HEIGHT - 2 * PAD}" fill="none" stroke="#bbb"/>')


def _legend(j: int, name: str, colour: str) -> str:
    x = WIDTH - PAD - 120
    y = 14 + 12 * j
    return f'<rect x="{x}" y="{y - 8}" width="8" height="8" fill="{colour}"/><text x="{x + 12}" y="{y}" font-size="10">{escape(name)}</text>'


def _short(label: str, limit: int = 22) -> str:
    return label if len(label) <= limit else label[: limit - 1] + "…"


def _svg(parts: list[str]) -> str:
    return f'<svg width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img">' + "".join(parts) + "</svg>"
