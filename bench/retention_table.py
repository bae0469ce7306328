"""The retention trade-off: task metric against forgetting, for full fine-tuning and LoRA with each
retention remedy at a few strengths, one budget.

stories260K (a 292,800-parameter Llama) instruction-tuned on Stanford Alpaca (the first 300
records, 10% held out for the test perplexity), 1 epoch, batch 8, max_length 256, one Ray worker
with 2 CPUs. Task metric: test perplexity (lower is better). Forgetting: the evaluate step's
`forgetting.score` (relative rise of perplexity on held-out general text) and the per-token loss of
the base model's own answers to held-out general prompts (`kftune.retention.forgetting`).

    python bench/retention_table.py [ROW ...]    # all rows, or the named ones

Runs the pipeline's step functions in one process (data prepared and tokenized once, Ray started
once, MLflow skipped). Prints a Markdown table with the Pareto front marked (for docs/retention.md),
appends one JSON line per row to bench/results/retention.jsonl, and with matplotlib installed draws
docs/retention_tradeoff.svg.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "examples" / "alpaca-en-stories.yaml"
BUDGET = [
    "prompt.packing=false",
    "prompt.max_length=256",
    "train.epochs=1",
    "train.batch_size=8",
    "train.workers=1",
    "train.cpus_per_worker=2",
    "eval.metrics=[perplexity]",
    "eval.compare_base=false",
    "eval.batch_size=16",
]
FULL = ["method={name: full}", "train.lr=2e-3"]
LORA = ["method={name: lora, r: 8, target_modules: all-linear}", "train.lr=5e-3"]

ROWS = {
    "full": FULL,
    "full + l2_sp 0.01": [*FULL, "retention.l2_sp={alpha: 0.01}"],
    "full + l2_sp 0.1": [*FULL, "retention.l2_sp={alpha: 0.1}"],
    "full + l2_sp 1": [*FULL, "retention.l2_sp={alpha: 1.0}"],
    "full + ewc 0.1": [*FULL, "retention.ewc={strength: 0.1}"],
    "full + ewc 1": [*FULL, "retention.ewc={strength: 1.0}"],
    "full + distill general 1": [*FULL, "retention.distill={weight: 1.0, inputs: [general]}"],
    "full + distill general 4": [*FULL, "retention.distill={weight: 4.0, inputs: [general]}"],
    "full + replay 0.5": [*FULL, "retention.replay={ratio: 0.5, weight: 1.0}"],
    "full + replay 1 x2": [*FULL, "retention.replay={ratio: 1.0, weight: 2.0}"],
    "full + generated replay 0.5": [*FULL, "retention.replay={ratio: 0.5, weight: 1.0, generated: true}"],
    "lora": LORA,
    "lora + l2_sp 1": [*LORA, "retention.l2_sp={alpha: 1.0}"],
    "lora + distill general 1": [*LORA, "retention.distill={weight: 1.0, inputs: [general]}"],
}


def run_row(row: str, prompts_dir: Path, work: Path) -> dict:
    from kftune import steps
    from kftune.config import config_to_dict, load_config

    config = config_to_dict(load_config(CONFIG, [*BUDGET, *ROWS[row]]))
    model_dir = work / "model"
    train = steps.train(config, str(prompts_dir), str(model_dir), run_name=f"bench-{abs(hash(row))}")
    steps.evaluate(config, str(prompts_dir), str(model_dir), str(work / "evaluation"), str(work / "report.html"))
    evaluation = json.loads((work / "evaluation" / steps.EVALUATION_FILE).read_text())
    forgetting = evaluation["forgetting"]
    return {
        "row": row,
        "settings": ROWS[row],
        "test_perplexity": evaluation["tuned"]["perplexity"],
        "forgetting_score": forgetting["score"],
        "general_perplexity": forgetting["tuned"],
        "base_general_perplexity": forgetting["base"],
        "base_answer_loss": forgetting["base_answer_loss"]["tuned"],
        "base_answer_loss_of_base": forgetting["base_answer_loss"]["base"],
        "train_seconds": train["seconds"],
        "steps": train["steps"],
    }


def pareto(results: list[dict]) -> set[str]:
    """Rows no other row beats on both test perplexity and forgetting score (both lower is better)."""
    return {
        r["row"]
        for r in results
        if not any(
            o["test_perplexity"] <= r["test_perplexity"]
            and o["forgetting_score"] <= r["forgetting_score"]
            and (o["test_perplexity"], o["forgetting_score"]) != (r["test_perplexity"], r["forgetting_score"])
            for o in results
        )
    }


def markdown(results: list[dict]) -> str:
    front = pareto(results)
    lines = [
        "| run | test perplexity | forgetting score | general-text perplexity | loss on base's answers | train time (s) | Pareto |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['row']} | {r['test_perplexity']:.2f} | {r['forgetting_score']:.4f} | {r['general_perplexity']:.1f} | "
            f"{r['base_answer_loss']:.3f} | {r['train_seconds']:.1f} | {'*' if r['row'] in front else ''} |"
        )
    base = results[0]
    lines.append(
        f"\nbase model: general-text perplexity {base['base_general_perplexity']:.1f}, "
        f"loss on its own answers {base['base_answer_loss_of_base']:.3f}"
    )
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", flush=True)
        return
    front = pareto(results)
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for r in results:
        on_front = r["row"] in front
        axes.scatter(r["forgetting_score"], r["test_perplexity"], color="tab:red" if on_front else "tab:blue")
        axes.annotate(r["row"], (r["forgetting_score"], r["test_perplexity"]), fontsize=7)
    axes.set_xlabel("forgetting score (relative rise of general-text perplexity)")
    axes.set_ylabel("test perplexity (task)")
    axes.set_title("stories260K on Alpaca: task against forgetting (red: Pareto front)")
    figure.tight_layout()
    figure.savefig(path)


def main(names: list[str]) -> None:
    from step_tables import run_table

    command = "python bench/retention_table.py " + " ".join(names)
    results = run_table(CONFIG, BUDGET, names or list(ROWS), run_row, "retention.jsonl", command)
    print(markdown(results))
    plot(results, REPO / "docs" / "retention_tradeoff.svg")


if __name__ == "__main__":
    main(sys.argv[1:])
