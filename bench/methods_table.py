"""Every method on one budget per model, each at the learning rate its own sweep chose:

- `minilm`: MiniLM-L6 on SST-2 (examples/sst2-minilm-lora.yaml): the first 2,000 training rows, 1 epoch,
  batch 32, max_length 64; scored on the 872-sentence SST-2 dev set (accuracy).
- `stories260K`: the 292,800-parameter Llama instruction-tuned on Stanford Alpaca
  (examples/alpaca-en-stories.yaml, 300 records, 20% held out as the test set): 3 epochs, batch 8,
  max_length 512 (the model's context; rows that do not fit are dropped); scored by test perplexity and
  ROUGE-L of greedy generations against the reference responses.
- `minilm-long`: full fine-tuning, LoRA, prompt tuning and P-tuning of `minilm` on 8,000 rows for 2 epochs
  (500 steps), each swept again at that budget: how the gaps and the best rates change with training longer.

    python bench/methods_table.py minilm [ROW ...]        # all of the model's rows, or the named ones
    python bench/methods_table.py stories260K --sweeps runs/methods-sweeps
    python bench/methods_table.py minilm --report         # the table from the latest records

Two phases. First each row's learning-rate sweep (`kftune sweep` on `train.lr` over the row's log grid, ASHA,
chosen by the validation metric on 10% of the training rows held out), in `--sweeps DIR/<model>/<row>`; a
finished sweep there is read back, an interrupted one resumed. While a row's best rate is the smallest or
largest swept, its sweep goes on past that edge, two rates at a time (at most twice, in
`<row>-beyond-<rate>`). Sweeps run two trials at once on one CPU each and are not timed. Then the rows, each
at its sweep's best rate on the whole budget: rows are timed (seconds and seconds per optimizer step), so they
run alone: the table refuses to start when the machine's 1-minute load average is above `--max-load` (or, with
`--allow-busy`, marks every record `not_alone`), waits for its own sweeps' load to settle before the first
row, and each record carries the load average at its row's start and end (a row that ran alone ends near its
own 2 CPUs).

Rows run the pipeline's step functions in one process (data prepared and tokenized once, Ray started
once; MLflow registration skipped), so the per-method cost is training plus evaluation. Prints a
Markdown table (for docs/methods.md) and appends one JSON line per row to bench/results/methods.jsonl,
naming the sweep that chose its rate (folder, parent MLflow run, grid, every trial's rate and metric).
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS_FILE = "methods.jsonl"
MAX_LOAD = 0.5
"""A machine running nothing else sits below this 1-minute load average; the table's own row adds about its CPUs (2)."""


@dataclass(frozen=True)
class Row:
    method: str
    grid: str
    """The learning rates swept: at least 4 on a log grid."""
    extra: tuple[str, ...] = ()
    """Further config overrides of the row."""
    sweep_of: str | None = None
    """Another row whose sweep this one takes (it trains exactly like that row)."""


@dataclass(frozen=True)
class Table:
    title: str
    config: Path
    budget: list[str]
    sweep_budget: list[str]
    """On top of `budget`, for the sweeps' trials: the validation split the rates are chosen on, how often it is
    scored (ASHA's rungs), and one CPU per trial (two trials at once)."""
    metric: str
    """The sweeps' metric: validation_accuracy or validation_loss."""
    scores: tuple[str, ...]
    """The evaluation metrics recorded for each row on the test split."""
    rows: dict[str, Row]


ENCODER_FULL = "grid(1e-3, 3e-4, 1e-4, 3e-5)"
ENCODER_LORA = "grid(3e-2, 1e-2, 3e-3, 1e-3)"
ENCODER_VECTORS = "grid(1e-1, 3e-2, 1e-2, 3e-3)"
DECODER_FULL = "grid(3e-4, 1e-3, 3e-3, 1e-2)"
DECODER_VECTORS = "grid(3e-3, 1e-2, 3e-2, 1e-1)"
PARALLEL_TRIALS = 2

