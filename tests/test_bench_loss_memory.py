"""bench/loss_memory.py on a tiny model (CPU): the harness runs end to end, each side in its own process, and
prints the ratio against the objective's peer; every side of every objective steps. The sft objective's
sides are gpu_throughput's, whose harness tests/test_bench_gpu.py runs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO

BENCH = REPO / "bench"
sys.path.insert(0, str(BENCH))

from loss_memory import SHAPES, SIDES, run_side  # noqa: E402


def test_the_harness_compares_kftune_with_the_peer_in_two_processes():
    command = [sys.executable, str(BENCH / "loss_memory.py"), "--shape", "tiny", "--objective", "online_rl"]
    done = subprocess.run([*command, "--steps", "1", "--no-save"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines[:2]] == ["trl_grpo", "kftune"]
    assert lines[2].startswith("kftune vs trl_grpo: ") and "less peak memory" in lines[2]


@pytest.mark.parametrize(("objective", "side"), [(o, s) for o in SIDES if o != "sft" for s in SIDES[o]])
def test_every_side_steps_a_tiny_model(objective, side):
    result = run_side(objective, side, SHAPES["tiny"], steps=1)
    assert result["name"] == side and result.keys() == {"name", "seconds_per_step", "peak_extra_gib"}
