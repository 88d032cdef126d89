"""A grouped bar chart as a small hand-written SVG: no plotting library, the same text for the same numbers.

Groups along x (one per setting), one bar per series within a group (mean, with a +-error bar), and
per group any number of dashed horizontal reference lines (a teacher's score, raw features). Values are on
a fixed 0..`y_max` axis, so bars of different charts compare by eye and a bar's length is its value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence
from xml.sax.saxutils import escape, quoteattr

# Colour-blind-safe palettes (Okabe-Ito), in order: bars, then reference lines.
BAR_COLOURS = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#999999")
LINE_COLOURS = ("#000000", "#D55E00", "#7F7F7F", "#009E73")

TOP, BOTTOM, LEFT = 40.0, 48.0, 56.0
PLOT_HEIGHT = 240.0
BAR_WIDTH, BAR_GAP, GROUP_PAD = 18.0, 3.0, 18.0
LEGEND_WIDTH = 240.0
LEGEND_ROW = 18.0


@dataclass(frozen=True)
class Bar:
    series: str  # legend entry; its colour is the series' place in `series`
    value: float | None  # None: no result yet (no bar is drawn, "n/a" is written)
    error: float = 0.0  # half-length of the error bar
    tooltip: str = ""


@dataclass(frozen=True)
class Line:
    series: str  # legend entry among the reference lines
    value: float
    tooltip: str = ""


def _n(x: float) -> str:
    """Coordinates with 2 decimals and no trailing zeros: short and deterministic."""
    text = f"{x:.2f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _text(x: float, y: float, text: str, size: int = 11, anchor: str = "middle", extra: str = "") -> str:
    return (f'<text x="{_n(x)}" y="{_n(y)}" font-size="{size}" text-anchor="{anchor}"{extra}>'
            f"{escape(text)}</text>")


def grouped_bars(groups: Sequence[tuple[str, Sequence[Bar], Sequence[Line]]], series: Sequence[str],
                 line_series: Sequence[str] = (), title: str = "", x_label: str = "", y_label: str = "",
                 y_max: float = 100.0, y_step: float = 20.0) -> str:
    """The chart's SVG text. `groups`: (label, bars, reference lines); `series` orders the bars' legend and
    colours, `line_series` the lines'. Every drawn bar is a `<rect class="bar">` with data-group and
    data-series attributes, every reference line a `<line class="reference">`."""
    colour = {name: BAR_COLOURS[i % len(BAR_COLOURS)] for i, name in enumerate(series)}
    line_colour = {name: LINE_COLOURS[i % len(LINE_COLOURS)] for i, name in enumerate(line_series)}
    widths = [max(1, len(bars)) * (BAR_WIDTH + BAR_GAP) - BAR_GAP + 2 * GROUP_PAD for _, bars, _ in groups]
    plot_width = max(sum(widths), 120.0)
    width = max(LEFT + plot_width + LEGEND_WIDTH, 16 + 7.0 * len(title))  # room for the title too
    legend_rows = len(series) + len(line_series)
    height = TOP + max(PLOT_HEIGHT, legend_rows * LEGEND_ROW) + BOTTOM
    base = TOP + PLOT_HEIGHT

    def y_of(value: float) -> float:
        return base - PLOT_HEIGHT * min(max(value, 0.0), y_max) / y_max

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_n(width)}" height="{_n(height)}" '
           f'viewBox="0 0 {_n(width)} {_n(height)}" font-family="sans-serif">',
           f'<rect x="0" y="0" width="{_n(width)}" height="{_n(height)}" fill="#ffffff"/>']
    if title:
        out.append(_text(8, TOP / 2 + 4, title, size=13, anchor="start"))
    # Axis, grid and ticks.
    tick = 0.0
    while tick <= y_max + 1e-9:
        y = y_of(tick)
        out.append(f'<line x1="{_n(LEFT)}" y1="{_n(y)}" x2="{_n(LEFT + plot_width)}" y2="{_n(y)}" '
                   f'stroke="#e0e0e0" stroke-width="1"/>')
        out.append(_text(LEFT - 6, y + 4, f"{tick:g}", size=10, anchor="end"))
        tick += y_step
    out.append(f'<line x1="{_n(LEFT)}" y1="{_n(TOP)}" x2="{_n(LEFT)}" y2="{_n(base)}" stroke="#000000"/>')
    out.append(f'<line x1="{_n(LEFT)}" y1="{_n(base)}" x2="{_n(LEFT + plot_width)}" y2="{_n(base)}" '
               f'stroke="#000000"/>')
    if y_label:
        mid = TOP + PLOT_HEIGHT / 2
        out.append(_text(16, mid, y_label, size=12, extra=f' transform="rotate(-90 16 {_n(mid)})"'))
    if x_label:
        out.append(_text(LEFT + plot_width / 2, height - 10, x_label, size=12))
    # Groups: bars with error bars, then the group's reference lines across it.
    x0 = LEFT
    for (label, bars, lines), group_width in zip(groups, widths):
        out.append(f'<g class="group" data-group={quoteattr(label)}>')
        for i, bar in enumerate(bars):
            x = x0 + GROUP_PAD + i * (BAR_WIDTH + BAR_GAP)
            if bar.value is None:
                out.append(_text(x + BAR_WIDTH / 2, base - 4, "n/a", size=8))
                continue
            top = y_of(bar.value)
            tooltip = f"<title>{escape(bar.tooltip)}</title>" if bar.tooltip else ""
            out.append(f'<rect class="bar" data-group={quoteattr(label)} data-series={quoteattr(bar.series)} '
                       f'x="{_n(x)}" y="{_n(top)}" width="{_n(BAR_WIDTH)}" height="{_n(base - top)}" '
                       f'fill="{colour.get(bar.series, "#999999")}">{tooltip}</rect>')
            if bar.error > 0:
                centre, low, high = x + BAR_WIDTH / 2, y_of(bar.value - bar.error), y_of(bar.value + bar.error)
                out.append(f'<path class="error" d="M{_n(centre)} {_n(low)}V{_n(high)}'
                           f'M{_n(centre - 4)} {_n(low)}H{_n(centre + 4)}M{_n(centre - 4)} {_n(high)}'
                           f'H{_n(centre + 4)}" stroke="#000000" stroke-width="1" fill="none"/>')
        for line in lines:
            y = y_of(line.value)
            tooltip = f"<title>{escape(line.tooltip)}</title>" if line.tooltip else ""
            out.append(f'<line class="reference" data-group={quoteattr(label)} data-series={quoteattr(line.series)} '
                       f'x1="{_n(x0 + 4)}" y1="{_n(y)}" x2="{_n(x0 + group_width - 4)}" y2="{_n(y)}" '
                       f'stroke="{line_colour.get(line.series, "#000000")}" stroke-width="1.5" '
                       f'stroke-dasharray="5 3">{tooltip}</line>')
        out.append(_text(x0 + group_width / 2, base + 16, label, size=11))
        out.append("</g>")
        if x0 > LEFT:
            out.append(f'<line x1="{_n(x0)}" y1="{_n(base)}" x2="{_n(x0)}" y2="{_n(base + 6)}" stroke="#000000"/>')
        x0 += group_width
    # Legend.
    lx, ly = LEFT + plot_width + 16, TOP + 6
    out.append('<g class="legend">')
    for name in series:
        out.append(f'<rect x="{_n(lx)}" y="{_n(ly - 9)}" width="12" height="12" fill="{colour[name]}"/>')
        out.append(_text(lx + 18, ly + 1, name, size=11, anchor="start"))
        ly += LEGEND_ROW
    for name in line_series:
        out.append(f'<line x1="{_n(lx)}" y1="{_n(ly - 3)}" x2="{_n(lx + 12)}" y2="{_n(ly - 3)}" '
                   f'stroke="{line_colour[name]}" stroke-width="1.5" stroke-dasharray="5 3"/>')
        out.append(_text(lx + 18, ly + 1, name, size=11, anchor="start"))
        ly += LEGEND_ROW
    out.append("</g>")
    out.append("</svg>")
    return "\n".join(out) + "\n"