TABLES = {
    "minilm": Table(
        "MiniLM-L6 on SST-2",
        REPO / "examples" / "sst2-minilm-lora.yaml",
        [
            "data.max_rows=2000",
            "train.epochs=1",
            "train.batch_size=32",
            "prompt.max_length=64",
            "train.workers=1",
            "train.cpus_per_worker=2",
            "eval.compare_base=false",
        ],
        ["train.cpus_per_worker=1", "data.split.validation=0.1", "train.eval_every_steps=14"],
        "validation_accuracy",
        ("accuracy",),
        {
            "full": Row("{name: full}", "grid(1e-5, 3e-5, 1e-4, 3e-4)"),
            "full + layer_lr_decay 0.8": Row(
                "{name: full}", "grid(3e-4, 1e-4, 3e-5, 1e-5)", ("train.layer_lr_decay=0.8",)
            ),
            "head_only": Row("{name: head_only}", "grid(3e-1, 1e-1, 3e-2, 1e-2)"),
            "freeze_bottom 3": Row("{name: freeze_bottom, layers: 3}", ENCODER_FULL),
            "train_top 2": Row("{name: train_top, layers: 2}", ENCODER_FULL),
            "layer_range 2-3": Row("{name: layer_range, start: 2, end: 4}", ENCODER_FULL),
            "gradual_unfreeze (1, every 10)": Row(
                "{name: gradual_unfreeze, start_layers: 1, every_steps: 10}", ENCODER_FULL
            ),
            "attention_only": Row("{name: attention_only}", ENCODER_FULL),
            "attention_only heads 0-5": Row("{name: attention_only, heads: [0, 1, 2, 3, 4, 5]}", ENCODER_FULL),
            "bitfit": Row("{name: bitfit}", "grid(3e-2, 1e-2, 3e-3, 1e-3)"),
            "subnetwork 5%": Row("{name: subnetwork, fraction: 0.05}", "grid(3e-3, 1e-3, 3e-4, 1e-4)"),
            "subnetwork 5% gradient": Row(
                "{name: subnetwork, fraction: 0.05, score: gradient}", "grid(3e-3, 1e-3, 3e-4, 1e-4)"
            ),
            "lora r8 q,v": Row("{name: lora, r: 8, target_modules: [query, value]}", "grid(3e-4, 1e-3, 3e-3, 1e-2)"),
            "dora r8 q,v": Row("{name: lora, r: 8, target_modules: [query, value], use_dora: true}", ENCODER_LORA),
            "rslora r8 q,v": Row("{name: lora, r: 8, target_modules: [query, value], use_rslora: true}", ENCODER_LORA),
            "lora r8 q,v merged": Row(
                "{name: lora, r: 8, target_modules: [query, value], merge: true}", ENCODER_LORA, sweep_of="lora r8 q,v"
            ),
            "ia3": Row("{name: ia3}", ENCODER_VECTORS),
            "prefix_tuning 20": Row("{name: prefix_tuning, virtual_tokens: 20}", ENCODER_VECTORS),
            "prompt_tuning 20 text": Row(
                "{name: prompt_tuning, virtual_tokens: 20, init: text, init_text: 'the sentiment of this review is'}",
                "grid(1.0, 3e-1, 1e-1, 3e-2, 1e-2)",
            ),
            "p_tuning 20": Row("{name: p_tuning, virtual_tokens: 20}", ENCODER_VECTORS),
            "adapter houlsby /16": Row("{name: adapter, placement: houlsby}", ENCODER_LORA),
            "adapter pfeiffer /16": Row("{name: adapter, placement: pfeiffer}", ENCODER_LORA),
            "layer_prompt": Row("{name: layer_prompt}", ENCODER_VECTORS),
        },
    ),
    "stories260K": Table(
        "stories260K on Alpaca",
        REPO / "examples" / "alpaca-en-stories.yaml",
        [
            "data.split={test: 0.2}",
            "prompt.packing=false",
            "prompt.max_length=512",
            "train.epochs=3",
            "train.batch_size=8",
            "train.workers=1",
            "train.cpus_per_worker=2",
            "eval.metrics=[perplexity, rouge_l]",
            "eval.generate_rows=60",
            "eval.compare_base=false",
            "eval.forgetting=false",
            "eval.batch_size=16",
        ],
        ["train.cpus_per_worker=1", "data.split.validation=0.1", "train.eval_every_steps=10"],
        "validation_loss",
        ("perplexity", "rouge_l"),
        {
            "full": Row("{name: full}", DECODER_FULL),
            "lora r8 all-linear": Row("{name: lora, r: 8, target_modules: all-linear}", "grid(1e-3, 3e-3, 1e-2, 3e-2)"),
            "ia3": Row("{name: ia3}", DECODER_VECTORS),
            "adapter houlsby /16": Row("{name: adapter, placement: houlsby}", DECODER_FULL),
            "layer_prompt": Row("{name: layer_prompt}", DECODER_VECTORS),
            "prefix_tuning 20": Row("{name: prefix_tuning, virtual_tokens: 20}", DECODER_VECTORS),
            "prompt_tuning 20 text": Row(
                "{name: prompt_tuning, virtual_tokens: 20, init: text,"
                " init_text: 'Below is an instruction that describes a task.'}",
                "grid(1e-2, 3e-2, 1e-1, 3e-1, 1.0)",
            ),
            "p_tuning 20": Row("{name: p_tuning, virtual_tokens: 20}", DECODER_VECTORS),
        },
    ),
}


