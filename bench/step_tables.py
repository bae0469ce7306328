"""What the table benchmarks share: the data prepared and tokenized once, and one JSON record per row."""

from __future__ import annotations

import json
import os
import platform
from datetime import UTC, datetime
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def prepared_prompts(config_path: Path, budget: list[str], work: Path) -> Path:
    """The config's data prepared and built into prompts under `work` (shared by every row)."""
    from kftune import steps
    from kftune.config import config_to_dict, load_config

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    base = config_to_dict(load_config(config_path, budget))
    steps.prepare_data(base, str(work / "dataset"), str(work / "card.md"))
    steps.build_prompts(base, str(work / "dataset"), str(work / "prompts"), str(work / "preview.html"))
    return work / "prompts"


def append_record(results_file: str, result: dict, budget: list[str], command: str) -> None:
    """One row's result with the date, machine, budget and command, appended to bench/results/<results_file>."""
    record = result | {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "budget": budget,
        "command": command,
    }
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / results_file, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def run_table(
    config_path: Path, budget: list[str], rows: list[str], run_row, results_file: str, command: str
) -> list[dict]:
    """Each row's `run_row(row, prompts, work)` on data prepared once, printed and recorded as it finishes."""
    import tempfile

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prompts = prepared_prompts(config_path, budget, work)
        for row in rows:
            print(f"== {row}", flush=True)
            result = run_row(row, prompts, work / "run")
            print(json.dumps(result), flush=True)
            results.append(result)
            append_record(results_file, result, budget, command)
    return results
