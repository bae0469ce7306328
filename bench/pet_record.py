"""Record a finished PET run: the base model's score (zero-shot, no training) and the tuned model's,
on the same test split, from the run's own evaluation.json and train_log.json.

    kftune run examples/sst2-smollm2-pet.yaml --out runs/sst2-smollm2-pet
    python bench/pet_record.py runs/sst2-smollm2-pet examples/sst2-smollm2-pet.yaml

Appends one JSON line to bench/results/pet.jsonl and prints it.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def latest(run_dir: Path, pattern: str) -> Path:
    found = sorted(run_dir.glob(pattern), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"{run_dir}: no {pattern}; did the run finish?")
    return found[-1]


def main(run_dir: str, config_path: str) -> None:
    from kftune.config import load_config

    config = load_config(config_path)
    evaluation = json.loads(latest(Path(run_dir), "pipeline/*/evaluate/**/evaluation.json").read_text())
    train = json.loads(latest(Path(run_dir), "pipeline/*/train/**/train_log.json").read_text())
    keep = ("accuracy", "macro_f1", "confusion_matrix", "seconds")
    record = {
        "config": Path(config_path).name,
        "model": config.model.name_or_path,
        "template": config.prompt.template,
        "method": config.method.model_dump(),
        "test_rows": evaluation["rows"],
        "zero_shot_base": {k: evaluation["base"][k] for k in keep},
        "tuned": {k: evaluation["tuned"][k] for k in keep},
        "train": {k: train[k] for k in ("steps", "seconds", "seconds_per_step", "trainable_parameters", "final_loss")},
        "budget": {
            "max_rows": config.data.max_rows,
            "max_steps": config.train.max_steps,
            "batch_size": config.train.batch_size,
            "lr": config.train.lr,
        },
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }
    (REPO / "bench" / "results").mkdir(exist_ok=True)
    with open(REPO / "bench" / "results" / "pet.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:3])
