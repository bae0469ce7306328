"""Memory of the causal-LM loss on CPU: kftune's training step (loss through the output layer in
chunks) against plain transformers + PEFT (the model's own loss over full fp32 logits), same model,
same batch, same invocation. A small Llama body with Llama-3's vocabulary (128,256), where the
logits dominate: 4 x 1024 tokens make 2 GiB of fp32 logits.

    python bench/loss_memory.py            # prints peak extra memory and seconds per step, and the ratios

Each side runs in its own process, so each peak (ru_maxrss) is its own: the peak resident memory
during the steps minus the resident memory before them. Results are appended to
bench/results/loss_memory.jsonl with the exact command.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from gpu_throughput import hf_peft, kftune_lora, make_model, train_settings

REPO = Path(__file__).resolve().parents[1]
SHAPE = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128256,
    "seq": 1024,
    "batch": 4,
}
SIDES = {"hf_peft": hf_peft, "kftune": kftune_lora}


def resident_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


def run_side(name: str, steps: int) -> dict:
    """One side's steps in this process: seconds per step and peak memory above the start."""
    device = torch.device("cpu")
    ids = torch.randint(
        0, SHAPE["vocab_size"], (SHAPE["batch"], SHAPE["seq"]), generator=torch.Generator().manual_seed(0)
    )
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with SIDES[name](make_model(SHAPE, device, torch.float32), train_settings("lora", SHAPE, device), device) as step:
        before = resident_bytes()
        started = time.perf_counter()
        for _ in range(steps):
            step(batch)
        seconds = (time.perf_counter() - started) / steps
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"name": name, "seconds_per_step": round(seconds, 2), "peak_extra_gib": round((peak - before) / 2**30, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--side", choices=sorted(SIDES), help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--no-save", action="store_true", help="print only; do not append to bench/results")
    args = parser.parse_args()
    if args.side:
        print(json.dumps(run_side(args.side, args.steps)))
        return 0

    results = []
    for name in SIDES:
        child = subprocess.run(
            [sys.executable, __file__, "--side", name, "--steps", str(args.steps)],
            capture_output=True,
            text=True,
            check=True,
        )
        results.append(json.loads(child.stdout.strip().splitlines()[-1]))
        print(
            f"{name:<10} {results[-1]['seconds_per_step']:>7.2f} s/step   peak +{results[-1]['peak_extra_gib']:.2f} GiB",
            flush=True,
        )
    peer, ours = results
    memory_ratio = peer["peak_extra_gib"] / ours["peak_extra_gib"]
    speed_ratio = peer["seconds_per_step"] / ours["seconds_per_step"]
    print(f"kftune vs hf_peft: {memory_ratio:.1f}x less peak memory, {speed_ratio:.2f}x the speed")
    if not args.no_save:
        record = {
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": " ".join(["python", *sys.argv]),
            "device": platform.processor() or "cpu",
            "threads": torch.get_num_threads(),
            "shape": SHAPE,
            "steps": args.steps,
            "results": results,
            "memory_ratio": round(memory_ratio, 2),
            "speed_ratio": round(speed_ratio, 3),
        }
        with open(REPO / "bench" / "results" / "loss_memory.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
