"""Every method on MiniLM-L6 + SST-2 with the same budget: the first 2,000 training rows, 1 epoch,
batch 32, max_length 64, one Ray worker with 2 CPUs; scored on the 872-sentence SST-2 dev set.

    python bench/methods_table.py [ROW ...]    # all rows, or the named ones
    python bench/methods_table.py --sweep 'lora r8 q,v=runs/lora-sweep' 'lora r8 q,v'

`--sweep ROW=FOLDER` takes the row's learning rate from a `kftune sweep` folder (its best.yaml), and the
row's record names that sweep (folder and parent MLflow run), so a table says how each rate was chosen.

Rows are timed (seconds and seconds per optimizer step), so the table runs alone: it refuses to start
when the machine's 1-minute load average is above `--max-load` (or, with `--allow-busy`, marks every
record `not_alone`), and each record carries the load average at its row's start and end (a row that ran
alone ends near its own 2 CPUs).

Runs the pipeline's step functions in one process (data prepared and tokenized once, Ray started
once; MLflow registration skipped), so the per-method cost is training plus evaluation. Prints a
Markdown table (for docs/methods.md) and appends one JSON line per row to
bench/results/methods.jsonl.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "examples" / "sst2-minilm-lora.yaml"
BUDGET = [
    "data.max_rows=2000",
    "train.epochs=1",
    "train.batch_size=32",
    "prompt.max_length=64",
    "train.workers=1",
    "train.cpus_per_worker=2",
    "eval.compare_base=false",
]

# row: (method, learning rate); learning rates are each family's usual range, not tuned here
ROWS = {
    "full": ("{name: full}", 5e-5),
    "full + layer_lr_decay 0.8": ("{name: full}", 5e-5),
    "head_only": ("{name: head_only}", 1e-3),
    "freeze_bottom 3": ("{name: freeze_bottom, layers: 3}", 1e-4),
    "train_top 2": ("{name: train_top, layers: 2}", 1e-4),
    "layer_range 2-3": ("{name: layer_range, start: 2, end: 4}", 1e-4),
    "gradual_unfreeze (1, every 10)": ("{name: gradual_unfreeze, start_layers: 1, every_steps: 10}", 1e-4),
    "attention_only": ("{name: attention_only}", 1e-4),
    "attention_only heads 0-5": ("{name: attention_only, heads: [0, 1, 2, 3, 4, 5]}", 2e-4),
    "bitfit": ("{name: bitfit}", 1e-3),
    "subnetwork 5%": ("{name: subnetwork, fraction: 0.05}", 5e-4),
    "subnetwork 5% gradient": ("{name: subnetwork, fraction: 0.05, score: gradient}", 5e-4),
    "lora r8 q,v": ("{name: lora, r: 8, target_modules: [query, value]}", 1e-3),
    "dora r8 q,v": ("{name: lora, r: 8, target_modules: [query, value], use_dora: true}", 1e-3),
    "rslora r8 q,v": ("{name: lora, r: 8, target_modules: [query, value], use_rslora: true}", 1e-3),
    "lora r8 q,v merged": ("{name: lora, r: 8, target_modules: [query, value], merge: true}", 1e-3),
    "ia3": ("{name: ia3}", 1e-2),
    "prefix_tuning 20": ("{name: prefix_tuning, virtual_tokens: 20}", 1e-2),
    "prompt_tuning 20 text": (
        "{name: prompt_tuning, virtual_tokens: 20, init: text, init_text: 'the sentiment of this review is'}",
        3e-2,
    ),
    "p_tuning 20": ("{name: p_tuning, virtual_tokens: 20}", 1e-2),
    "adapter houlsby /16": ("{name: adapter, placement: houlsby}", 1e-3),
    "adapter pfeiffer /16": ("{name: adapter, placement: pfeiffer}", 1e-3),
    "layer_prompt": ("{name: layer_prompt}", 1e-2),
}
EXTRA = {"full + layer_lr_decay 0.8": ["train.layer_lr_decay=0.8"]}
MAX_LOAD = 0.5
"""A machine running nothing else sits below this 1-minute load average; the table's own row adds about its CPUs (2)."""


