"""The retention trade-off: task metric against forgetting, for full fine-tuning and LoRA with each
retention remedy at two or three strengths, one budget per model.

- stories260K (a 292,800-parameter Llama) instruction-tuned on Stanford Alpaca (the first 300 records,
  10% held out), 1 epoch, batch 8, max_length 256. Task metric: test perplexity (lower is better).
  Forgetting: the evaluate step's `forgetting.score`, the rise of the per-token loss of the base's own
  answers to held-out general prompts (nats; `kftune.retention.forgetting`).
- MiniLM-L6 on SST-2 (examples/sst2-minilm-lora.yaml): the first 1,000 training rows, 1 epoch, batch 32,
  max_length 64, scored on the 872-sentence dev set. Task metric: dev accuracy (higher is better).
  Forgetting: `forgetting.score`, 1 - the rank correlation of pairwise sentence similarities, base vs tuned.

One Ray worker with 2 CPUs. Each row runs the pipeline's step functions in one process (data prepared
and tokenized once per model, Ray started once, MLflow skipped).

    python bench/retention_table.py stories260K [ROW ...]   # all of the model's rows, or the named ones
    python bench/retention_table.py minilm [ROW ...]
    python bench/retention_table.py --report                # tables, plot and HTML from the records

Each row appends one JSON line to bench/results/retention.jsonl. `--report` reads the latest record of
every row and prints the Markdown tables for docs/retention.md, with the Pareto front marked and whether
some setting halves plain full fine-tuning's forgetting for at most 1 point of task metric; it draws
docs/retention_tradeoff.svg (matplotlib) and writes docs/retention_report.html (the tables, showing the plot next to it).
"""

from __future__ import annotations

import html
import json
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS_FILE = "retention.jsonl"
PLOT = REPO / "docs" / "retention_tradeoff.svg"
REPORT = REPO / "docs" / "retention_report.html"


@dataclass(frozen=True)
class Model:
    title: str
    config: Path
    budget: list[str]
    rows: dict[str, list[str]]
    task_metric: str
    """The evaluation metric the task is scored by (`evaluation["tuned"][task_metric]`)."""
    higher_is_better: bool
    point: float
    """One point of the task metric: a unit of perplexity, a percentage point of accuracy."""
    forgetting: str


def remedy_rows(prefix: str, method: list[str], remedies: dict[str, str]) -> dict[str, list[str]]:
    return {prefix: method} | {
        f"{prefix} + {name}": [*method, f"retention.{value}"] for name, value in remedies.items()
    }


def strengths(name: str, setting: str, values: list[float]) -> dict[str, str]:
    """`{"l2_sp 0.1": "l2_sp={alpha: 0.1}", ...}` for `strengths("l2_sp", "l2_sp={{alpha: {}}}", [0.1, ...])`."""
    return {f"{name} {value:g}": setting.format(value) for value in values}


def anchors(values: list[float]) -> dict[str, str]:
    return strengths("l2_sp", "l2_sp={{alpha: {}}}", values) | strengths("ewc", "ewc={{strength: {}}}", values)


STORIES_FULL = ["method={name: full}", "train.lr=2e-3"]
STORIES_LORA = ["method={name: lora, r: 8, target_modules: all-linear}", "train.lr=5e-3"]
CAUSAL_REMEDIES = anchors([0.1, 1.0, 10.0]) | {
    "distill general 1": "distill={weight: 1.0, inputs: [general]}",
    "distill general 4": "distill={weight: 4.0, inputs: [general]}",
    "replay 0.5": "replay={ratio: 0.5, weight: 1.0}",
    "replay 1 x2": "replay={ratio: 1.0, weight: 2.0}",
    "generated replay 0.25 x0.5": "replay={ratio: 0.25, weight: 0.5, generated: true}",
    "generated replay 0.5": "replay={ratio: 0.5, weight: 1.0, generated: true}",
}
MINILM_FULL = ["method={name: full}", "train.lr=1e-4"]
MINILM_LORA = ["method={name: lora, r: 8, target_modules: [query, value]}", "train.lr=5e-3"]
ENCODER_REMEDIES = anchors([0.01, 0.1, 1.0, 10.0]) | strengths(
    "distill general", "distill={{weight: {}, inputs: [general]}}", [0.1, 1.0, 10.0]
)

