"""bench/gpu_throughput.py: skips cleanly without a GPU, and its harness runs end to end for both
methods (tiny model, CPU): LoRA against PEFT, full fine-tuning under ZeRO-2 against HF + DeepSpeed."""

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


@pytest.mark.parametrize(
    ("method", "peer", "ours"), [("lora", "hf_peft_eager", "kftune"), ("full", "hf_deepspeed_zero2", "kftune_zero2")]
)
def test_the_harness_compares_kftune_with_the_peer_on_a_tiny_model(method, peer, ours):
    command = [
        sys.executable,
        SCRIPT,
        "--shape",
        "tiny",
        "--method",
        method,
        "--steps",
        "2",
        "--ours",
        "eager",
        "ckpt=2",
        "--no-save",
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    names = [line.split()[0] for line in done.stdout.splitlines() if "tokens/s" in line]
    assert names == [peer, f"{ours}[eager]", f"{ours}[ckpt=2]"], done.stdout
    assert f"/ best peer ({peer}):" in done.stdout, done.stdout


def test_an_unknown_variant_is_refused_before_anything_runs():
    done = subprocess.run(
        [sys.executable, SCRIPT, "--shape", "tiny", "--ours", "compiled"], capture_output=True, text=True
    )
    assert done.returncode == 2 and "unknown variant part 'compiled'" in done.stderr, done.stderr
