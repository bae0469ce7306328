"""The evaluation report: one self-contained HTML page (tables and inline SVG, no scripts), shown by
the KFP UI as an HTML artifact and logged to MLflow."""

from __future__ import annotations

import html
from typing import Any

CURVE_COLORS = ("#d0594a", "#3b7dd8")


def _loss_svg(series: dict[str, list[tuple[int, float]]], width: int = 480, height: int = 160) -> str:
    """Loss curves over the optimizer step on shared axes: training, and validation when the run evaluated during training."""
    drawn = {name: points for name, points in series.items() if len(points) >= 2}
    if not drawn:
        return "<p>(too few steps for a curve)</p>"
    values = [v for points in drawn.values() for _, v in points]
    steps = [step for points in drawn.values() for step, _ in points]
    low, high, first = min(values), max(values), min(steps)
    span, length = (high - low) or 1.0, (max(steps) - first) or 1
    lines, legend = [], []
    for (name, points), color in zip(drawn.items(), CURVE_COLORS, strict=False):
        xy = " ".join(
            f"{(step - first) * width / length:.1f},{height - (v - low) / span * (height - 10) - 5:.1f}"
            for step, v in points
        )
        lines.append(f"<polyline fill='none' stroke='{color}' stroke-width='1.5' points='{xy}'/>")
        legend.append(f"<span style='color:{color}'>&#9632; {html.escape(name)}</span>")
    return (
        f"<p>{' '.join(legend)} (steps {first}-{max(steps)})</p>"
        f"<svg width='{width + 60}' height='{height + 20}' style='font:11px sans-serif'>"
        f"<text x='0' y='10'>{high:.3f}</text><text x='0' y='{height}'>{low:.3f}</text>"
        f"<g transform='translate(50,0)'><rect width='{width}' height='{height}' fill='none' stroke='#ccc'/>"
        f"{''.join(lines)}</g></svg>"
    )


def _bars(evaluation: dict[str, Any], metric_names: list[str]) -> str:
    rows = []
    for metric in metric_names:
        for model in ("base", "tuned"):
            if model not in evaluation:
                continue
            value = evaluation[model][metric]
            width = int(300 * min(value, 1.0)) if metric != "perplexity" else 0
            bar = (
                f"<div style='background:{'#9aa' if model == 'base' else '#4a7bd0'};height:14px;width:{width}px'></div>"
                if width
                else ""
            )
            rows.append(f"<tr><td>{metric}</td><td>{model}</td><td>{value:.4f}</td><td>{bar}</td></tr>")
    return (
        "<table cellpadding=4><tr><th>metric</th><th>model</th><th>value</th><th></th></tr>"
        + "".join(rows)
        + "</table>"
    )


def _confusion(evaluation: dict[str, Any], model: str) -> str:
    matrix = evaluation.get(model, {}).get("confusion_matrix")
    if not matrix:
        return ""
    names = evaluation["label_names"]
    head = "".join(f"<th>pred {html.escape(n)}</th>" for n in names)
    body = "".join(
        f"<tr><th>true {html.escape(names[i])}</th>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>"
        for i, row in enumerate(matrix)
    )
    return f"<h3>Confusion matrix, {model}</h3><table border=1 cellpadding=4><tr><th></th>{head}</tr>{body}</table>"


def _forgetting(evaluation: dict[str, Any]) -> str:
    result = evaluation.get("forgetting")
    if not result:
        return ""
    if result["metric"] == "general_perplexity":
        answers = result["base_answer_loss"]
        lines = [
            f"perplexity on general text ({result['lines']} held-out passages): base {result['base']:.3f}, tuned {result['tuned']:.3f} ({result['change']:+.3f})",
            f"loss on the base model's own answers to general prompts (per token): base {answers['base']:.4f}, tuned {answers['tuned']:.4f} (the forgetting score is the rise)",
        ]
    else:
        lines = [
            f"rank correlation of pairwise sentence similarities on {result['lines']} held-out general passages, tuned vs base: {result['tuned']:.4f} (1.0 = unchanged)"
        ]
        if "masked_lm_loss" in result:
            loss = result["masked_lm_loss"]
            lines.append(f"masked-LM loss on them: base {loss['base']:.4f}, tuned {loss['tuned']:.4f}")
    lines.append(
        f"forgetting score: {result['score']:.4f} (0 = nothing forgotten; registry.gate.max_forgetting compares it)"
    )
    return "<h3>Forgetting</h3>" + "".join(f"<p>{html.escape(line)}</p>" for line in lines)


def _samples(evaluation: dict[str, Any]) -> str:
    samples = evaluation.get("tuned", {}).get("samples")
    if not samples:
        return ""
    rows = "".join(
        f"<tr><td><pre>{html.escape(s['generated'])}</pre></td><td><pre>{html.escape(s['reference'])}</pre></td></tr>"
        for s in samples
    )
    return f"<h3>Generations (greedy), tuned</h3><table border=1 cellpadding=4><tr><th>generated</th><th>reference</th></tr>{rows}</table>"


def _loss_series(history: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    return {
        "training": [(r["step"], r["loss"]) for r in history],
        "validation": [(r["step"], r["validation_loss"]) for r in history if "validation_loss" in r],
    }


def render_report(run_name: str, evaluation: dict[str, Any], train_log: dict[str, Any], metric_names: list[str]) -> str:
    trainable = train_log["trainable_parameters"]
    total = train_log["total_parameters"]
    return (
        f"<html><head><meta charset='utf-8'><title>kftune {html.escape(run_name)}</title></head>"
        f"<body style='font-family:sans-serif'><h2>kftune evaluation: {html.escape(run_name)}</h2>"
        f"<p>test split: {evaluation['rows']} rows · trainable parameters {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)"
        f" · {train_log['steps']} steps in {train_log['seconds']} s ({train_log['seconds_per_step']} s/step, {train_log['workers']} workers)</p>"
        f"<h3>Base vs tuned</h3>{_bars(evaluation, metric_names)}"
        f"<h3>Loss</h3>{_loss_svg(_loss_series(train_log['history']))}"
        f"{_forgetting(evaluation)}{_samples(evaluation)}"
        f"{_confusion(evaluation, 'tuned')}{_confusion(evaluation, 'base')}"
        "</body></html>"
    )
