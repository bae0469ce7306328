"""Overhead of the pipeline: `kftune run` on the default example against a bare transformers+peft
script doing the same training and evaluation, in the same invocation on the same machine.

    python bench/overhead.py            # prints both wall times and the ratio (target <= 1.3x)

Results are appended to bench/results/overhead.jsonl with the command and the machine.
"""

import contextlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "examples" / "sst2-minilm-lora.yaml"
TARGET = 1.3


def tree_rss(process: psutil.Process) -> int:
    """Resident memory of a process and all its descendants (Ray workers, pipeline steps)."""
    total = 0
    for member in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += member.memory_info().rss
    return total


def timed(command: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak process-tree RSS in GiB, stdout and stderr) of a command."""
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(command, stdout=out, stderr=err, text=True, cwd=REPO)
        watched, peak = psutil.Process(child.pid), 0
        while child.poll() is None:
            peak = max(peak, tree_rss(watched))
            time.sleep(0.5)
        seconds = time.perf_counter() - started
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if child.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return seconds, peak / 2**30, stdout + "\n" + stderr


def step_seconds(log: str) -> dict[str, float]:
    """Wall time of each pipeline step, from the local runner's 'Executing task' / 'finished' lines."""
    stamps: dict[str, list[float]] = {}
    for match in re.finditer(
        r"^(\d\d):(\d\d):(\d\d\.\d+) - INFO - (?:Executing task|Task) \S*'([\w-]+)'", log, re.MULTILINE
    ):
        hours, minutes, seconds, task = match.groups()
        stamps.setdefault(task, []).append(int(hours) * 3600 + int(minutes) * 60 + float(seconds))
    return {task: round(times[-1] - times[0], 1) for task, times in stamps.items() if len(times) >= 2}


def main() -> None:
    cores = os.cpu_count() or 1
    print(f"bare transformers+peft script ({cores} threads) ...", flush=True)
    bare_seconds, bare_rss, bare_out = timed([sys.executable, str(REPO / "bench" / "bare_hf_peft.py"), str(cores)])
    bare = json.loads([line for line in bare_out.splitlines() if line.startswith("{")][-1])
    print(f"kftune run {CONFIG.relative_to(REPO)} ...", flush=True)
    with tempfile.TemporaryDirectory() as out:
        kftune_seconds, kftune_rss, kftune_log = timed(
            [sys.executable, "-m", "kftune.cli", "run", str(CONFIG), "--out", out]
        )
        summary_path = next(Path(out).glob("pipeline/*/register/summary"))
        summary = json.loads(summary_path.read_text())
    steps = step_seconds(kftune_log)
    ratio = kftune_seconds / bare_seconds
    rows = [
        ("wall time (s)", f"{bare_seconds:.1f}", f"{kftune_seconds:.1f}"),
        ("peak RSS, tree (GiB)", f"{bare_rss:.2f}", f"{kftune_rss:.2f}"),
        ("train loop (s)", f"{bare['train_seconds']:.1f}", f"{summary['train']['seconds']:.1f}"),
        ("dev accuracy, base", f"{bare['base_accuracy']:.4f}", f"{summary['evaluation']['base']['accuracy']:.4f}"),
        ("dev accuracy, tuned", f"{bare['tuned_accuracy']:.4f}", f"{summary['evaluation']['tuned']['accuracy']:.4f}"),
    ]
    print(f"\n{'':22}{'bare HF+PEFT':>14}{'kftune run':>14}")
    for name, a, b in rows:
        print(f"{name:22}{a:>14}{b:>14}")
    print("\nkftune steps (s): " + ", ".join(f"{name} {seconds:.1f}" for name, seconds in steps.items()))
    verdict = "meets" if ratio <= TARGET else "misses"
    print(f"\nratio kftune / bare: {ratio:.2f}x ({verdict} the {TARGET}x target)")
    record = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python bench/overhead.py",
        "machine": f"{platform.machine()}, {cores} cores",
        "bare": bare | {"wall_seconds": round(bare_seconds, 1), "peak_rss_gib": round(bare_rss, 2)},
        "kftune": {
            "wall_seconds": round(kftune_seconds, 1),
            "peak_rss_gib": round(kftune_rss, 2),
            "train": summary["train"],
            "evaluation": {k: summary["evaluation"][k] for k in ("base", "tuned")},
        },
        "kftune_steps_seconds": steps,
        "ratio": round(ratio, 3),
    }
    with open(REPO / "bench" / "results" / "overhead.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
