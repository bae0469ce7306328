"""The sweep's report: one self-contained HTML page (a table and inline SVG, no scripts, as the
evaluation report draws), logged to the parent MLflow run: every trial with its values, how it ended
and its metric, and the metric against each searched field."""

from __future__ import annotations

import html
import math
from typing import Any

WIDTH, HEIGHT = 360, 160
POINT_COLORS = {"best": "#d0594a", "finished": "#3b7dd8", "stopped": "#9aa"}


def render_sweep_report(
    title: str, fields: dict[str, str], metric: str, mode: str, trials: list[dict[str, Any]], best: str | None
) -> str:
    """`fields`: searched field -> its domain as written; `trials`: dicts with trial, values, outcome, step, metric."""
    plots = "".join(
        f"<div style='display:inline-block;margin:8px'><b>{html.escape(field)}</b> {html.escape(domain)}"
        f"{_scatter(field, domain, metric, trials, best)}</div>"
        for field, domain in fields.items()
    )
    return (
        f"<html><head><meta charset='utf-8'><title>kftune sweep {html.escape(title)}</title></head>"
        f"<body style='font-family:sans-serif'><h2>kftune sweep: {html.escape(title)}</h2>"
        f"<p>{len(trials)} trials, compared by {metric} ({mode}imum) at their last validation; "
        f"ASHA stops trials that trail the others. Best: {html.escape(best or 'none')}</p>"
        f"<h3>Trials</h3>{_table(fields, metric, trials, best)}"
        f"<h3>{html.escape(metric)} against each searched field</h3>{plots}"
        f"<p><span style='color:{POINT_COLORS['best']}'>&#9679; best</span> "
        f"<span style='color:{POINT_COLORS['finished']}'>&#9679; finished</span> "
        f"<span style='color:{POINT_COLORS['stopped']}'>&#9679; stopped early or failed</span></p>"
        "</body></html>"
    )


def _table(fields: dict[str, str], metric: str, trials: list[dict[str, Any]], best: str | None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ["trial", *fields, "outcome", "steps", metric])
    rows = []
    for trial in trials:
        style = " style='background:#fde8e4'" if trial["trial"] == best else ""
        cells = [trial["trial"], *(_text(trial["values"].get(f)) for f in fields), trial["outcome"], trial["step"]]
        cells.append("-" if trial["metric"] is None else f"{trial['metric']:.4f}")
        rows.append(f"<tr{style}>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    return f"<table border=1 cellpadding=4 style='border-collapse:collapse'><tr>{head}</tr>{''.join(rows)}</table>"


def _scatter(field: str, domain: str, metric: str, trials: list[dict[str, Any]], best: str | None) -> str:
    points = [(t["values"].get(field), t["metric"], t) for t in trials if t["metric"] is not None]
    if not points:
        return "<p>(no trial reported the metric)</p>"
    numeric = all(isinstance(x, int | float) and not isinstance(x, bool) for x, _, _ in points)
    if numeric:
        logarithmic = domain.startswith("loguniform") or (
            min(x for x, _, _ in points) > 0 and max(x for x, _, _ in points) / min(x for x, _, _ in points) >= 100
        )
        scale = math.log10 if logarithmic else float
        xs = [scale(x) for x, _, _ in points]
        low, high = min(xs), max(xs)
        place = [(x - low) / ((high - low) or 1.0) for x in xs]
        labels = [(0.0, _text(min(p[0] for p in points))), (1.0, _text(max(p[0] for p in points)))]
    else:
        categories = sorted({_text(x) for x, _, _ in points})
        spot = {c: (i + 0.5) / len(categories) for i, c in enumerate(categories)}
        place = [spot[_text(x)] for x, _, _ in points]
        labels = list(zip(spot.values(), categories, strict=True))
    values = [y for _, y, _ in points]
    y_low, y_high = min(values), max(values)
    marks = []
    for fraction, (_, y, trial) in zip(place, points, strict=True):
        kind = "best" if trial["trial"] == best else "finished" if trial["outcome"] == "finished" else "stopped"
        cx = 10 + fraction * (WIDTH - 20)
        cy = HEIGHT - 10 - (y - y_low) / ((y_high - y_low) or 1.0) * (HEIGHT - 20)
        tip = html.escape(f"{trial['trial']}: {_text(trial['values'].get(field))} -> {y:.4f}")
        marks.append(
            f"<circle cx='{cx:.1f}' cy='{cy:.1f}' r='4' fill='{POINT_COLORS[kind]}'><title>{tip}</title></circle>"
        )
    ticks = "".join(
        f"<text x='{60 + 10 + f * (WIDTH - 20):.1f}' y='{HEIGHT + 14}' text-anchor='middle'>{html.escape(text)}</text>"
        for f, text in labels
    )
    return (
        f"<svg width='{WIDTH + 70}' height='{HEIGHT + 20}' style='font:11px sans-serif'>"
        f"<text x='0' y='10'>{y_high:.4f}</text><text x='0' y='{HEIGHT}'>{y_low:.4f}</text>"
        f"<g transform='translate(60,0)'><rect width='{WIDTH}' height='{HEIGHT}' fill='none' stroke='#ccc'/>"
        f"{''.join(marks)}</g>{ticks}</svg>"
    )


def _text(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
