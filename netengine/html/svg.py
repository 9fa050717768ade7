"""Shared pieces of the self-contained HTML pages: the page shell and its style (light and dark
mode, narrow screens), and line charts drawn as inline SVG.

Every page is one file with its styles and scripts inline: it loads no URL, so it works offline
and can be mailed or archived as it is.
"""
from __future__ import annotations

import html
import math

STYLE = """
:root { color-scheme: light dark; --bg: #ffffff; --fg: #1d2025; --muted: #5c6470;
  --panel: #f3f5f7; --border: #c9ced6; --grid: #e2e5ea; --train: #1f63c6; --test: #c4480c;
  --rate: #2b8a3e; --data: #dbe9f7; --conv: #f9dcc4; --pool: #d8f0d2; --act: #f3e7a8;
  --norm: #e6d9f2; --fc: #f6cfd5; --loss: #ffd8a8; --struct: #dde3ea; --rnn: #c9eee8;
  --other: #eceff1; }
@media (prefers-color-scheme: dark) {
  :root { --bg: #15171b; --fg: #e4e7eb; --muted: #9aa3ae; --panel: #1f2329; --border: #3a414b;
    --grid: #2c3139; --train: #6ea8ff; --test: #ff9b5e; --rate: #69db7c; --data: #1e3a57;
    --conv: #5a3a1e; --pool: #24472a; --act: #4d4416; --norm: #3d2d52; --fc: #5a2630;
    --loss: #5c3d12; --struct: #2e3640; --rnn: #1d4a45; --other: #30353c; }
}
* { box-sizing: border-box; }
body { margin: 0; padding: 1rem; background: var(--bg); color: var(--fg);
  font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
h1 { font-size: 1.3rem; margin: 0 0 .4rem; }
header { overflow-wrap: anywhere; }
h2 { font-size: 1rem; margin: 1rem 0 .4rem; }
.muted { color: var(--muted); }
.totals { display: flex; flex-wrap: wrap; gap: .4rem 1.2rem; margin: .4rem 0 1rem; padding: 0;
  list-style: none; }
.totals b { font-variant-numeric: tabular-nums; }
code, pre { font: 12px/1.35 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
pre { white-space: pre-wrap; word-break: break-word; margin: .3rem 0; }
table { border-collapse: collapse; }
td, th { padding: .15rem .6rem .15rem 0; text-align: left; vertical-align: top; }
.charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(min(100%, 420px), 1fr));
  gap: 1rem; }
figure.chart { margin: 0; padding: .5rem; border: 1px solid var(--border); border-radius: 6px;
  background: var(--panel); min-width: 0; }
figure.chart figcaption { font-weight: 600; margin-bottom: .2rem; }
figure.chart svg { width: 100%; height: auto; display: block; }
.chart text { fill: var(--muted); font-size: 11px; }
.chart .grid { stroke: var(--grid); stroke-width: 1; }
.chart .axis { stroke: var(--muted); stroke-width: 1; }
.chart polyline { fill: none; stroke-width: 1.8; stroke-linejoin: round; }
.chart .train { stroke: var(--train); fill: var(--train); }
.chart .test { stroke: var(--test); fill: var(--test); }
.chart .rate { stroke: var(--rate); fill: var(--rate); }
.chart polyline.train, .chart polyline.test, .chart polyline.rate { fill: none; }
.legend { display: flex; gap: 1rem; font-size: 12px; color: var(--muted); }
.legend i { display: inline-block; width: .9rem; height: .2rem; vertical-align: middle;
  margin-right: .3rem; }
"""

FAMILY_COLOURS = ("data", "conv", "pool", "act", "norm", "fc", "loss", "struct", "rnn", "other")


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def page(title: str, body: str, *, head: str = "", script: str = "", style: str = "") -> str:
    """A whole HTML document with the shared style; ``head`` adds elements to <head>."""
    js = f"<script>\n{script}\n</script>\n" if script else ""
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"{head}<title>{esc(title)}</title>\n<style>{STYLE}{style}</style>\n</head>\n"
            f"<body>\n{body}\n{js}</body>\n</html>\n")


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values covering [low, high] (steps of 1, 2 or 5 × 10^k)."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return [0.0, 1.0]
    if high <= low:  # one value: a unit range above it (iterations and rates are >= 0)
        pad = abs(low) * 0.1 or 1.0
        low, high = (low, high + pad) if low >= 0 else (low - pad, high + pad)
    raw = (high - low) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    ticks = [math.floor(low / step) * step]
    while ticks[-1] < high - step * 1e-9:
        ticks.append(round(ticks[0] + len(ticks) * step, 12))
    return ticks