def weights_megabytes(model_dir: Path) -> float:
    return sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 1e6


def swept_lr(folder: Path) -> tuple[float, dict]:
    """The best trial's learning rate in a `kftune sweep` folder, and what to record about that sweep."""
    from kftune.config import load_config
    from kftune.sweep.run import BEST_CONFIG_FILE, STATE_FILE

    state = json.loads((folder / STATE_FILE).read_text())
    lr = load_config(folder / BEST_CONFIG_FILE).train.lr
    return lr, {
        "folder": str(folder.resolve()),
        "parent_run_id": state["parent_run_id"],
        "space": state["spec"]["settings"]["space"],
    }


def run_row(row: str, prompts_dir: Path, work: Path, sweep: Path | None = None) -> dict:
    from kftune import steps
    from kftune.config import config_to_dict, load_config

    method, lr = ROWS[row]
    lr, chosen_by = swept_lr(sweep) if sweep else (lr, "hand-picked")
    config = config_to_dict(load_config(CONFIG, [*BUDGET, f"method={method}", f"train.lr={lr}", *EXTRA.get(row, [])]))
    model_dir = work / "model"
    train = steps.train(config, str(prompts_dir), str(model_dir), run_name=f"bench-{abs(hash(row))}")
    steps.evaluate(config, str(prompts_dir), str(model_dir), str(work / "evaluation"), str(work / "report.html"))
    evaluation = json.loads((work / "evaluation" / steps.EVALUATION_FILE).read_text())
    log = json.loads((model_dir / "train_log.json").read_text())
    return {
        "row": row,
        "method": method,
        "lr": lr,
        "lr_chosen_by": chosen_by,
        "dev_accuracy": evaluation["tuned"]["accuracy"],
        "trainable": train["trainable_parameters"],
        "trainable_percent": 100 * train["trainable_parameters"] / log["total_parameters"],
        "train_seconds": train["seconds"],
        "seconds_per_step": train["seconds_per_step"],
        "steps": train["steps"],
        "artifact_mb": weights_megabytes(model_dir),
    }


def markdown(results: list[dict]) -> str:
    lines = [
        "| method | lr | dev accuracy | trainable | trainable % | train time (s) | s/step | weights saved (MB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['row']} | {r['lr']:g} | {r['dev_accuracy']:.4f} | {r['trainable']:,} | {r['trainable_percent']:.3f}"
            f" | {r['train_seconds']:.1f} | {r['seconds_per_step']:.3f} | {r['artifact_mb']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    import argparse

    from step_tables import run_table

    parser = argparse.ArgumentParser(prog="bench/methods_table.py")
    parser.add_argument("rows", nargs="*", help="rows to run (default: all)")
    parser.add_argument("--sweep", action="append", default=[], metavar="ROW=FOLDER", help="the row's lr from a sweep")
    parser.add_argument(
        "--max-load",
        type=float,
        default=MAX_LOAD,
        help=f"refuse to start above this 1-minute load average (default {MAX_LOAD}): rows are timed, so they run alone",
    )
    parser.add_argument(
        "--allow-busy", action="store_true", help="start anyway; every record then says the rows did not run alone"
    )
    args = parser.parse_args(argv)
    sweeps = {row: Path(folder) for row, _, folder in (item.rpartition("=") for item in args.sweep)}
    unknown = sorted(set(args.rows) - set(ROWS)) + sorted(set(sweeps) - set(ROWS))
    if unknown:
        raise SystemExit(f"unknown rows: {', '.join(unknown)} (rows: {', '.join(ROWS)})")
    command = "python bench/methods_table.py " + " ".join(argv)
    results = run_table(
        CONFIG,
        BUDGET,
        args.rows or list(ROWS),
        lambda row, prompts, work: run_row(row, prompts, work, sweeps.get(row)),
        "methods.jsonl",
        command,
        max_load=args.max_load,
        allow_busy=args.allow_busy,
    )
    print(markdown(results))


if __name__ == "__main__":
    main(sys.argv[1:])
