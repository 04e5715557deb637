"""A release report's per-suite comparison as inline SVG: base vs adapter, one panel per
suite, each on its own scale (suites measure different things: rates, log-likelihood
margins), with the suite's verdict beside it.

Pure: a report's suites in, an SVG string out; every text is escaped here. Must not
import anything of the gateway's but its own module.
"""

from __future__ import annotations

from html import escape
from typing import Any

WIDTH = 720
LABEL_W = 220
BAR_W = 380
ROW_H = 20
GAP = 18
COLORS = {"base": "#8a94a6", "adapter": "#2f6fdb"}
STATUS_COLORS = {"pass": "#1b7f3b", "fail": "#b42318", "not_applicable": "#8a6d00",
                 "reported": "#555", "not_run": "#555"}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def plottable(suites: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The suites that have both a base and an adapter number."""
    return [s for s in suites
            if _number(s.get("base")) is not None and _number(s.get("adapter")) is not None]


def _bar(y: float, value: float, scale: float, zero_x: float, which: str) -> str:
    width = abs(value) * scale
    x = zero_x if value >= 0 else zero_x - width
    return (f'<rect class="bar-{which}" x="{x:.1f}" y="{y:.1f}" width="{max(width, 1):.1f}" '
            f'height="{ROW_H - 4}" fill="{COLORS[which]}"><title>{which}: {value:.4g}'
            f'</title></rect>'
            f'<text x="{LABEL_W + BAR_W + 8}" y="{y + ROW_H - 8:.1f}" font-size="12">'
            f'{which} {value:.3f}</text>')


def _panel(suite: dict[str, Any], top: float) -> str:
    base, adapter = float(suite["base"]), float(suite["adapter"])
    span = max(abs(base), abs(adapter), 1e-9)
    signed = min(base, adapter) < 0
    zero_x = LABEL_W + (BAR_W / 2 if signed else 0)
    scale = (BAR_W / 2 if signed else BAR_W) / span
    status = str(suite.get("status", ""))
    name = escape(str(suite.get("name", "?")))
    metric = escape(str(suite.get("metric", "")))
    color = STATUS_COLORS.get(status, "#555")
    return (f'<g class="suite" data-suite="{name}">'
            f'<text x="0" y="{top + 14:.1f}" font-size="13" font-weight="600">{name}</text>'
            f'<text x="0" y="{top + 30:.1f}" font-size="11" fill="#555">{metric}</text>'
            f'<text x="0" y="{top + 46:.1f}" font-size="11" fill="{color}">'
            f'{escape(status)}</text>'
            f'<line x1="{zero_x:.1f}" x2="{zero_x:.1f}" y1="{top:.1f}" '
            f'y2="{top + 2 * ROW_H:.1f}" stroke="#333"/>'
            + _bar(top, base, scale, zero_x, "base")
            + _bar(top + ROW_H, adapter, scale, zero_x, "adapter")
            + "</g>")


def suites_svg(suites: list[dict[str, Any]]) -> str:
    """The plot, or an empty string when no suite has numbers to compare."""
    shown = plottable(suites)
    if not shown:
        return ""
    panel_h = 2 * ROW_H + GAP + 12
    height = 24 + panel_h * len(shown)
    legend = "".join(
        f'<rect x="{LABEL_W + i * 110}" y="4" width="12" height="12" fill="{COLORS[w]}"/>'
        f'<text x="{LABEL_W + i * 110 + 16}" y="14" font-size="12">{w}</text>'
        for i, w in enumerate(("base", "adapter")))
    panels = "".join(_panel(s, 24 + i * panel_h) for i, s in enumerate(shown))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="suite-plot" role="img" '
            f'width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" '
            f'aria-label="base vs adapter per suite">'
            f'<title>Base vs adapter per suite</title>{legend}{panels}</svg>')