def overridden(overrides: list[str], *changes: str) -> list[str]:
    """`overrides` with the fields that `changes` set replaced by them (each field once)."""
    fields = {change.split("=", 1)[0] for change in changes}
    return [*(entry for entry in overrides if entry.split("=", 1)[0] not in fields), *changes]


MINILM = TABLES["minilm"]
TABLES["minilm-long"] = replace(
    MINILM,
    title="MiniLM-L6 on SST-2, 8,000 rows x 2 epochs",
    budget=overridden(MINILM.budget, "data.max_rows=8000", "train.epochs=2"),
    # 450 steps a trial: validation (800 rows) every 50 steps, so ASHA's rungs fall at 50, 100, 200 and 400
    sweep_budget=overridden(MINILM.sweep_budget, "train.eval_every_steps=50"),
    rows={row: MINILM.rows[row] for row in ("full", "lora r8 q,v", "prompt_tuning 20 text", "p_tuning 20")},
)


def weights_megabytes(model_dir: Path) -> float:
    return sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 1e6


def folder_name(row: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", row.lower()).strip("-")


def row_overrides(table: Table, row: str) -> list[str]:
    spec = table.rows[row]
    return [*table.budget, f"method={spec.method}", *spec.extra]


MAX_EXTENSIONS = 2
"""How often a row's grid is extended past the edge its best rate lies on, two rates further each time."""


def rate_text(rate: float) -> str:
    """A rate of the 1-3-10 log grid as the tables write it: 3e-4, 1e-2, 3, 1."""
    mantissa, exponent = f"{rate:.0e}".split("e")
    return mantissa if int(exponent) == 0 else f"{mantissa}e{int(exponent)}"


def beyond(rate: float, places: int) -> float:
    """The rate `places` steps further along the 1-3-10 log grid (negative: smaller); 1e-3, 1 -> 3e-3."""
    index = round(2 * math.log10(rate)) + places  # 1e-3 -> -6, 3e-3 -> -5 (log10 3 = 0.48)
    return float(f"{1 if index % 2 == 0 else 3}e{index // 2}")


def past_the_edge(best: float, rates: list[float]) -> str | None:
    """The next two rates past the edge of `rates` that `best` lies on, as a grid; None when it lies inside."""
    if best not in (min(rates), max(rates)):
        return None
    outward = 1 if best == max(rates) else -1
    return f"grid({rate_text(beyond(best, outward))}, {rate_text(beyond(best, 2 * outward))})"


def grid_rates(grid: str) -> list[float]:
    return [float(value) for value in grid.removeprefix("grid(").removesuffix(")").split(",")]


def sweep_row(table: Table, row: str, sweeps: Path) -> dict:
    """Run (or resume, or read back when finished) the row's learning-rate sweep; while its best rate is the
    smallest or largest swept, a further sweep of the next two rates past that edge (at most `MAX_EXTENSIONS`,
    each in its own folder), the best over all of them chosen. What to record about them."""
    grid = table.rows[row].grid
    folder = sweeps / folder_name(row)
    swept: list[dict] = []
    while True:
        swept.append(sweep_rates(table, row, grid, folder))
        best = (max if swept[0]["mode"] == "max" else min)(
            (s["best"] for s in swept), key=lambda trial: trial[table.metric]
        )
        rates = [rate for s in swept for rate in grid_rates(s["space"]["train.lr"])]
        grid = past_the_edge(best["lr"], rates)
        if grid is None or len(swept) > MAX_EXTENSIONS:
            break
        folder = sweeps / f"{folder_name(row)}-beyond-{folder_name(rate_text(best['lr']))}"
        print(f"== sweep: {row}: the best rate {best['lr']:g} is the edge of {rates}; sweeping {grid}", flush=True)
    return {
        "lr": best["lr"],
        "metric": table.metric,
        "space": {"train.lr": f"grid({', '.join(rate_text(rate) for rate in rates)})"},
        "sweeps": [{key: s[key] for key in ("folder", "parent_run_id", "space")} for s in swept],
        "trials": [{**trial, "sweep": index} for index, s in enumerate(swept) for trial in s["trials"]],
    }


def sweep_rates(table: Table, row: str, grid: str, folder: Path) -> dict:
    """One sweep of the row's learning rate over `grid` in `folder`: its best trial and every trial."""
    from kftune.config import load_config
    from kftune.errors import KftuneError
    from kftune.local import with_local_registry
    from kftune.sweep.run import run_sweep
    from kftune.sweep.space import load_sweep_settings

    config = load_config(table.config, [*row_overrides(table, row), *table.sweep_budget])
    settings = load_sweep_settings(
        None, {"train.lr": grid}, {"metric": table.metric, "parallel": PARALLEL_TRIALS}, None
    )
    summary = run_sweep(config, settings, folder, with_local_registry(config, folder))
    if summary["interrupted"] or not summary["best"]:
        raise KftuneError(
            f"{row}: the sweep in {folder} stopped before a trial was scored; run the table again to resume it"
        )
    trials = [
        {"lr": t["values"]["train.lr"], table.metric: t["metric"], "outcome": t["outcome"], "step": t["step"]}
        for t in summary["trials"]
    ]
    return {
        "best": {"lr": summary["best"]["values"]["train.lr"], table.metric: summary["best"]["metric"]},
        "mode": settings.mode,
        "folder": str(folder.resolve()),
        "parent_run_id": summary["parent_run_id"],
        "space": settings.space,
        "trials": trials,
    }


def run_row(model: str, row: str, chosen_by: dict, prompts_dir: Path, work: Path) -> dict:
    from kftune import steps
    from kftune.config import config_to_dict, load_config

    table = TABLES[model]
    config = config_to_dict(load_config(table.config, [*row_overrides(table, row), f"train.lr={chosen_by['lr']}"]))
    model_dir = work / "model"
    train = steps.train(config, str(prompts_dir), str(model_dir), run_name=f"bench-{folder_name(row)}")
    steps.evaluate(config, str(prompts_dir), str(model_dir), str(work / "evaluation"), str(work / "report.html"))
    evaluation = json.loads((work / "evaluation" / steps.EVALUATION_FILE).read_text())
    log = json.loads((model_dir / "train_log.json").read_text())
    return {
        "model": model,
        "row": row,
        "method": table.rows[row].method,
        "extra": list(table.rows[row].extra),
        "lr": chosen_by["lr"],
        "lr_chosen_by": chosen_by,
        "test": {name: evaluation["tuned"][name] for name in table.scores},
        "trainable": train["trainable_parameters"],
        "trainable_percent": 100 * train["trainable_parameters"] / log["total_parameters"],
        "train_seconds": train["seconds"],
        "seconds_per_step": train["seconds_per_step"],
        "steps": train["steps"],
        "artifact_mb": weights_megabytes(model_dir),
    }


EDGE_MARK = "†"
"""After a rate that is the smallest or largest of its grid: the best rate may lie beyond the grid."""


def markdown(table: Table, results: list[dict]) -> str:
    lines = [
        f"| method | lr (swept) | {' | '.join(f'test {name}' for name in table.scores)} | trainable | trainable %"
        " | train time (s) | s/step | weights saved (MB) |",
        "|---|---|" + "---|" * len(table.scores) + "---|---|---|---|---|",
    ]
    for r in results:
        grid = r["lr_chosen_by"]["space"]["train.lr"].removeprefix("grid(").removesuffix(")")
        rates = [float(value) for value in grid.split(",")]
        edge = EDGE_MARK if r["lr"] in (min(rates), max(rates)) else ""
        scores = " | ".join(f"{r['test'][name]:.4f}" for name in table.scores)
        lines.append(
            f"| {r['row']} | **{r['lr']:g}**{edge} of {grid} | {scores} | {r['trainable']:,}"
            f" | {r['trainable_percent']:.3f}"
            f" | {r['train_seconds']:.1f} | {r['seconds_per_step']:.3f} | {r['artifact_mb']:.2f} |"
        )
    return "\n".join(lines)


def latest_records(model: str) -> list[dict]:
    """The latest swept record of each of the model's rows, in the table's order."""
    from step_tables import RESULTS

    latest = {}
    for line in (RESULTS / RESULTS_FILE).read_text().splitlines():
        record = json.loads(line)
        if record.get("model") == model and isinstance(record.get("lr_chosen_by"), dict) and "test" in record:
            latest[record["row"]] = record
    return [latest[row] for row in TABLES[model].rows if row in latest]


def main(argv: list[str]) -> None:
    import argparse

    from step_tables import busy_machine, run_table

    parser = argparse.ArgumentParser(prog="bench/methods_table.py")
    parser.add_argument("model", choices=list(TABLES))
    parser.add_argument("rows", nargs="*", help="rows to run (default: all)")
    parser.add_argument(
        "--sweeps", default="runs/methods-sweeps", help="the sweeps' folder (default runs/methods-sweeps)"
    )
    parser.add_argument("--report", action="store_true", help="print the table from the latest records and stop")
    parser.add_argument(
        "--max-load",
        type=float,
        default=MAX_LOAD,
        help=f"refuse to start above this 1-minute load average (default {MAX_LOAD}): rows are timed, so they run alone",
    )
    parser.add_argument(
        "--allow-busy", action="store_true", help="start anyway; every record then says the rows did not run alone"
    )
    args = parser.parse_intermixed_args(argv)
    table = TABLES[args.model]
    if args.report:
        print(markdown(table, latest_records(args.model)))
        return
    unknown = sorted(set(args.rows) - set(table.rows))
    if unknown:
        raise SystemExit(f"unknown rows: {', '.join(unknown)} (rows: {', '.join(table.rows)})")
    rows = args.rows or list(table.rows)
    busy_machine(args.max_load, args.allow_busy)  # before hours of sweeps, not only before the timed rows
    sweeps = Path(args.sweeps).resolve() / args.model
    swept = {}
    for row in rows:
        of = table.rows[row].sweep_of or row
        print(f"== sweep: {of}", flush=True)
        swept[row] = swept.get(of) or sweep_row(table, of, sweeps)
    results = run_table(
        table.config,
        table.budget,
        rows,
        lambda row, prompts, work: run_row(args.model, row, swept[row], prompts, work),
        RESULTS_FILE,
        "python bench/methods_table.py " + " ".join(argv),
        max_load=args.max_load,
        allow_busy=args.allow_busy,
        settle_seconds=240,
    )
    print(markdown(table, results))


if __name__ == "__main__":
    main(sys.argv[1:])