MODELS = {
    "stories260K": Model(
        "stories260K on Alpaca",
        REPO / "examples" / "alpaca-en-stories.yaml",
        [
            "prompt.packing=false",
            "prompt.max_length=256",
            "train.epochs=1",
            "train.batch_size=8",
            "train.workers=1",
            "train.cpus_per_worker=2",
            "eval.metrics=[perplexity]",
            "eval.compare_base=false",
            "eval.batch_size=16",
        ],
        remedy_rows("full", STORIES_FULL, CAUSAL_REMEDIES) | remedy_rows("lora", STORIES_LORA, CAUSAL_REMEDIES),
        "perplexity",
        False,
        1.0,
        "rise of the loss on the base's own answers (nats/token)",
    ),
    "minilm": Model(
        "MiniLM-L6 on SST-2",
        REPO / "examples" / "sst2-minilm-lora.yaml",
        [
            "data.max_rows=1000",
            "train.epochs=1",
            "train.batch_size=32",
            "prompt.max_length=64",
            "train.workers=1",
            "train.cpus_per_worker=2",
            "eval.metrics=[accuracy]",
            "eval.compare_base=false",
        ],
        remedy_rows("full", MINILM_FULL, ENCODER_REMEDIES) | remedy_rows("lora", MINILM_LORA, ENCODER_REMEDIES),
        "accuracy",
        True,
        0.01,
        "1 - rank correlation of sentence similarities",
    ),
}


def run_row(key: str, row: str, prompts_dir: Path, work: Path) -> dict:
    from kftune import steps
    from kftune.config import config_to_dict, load_config

    model = MODELS[key]
    config = config_to_dict(load_config(model.config, [*model.budget, *model.rows[row]]))
    model_dir = work / "model"
    train = steps.train(config, str(prompts_dir), str(model_dir), run_name=f"bench-{abs(hash(row))}")
    steps.evaluate(config, str(prompts_dir), str(model_dir), str(work / "evaluation"), str(work / "report.html"))
    evaluation = json.loads((work / "evaluation" / steps.EVALUATION_FILE).read_text())
    return {
        "model": key,
        "row": row,
        "settings": model.rows[row],
        "task_metric": model.task_metric,
        "task": evaluation["tuned"][model.task_metric],
        "forgetting": evaluation["forgetting"],
        "train_seconds": train["seconds"],
        "steps": train["steps"],
    }


def task_and_forgetting(record: dict) -> tuple[float, float]:
    """(task metric, forgetting) of a record; records from before the `model` field (stories260K, 2026-11-30
    03:35-03:41) kept their numbers in flat fields and a perplexity-based score, so their forgetting is
    recomputed from the answer losses they also recorded."""
    if "model" in record:
        return record["task"], record["forgetting"]["score"]
    return record["test_perplexity"], record["base_answer_loss"] - record["base_answer_loss_of_base"]


def latest_records() -> dict[str, dict[str, dict]]:
    """The latest record of every row, per model, in the order of `MODELS[...].rows`."""
    latest: dict[str, dict[str, dict]] = {key: {} for key in MODELS}
    for line in (REPO / "bench" / "results" / RESULTS_FILE).read_text().splitlines():
        record = json.loads(line)
        key = record.get("model", "stories260K")
        if record["row"] in MODELS[key].rows:
            latest[key][record["row"]] = record
    return {key: {row: rows[row] for row in MODELS[key].rows if row in rows} for key, rows in latest.items()}


def pareto(points: dict[str, tuple[float, float]], higher_is_better: bool) -> set[str]:
    """Rows no other row beats on both the task metric and forgetting (lower forgetting is better)."""
    cost = {row: (-task if higher_is_better else task, forgetting) for row, (task, forgetting) in points.items()}
    return {
        row
        for row, mine in cost.items()
        if not any(o[0] <= mine[0] and o[1] <= mine[1] and o != mine for o in cost.values())
    }


def halving_verdict(model: Model, points: dict[str, tuple[float, float]]) -> str:
    """Whether some row halves plain full fine-tuning's forgetting for at most one point of task metric."""
    if "full" not in points:
        return "no plain full fine-tuning row measured"
    task, forgetting = points["full"]
    worst = task - model.point if model.higher_is_better else task + model.point
    good = [
        row
        for row, (t, f) in points.items()
        if f <= forgetting / 2 and (t >= worst if model.higher_is_better else t <= worst)
    ]
    unit = "accuracy" if model.higher_is_better else "perplexity"
    head = f"plain full fine-tuning: {unit} {task:.4g}, forgetting {forgetting:.4f}; halved = at most {forgetting / 2:.4f} with {unit} {'>=' if model.higher_is_better else '<='} {worst:.4g}"
    if good:
        return f"{head}. Yes: " + ", ".join(f"{row} ({points[row][0]:.4g}, {points[row][1]:.4f})" for row in good)
    halved = [row for row, (_, f) in points.items() if f <= forgetting / 2]
    best = (max if model.higher_is_better else min)(halved, key=lambda r: points[r][0]) if halved else None
    return f"{head}. No" + (
        f": the best row that halves it is {best} ({unit} {points[best][0]:.4g}, forgetting {points[best][1]:.4f})"
        if best
        else ": no row halves it"
    )


def markdown(key: str, records: dict[str, dict]) -> str:
    model = MODELS[key]
    points = {row: task_and_forgetting(r) for row, r in records.items()}
    front = pareto(points, model.higher_is_better)
    lines = [
        f"| run | {model.task_metric} | forgetting: {model.forgetting} | train s | Pareto |",
        "|---|---|---|---|---|",
    ]
    for row, record in records.items():
        task, forgetting = points[row]
        lines.append(
            f"| {row} | {task:.4f} | {forgetting:.4f} | {record['train_seconds']:.1f} | {'*' if row in front else ''} |"
        )
    return "\n".join(lines) + "\n\n" + halving_verdict(model, points)


