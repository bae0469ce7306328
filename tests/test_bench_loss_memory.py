"""bench/loss_memory.py: its harness runs end to end on a tiny model (CPU), each side in its own process, and
prints the ratio against the objective's peer. The sft objective's sides are gpu_throughput's, whose harness
tests/test_bench_gpu.py runs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO

SCRIPT = str(REPO / "bench" / "loss_memory.py")


@pytest.mark.parametrize(("objective", "peer"), [("online_rl", "trl_grpo"), ("distill", "full_logits")])
def test_the_harness_compares_kftune_with_the_objectives_peer_on_a_tiny_model(objective, peer):
    command = [sys.executable, SCRIPT, "--shape", "tiny", "--objective", objective, "--steps", "1", "--no-save"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines[:2]] == [peer, "kftune"]
    assert lines[2].startswith(f"kftune vs {peer}: ") and "less peak memory" in lines[2]
