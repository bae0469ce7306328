"""bench/gpu_throughput.py: skips cleanly without a GPU, and its harness runs end to end (tiny model, CPU)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import REPO

SCRIPT = str(REPO / "bench" / "gpu_throughput.py")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the benchmark runs for real")
def test_without_a_gpu_the_speed_bar_says_so_and_skips():
    done = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, check=True)
    assert "no CUDA GPU here" in done.stdout and "skipped" in done.stdout


def test_the_harness_compares_kftune_with_the_peer_on_a_tiny_model():
    done = subprocess.run([sys.executable, SCRIPT, "--shape", "tiny", "--steps", "2", "--no-save"], capture_output=True, text=True, check=True)
    assert "hf_peft_eager" in done.stdout and "kftune / best peer (hf_peft_eager):" in done.stdout, done.stdout
