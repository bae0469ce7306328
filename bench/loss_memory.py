"""Memory of the causal-LM loss on CPU, kftune against its peer on the same model and batch, in one
invocation. A small Llama body with Llama-3's vocabulary (128,256), where the logits dominate: 4 x 1024
tokens make 2 GiB of fp32 logits. Three objectives:

- sft: kftune's training step (loss through the output layer in chunks) against plain transformers +
  PEFT (the model's own loss over full fp32 logits);
- distill: knowledge distillation from the base (LoRA, the teacher the same model with its adapter
  disabled), T^2 KL(teacher || student) at every position: kftune's KL through both models' output
  layers in chunks against the same KL over both models' full fp32 logits;
- online_rl: a GRPO step, each completion token's log-probability weighed by its advantage (the second
  half of each row is the completion). kftune's per-token losses through the output layer in chunks
  against the log-probabilities as TRL's GRPOTrainer computes them (`_get_per_token_logps`: the
  model's logits at the completion positions only, `logits_to_keep`, then `selective_log_softmax`).

    python bench/loss_memory.py                         # sft: peak extra memory, seconds per step, ratios
    python bench/loss_memory.py --objective online_rl
    python bench/loss_memory.py --objective distill
    python bench/loss_memory.py --shape tiny --steps 1 --no-save   # the harness itself, in seconds

Each side runs in its own process, so each peak (ru_maxrss) is its own: the peak resident memory
during the steps minus the resident memory before them. Results are appended to
bench/results/loss_memory.jsonl with the exact command.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import resource
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from gpu_throughput import (
    adamw_step,
    hf_peft,
    kftune_lora,
    kftune_lora_model,
    make_model,
    peft_lora,
    train_settings,
)

REPO = Path(__file__).resolve().parents[1]
SHAPES = {
    "llama3-vocab": {
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 128256,
        "seq": 1024,
        "batch": 4,
        "precision": "fp32",
    },
    "tiny": {  # the harness's own test
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "vocab_size": 64,
        "seq": 8,
        "batch": 2,
        "precision": "fp32",
    },
}


def completion_length(batch: dict) -> int:
    """online_rl: the tokens each row's completion holds, its last ones (half of the row); the rest is its prompt."""
    return batch["advantages"].shape[1]


def grpo_loss(logps: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """GRPO's policy term at the first update of a rollout: -A * pi / pi_old, pi_old = pi, over the completion tokens."""
    return -(torch.exp(logps - logps.detach()) * advantages).mean()


@contextlib.contextmanager
def trl_grpo(model, settings, device: torch.device):
    """The online RL peer: PEFT's LoRA, and the completion's log-probabilities as TRL's GRPOTrainer takes
    them: the logits of the completion positions only, then log-softmax at the sampled tokens."""
    model = peft_lora(model)

    def loss(batch: dict) -> torch.Tensor:
        completion = completion_length(batch)
        inputs = {key: batch[key] for key in ("input_ids", "attention_mask")}
        logits = model(**inputs, logits_to_keep=completion + 1).logits[:, :-1].float()
        chosen = batch["input_ids"][:, -completion:, None]
        return grpo_loss(logits.gather(-1, chosen).squeeze(-1) - logits.logsumexp(-1), batch["advantages"])

    yield adamw_step(model, loss, settings, device)


@contextlib.contextmanager
def kftune_grpo(model, settings, device: torch.device):
    """Ours: the method registry's LoRA and the per-token log-probabilities kftune's GRPO and PPO train on."""
    from kftune.alignment.online import token_logps

    model = kftune_lora_model(model)

    def loss(batch: dict) -> torch.Tensor:
        return grpo_loss(token_logps(model, batch)[:, -completion_length(batch) :], batch["advantages"])

    yield adamw_step(model, loss, settings, device)


TEMPERATURE = 2.0
"""distill: the softmax temperature of both models' distributions."""


@contextlib.contextmanager
def full_logits_distill(model, settings, device: torch.device):
    """The distillation peer: PEFT's LoRA, and the KL over both models' full fp32 logits (each one's
    log-softmax, then the KL), as a plain PyTorch distillation loss takes it."""
    model = peft_lora(model)

    def loss(batch: dict) -> torch.Tensor:
        inputs = {key: batch[key] for key in ("input_ids", "attention_mask")}
        with torch.no_grad(), model.disable_adapter():
            teacher = model(**inputs).logits.float()
        student = model(**inputs).logits.float()
        kl = torch.nn.functional.kl_div(
            (student / TEMPERATURE).log_softmax(-1),
            (teacher / TEMPERATURE).log_softmax(-1),
            log_target=True,
            reduction="sum",
        )
        return TEMPERATURE**2 * kl / batch["attention_mask"].sum()

    yield adamw_step(model, loss, settings, device)


@contextlib.contextmanager
def kftune_distill(model, settings, device: torch.device):
    """Ours: the method registry's LoRA and retention's distillation term, as the training loop adds it."""
    from kftune.retention.distill import Teacher, distillation_sum, output_logits

    model = kftune_lora_model(model)
    teacher = Teacher(model)

    def loss(batch: dict) -> torch.Tensor:
        student, taught = output_logits(model, batch, "causal_lm"), teacher.logits(batch, "causal_lm")
        return distillation_sum(student, taught, batch["attention_mask"], TEMPERATURE) / batch["attention_mask"].sum()

    yield adamw_step(model, loss, settings, device)


SIDES = {
    "sft": {"hf_peft": hf_peft, "kftune": kftune_lora},
    "distill": {"full_logits": full_logits_distill, "kftune": kftune_distill},
    "online_rl": {"trl_grpo": trl_grpo, "kftune": kftune_grpo},
}
"""Per objective: the peer, then ours."""


def resident_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


def run_side(objective: str, name: str, shape: dict, steps: int) -> dict:
    """One side's steps in this process: seconds per step and peak memory above the start."""
    device = torch.device("cpu")
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape["vocab_size"], (shape["batch"], shape["seq"]), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    if objective == "online_rl":
        completion = shape["seq"] // 2
        batch["labels"] = ids.clone()
        batch["labels"][:, :-completion] = -100
        batch["advantages"] = torch.randn(shape["batch"], completion, generator=generator)
    side = SIDES[objective][name]
    with side(make_model(shape, device, torch.float32), train_settings("lora", shape, device), device) as step:
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
    parser.add_argument("--objective", choices=sorted(SIDES), default="sft")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-vocab")
    parser.add_argument("--side", help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--no-save", action="store_true", help="print only; do not append to bench/results")
    args = parser.parse_args()
    if args.side:
        print(json.dumps(run_side(args.objective, args.side, SHAPES[args.shape], args.steps)))
        return 0

    results = []
    for name in SIDES[args.objective]:
        child = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--side", name],
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
    print(f"kftune vs {peer['name']}: {memory_ratio:.1f}x less peak memory, {speed_ratio:.2f}x the speed")
    if not args.no_save:
        record = {
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": " ".join(["python", *sys.argv]),
            "commit": subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
            ).stdout.strip(),  # the code measured
            "device": platform.processor() or "cpu",
            "threads": torch.get_num_threads(),
            "objective": args.objective,
            "shape": {"name": args.shape, **SHAPES[args.shape]},
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