def tick_text(value: float) -> str:
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.0e}"
    return f"{value:g}"


WIDTH, HEIGHT = 640, 250
LEFT, RIGHT, TOP, BOTTOM = 58, 14, 10, 34
# The most points a line draws: a low and a high for about every unit of the plot's width.
MAX_POINTS = 2 * (WIDTH - LEFT - RIGHT)


def thin(points: list[tuple[float, float]], most: int = 0) -> list[tuple[float, float]]:
    """At most ``most`` (MAX_POINTS) points of a line, in order: the lowest and the highest of
    each of most/2 runs of neighbours, so spikes and a divergence stay visible."""
    most = most or MAX_POINTS
    if len(points) <= most:
        return points
    runs, count, out = most // 2, len(points), []
    for k in range(runs):
        first, stop = k * count // runs, (k + 1) * count // runs
        span = range(first, stop)
        low = min(span, key=lambda i: points[i][1])
        high = max(span, key=lambda i: points[i][1])
        out += [points[i] for i in sorted({low, high})]
    return out


def line_chart(series: str, title: str, lines: list[tuple[str, str, list[tuple[float, float]]]],
               x_label: str = "iterations") -> str:
    """One chart as ``<figure class="chart" data-series=SERIES>`` with an inline SVG.

    ``lines`` are (label, css class, [(x, y), ...]); each becomes a polyline whose
    ``data-points`` is its number of points (dots are drawn too where there are few), thinned
    to MAX_POINTS (the legend keeps the full count).
    """
    points = [p for _, _, pts in lines for p in pts]
    xs, ys = [p[0] for p in points] or [0.0], [p[1] for p in points] or [0.0]
    x_ticks, y_ticks = nice_ticks(min(xs), max(xs)), nice_ticks(min(ys), max(ys))
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def sx(x: float) -> float:
        return LEFT + (x - x0) / ((x1 - x0) or 1) * plot_w

    def sy(y: float) -> float:
        return TOP + plot_h - (y - y0) / ((y1 - y0) or 1) * plot_h

    parts = [f'<svg viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{esc(title)}">']
    for y in y_ticks:
        parts.append(f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{sy(y):.1f}" '
                     f'y2="{sy(y):.1f}"/><text x="{LEFT - 6}" y="{sy(y) + 4:.1f}" '
                     f'text-anchor="end">{tick_text(y)}</text>')
    for x in x_ticks:
        parts.append(f'<text x="{sx(x):.1f}" y="{HEIGHT - BOTTOM + 15}" '
                     f'text-anchor="middle">{tick_text(x)}</text>')
    parts.append(f'<line class="axis" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{TOP + plot_h}" '
                 f'y2="{TOP + plot_h}"/><text x="{LEFT + plot_w / 2:.0f}" y="{HEIGHT - 3}" '
                 f'text-anchor="middle">{esc(x_label)}</text>')
    legend = []
    for label, cls, logged in lines:
        pts = thin(logged)
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        parts.append(f'<polyline class="{cls}" data-phase="{cls}" data-points="{len(pts)}" '
                     f'points="{coords}"/>')
        if len(pts) <= 200:  # dots (with a tooltip) where they stay readable
            parts += [f'<circle class="{cls}" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.4">'
                      f'<title>{esc(label)}: iteration {x:g}, {y:.6g}</title></circle>'
                      for x, y in pts]
        legend.append(f'<span><i style="background: var(--{cls})"></i>{esc(label)} '
                      f'({len(logged)})</span>')
    parts.append("</svg>")
    return (f'<figure class="chart" data-series="{esc(series)}">'
            f'<figcaption>{esc(title)}</figcaption>{"".join(parts)}'
            f'<div class="legend">{"".join(legend)}</div></figure>')
