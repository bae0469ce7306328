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


def load_average() -> float:
    """The machine's 1-minute load average: runnable processes, ours included."""
    return round(os.getloadavg()[0], 2)


def busy_machine(max_load: float | None, allow_busy: bool, settle_seconds: float = 0) -> dict | None:
    """None when the machine is quiet enough to time rows on (1-minute load average at most `max_load`, or no
    limit), waiting up to `settle_seconds` for it (after the caller's own work); else what every record must say
    about it, when `allow_busy`. Otherwise refuses to start."""
    import time

    load = load_average()
    waited = 0
    while max_load is not None and load > max_load and waited < settle_seconds:
        if waited == 0:
            print(f"waiting up to {settle_seconds:.0f} s for the 1-minute load average ({load}) to settle", flush=True)
        time.sleep(10)
        waited += 10
        load = load_average()
    if max_load is None or load <= max_load:
        return None
    message = (
        f"the machine is busy: 1-minute load average {load} > {max_load}; timings would measure the other work too"
    )
    if not allow_busy:
        raise SystemExit(f"{message}. Wait until it is idle, or pass --allow-busy to record the rows as not alone.")
    print(f"WARNING: {message}; every record says so (not_alone)", flush=True)
    return {"load_average_1m": load, "max_load": max_load}


def run_table(
    config_path: Path,
    budget: list[str],
    rows: list[str],
    run_row,
    results_file: str,
    command: str,
    max_load: float | None = None,
    allow_busy: bool = False,
    settle_seconds: float = 0,
) -> list[dict]:
    """Each row's `run_row(row, prompts, work)` on data prepared once, printed and recorded as it finishes.
    With `max_load` the table refuses a busy machine (`busy_machine`, after up to `settle_seconds`), and each
    record carries the load average at the row's start and end, so that whether it ran alone can be checked."""
    import tempfile

    busy = busy_machine(max_load, allow_busy, settle_seconds)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prompts = prepared_prompts(config_path, budget, work)
        for row in rows:
            print(f"== {row}", flush=True)
            started = load_average()
            result = run_row(row, prompts, work / "run")
            if max_load is not None:
                result["load_average_1m"] = {"row_start": started, "row_end": load_average(), "max_load": max_load}
                if busy:
                    result["not_alone"] = busy
            print(json.dumps(result), flush=True)
            results.append(result)
            append_record(results_file, result, budget, command)
    return results