def plot(latest: dict[str, dict[str, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["svg.fonttype"] = "none"  # text as text, not glyph outlines: a small, searchable file
    import matplotlib.pyplot as plt

    shown = [key for key in MODELS if latest[key]]
    figure, all_axes = plt.subplots(1, len(shown), figsize=(7 * len(shown), 5.5), squeeze=False)
    for key, axes in zip(shown, all_axes[0], strict=True):
        model = MODELS[key]
        points = {row: task_and_forgetting(r) for row, r in latest[key].items()}
        front = pareto(points, model.higher_is_better)
        for row, (task, forgetting) in points.items():
            axes.scatter(
                forgetting,
                task,
                color="tab:red" if row in front else "tab:blue",
                marker="o" if row.startswith("full") else "^",
            )
            axes.annotate(row, (forgetting, task), fontsize=6)
        if "full" in points:  # the region that halves plain full fine-tuning's forgetting within one point
            task, forgetting = points["full"]
            axes.axvline(forgetting / 2, color="grey", linestyle="--", linewidth=0.8)
            axes.axhline(
                task - model.point if model.higher_is_better else task + model.point,
                color="grey",
                linestyle="--",
                linewidth=0.8,
            )
        ordered = sorted((points[row][1], points[row][0]) for row in front)
        axes.plot([f for f, _ in ordered], [t for _, t in ordered], color="tab:red", linewidth=0.8)
        axes.set_xlabel(f"forgetting: {model.forgetting}")
        axes.set_ylabel(f"{model.task_metric} ({'higher' if model.higher_is_better else 'lower'} is better)")
        axes.set_title(
            f"{model.title} (red: Pareto front; o full, ^ LoRA; dashed: half of full's forgetting, 1 point worse)",
            fontsize=8,
        )
    figure.tight_layout()
    figure.savefig(path, metadata={"Date": None})  # no timestamp: the same records draw the same file


def html_report(latest: dict[str, dict[str, dict]]) -> str:
    sections = []
    for key, records in latest.items():
        if not records:
            continue
        model = MODELS[key]
        points = {row: task_and_forgetting(r) for row, r in records.items()}
        front = pareto(points, model.higher_is_better)
        body = "".join(
            f"<tr{' style=font-weight:bold' if row in front else ''}><td>{html.escape(row)}</td>"
            f"<td>{points[row][0]:.4f}</td><td>{points[row][1]:.4f}</td><td>{r['train_seconds']:.1f}</td>"
            f"<td>{'Pareto' if row in front else ''}</td></tr>"
            for row, r in records.items()
        )
        budget = html.escape(" ".join(next(iter(records.values()))["budget"]))
        sections.append(
            f"<h2>{html.escape(model.title)}</h2><p>budget: <code>{budget}</code></p>"
            f"<table border=1 cellpadding=4><tr><th>run</th><th>{model.task_metric}</th>"
            f"<th>forgetting: {html.escape(model.forgetting)}</th><th>train s</th><th></th></tr>{body}</table>"
            f"<p>{html.escape(halving_verdict(model, points))}</p>"
        )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>kftune retention trade-off</title></head>"
        "<body style='font:14px sans-serif'><h1>Retention trade-off: task metric against forgetting</h1>"
        "<p>Written by <code>python bench/retention_table.py --report</code> from bench/results/retention.jsonl "
        "(the latest record of each row; Pareto-front rows in bold).</p>"
        f"<img src='{PLOT.name}' alt='task metric against forgetting, Pareto front in red'>{''.join(sections)}</body></html>"
    )


def report() -> None:
    latest = latest_records()
    for key, records in latest.items():
        if records:
            print(f"### {MODELS[key].title}\n\n{markdown(key, records)}\n")
    plot(latest, PLOT)
    REPORT.write_text(html_report(latest))
    print(f"wrote {PLOT.relative_to(REPO)} and {REPORT.relative_to(REPO)}")


def main(argv: list[str]) -> None:
    from step_tables import run_table

    if argv == ["--report"]:
        return report()
    if not argv or argv[0] not in MODELS:
        raise SystemExit(f"usage: bench/retention_table.py {{{','.join(MODELS)}}} [ROW ...] | --report")
    key, names = argv[0], argv[1:]
    unknown = sorted(set(names) - set(MODELS[key].rows))
    if unknown:
        raise SystemExit(f"unknown rows: {', '.join(unknown)} (rows: {', '.join(MODELS[key].rows)})")
    command = "python bench/retention_table.py " + " ".join(f"'{a}'" if " " in a else a for a in argv)
    model = MODELS[key]
    run_table(
        model.config,
        model.budget,
        names or list(model.rows),
        lambda row, prompts, work: run_row(key, row, prompts, work),
        RESULTS_FILE,
        command,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
