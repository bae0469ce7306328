"""The GPU speed bar: kftune's training step against plain transformers + PEFT on the same batch,
in the same invocation, on a Llama-3.2-1B-shaped random-init model (hidden 2048, 16 layers, 32/8
heads, vocab 128256), bf16, sequence 2048, micro-batch 8, LoRA r=16 on all linear layers.

    python bench/gpu_throughput.py                 # on a CUDA machine; prints tokens/s, peak GiB, ratios
    python bench/gpu_throughput.py --shape tiny    # the same harness on CPU with a tiny model (smoke test)

Target: our tokens/s >= 1.5x the best peer's at <= 25 GiB peak. Without a GPU (and without
--shape tiny) it says so and exits 0. Results are appended to bench/results/gpu_throughput.jsonl
with the exact command.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHAPES = {
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, seq=2048, batch=8),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, seq=64, batch=2),
}
TARGET_RATIO, TARGET_GIB = 1.5, 25.0


def make_model(shape: dict, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{k: v for k, v in shape.items() if k not in ("seq", "batch")}, max_position_embeddings=shape["seq"])
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype)


def hf_peft_step(model):
    """The peer: PEFT's LoRA and the model's own loss (full logits)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))

    def step(batch):
        return model(**batch).loss

    return model, step


def kftune_step(model):
    """Ours: the method registry's LoRA and the training loop's loss, exactly as a worker runs them."""
    from kftune.methods import apply_method
    from kftune.methods.lora import LoraOptions
    from kftune.train.losses import summed_loss

    model = apply_method(model, LoraOptions(r=16, alpha=32, target_modules="all-linear"), "causal_lm")

    def step(batch):
        return summed_loss(model, batch, "causal_lm") / (batch["labels"][:, 1:] != -100).sum()

    return model, step


def measure(name: str, build, shape: dict, device: torch.device, dtype: torch.dtype, compile_model: bool, steps: int) -> dict:
    model, step = build(make_model(shape, device, dtype))
    if compile_model:
        model.compile()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=device.type == "cuda" or None)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape["vocab_size"], (shape["batch"], shape["seq"]), generator=generator).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def run(count: int) -> float:
        for _ in range(count):
            step(batch).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    run(2)  # warm-up (and compilation)
    started = time.perf_counter()
    seconds = run(steps) - started
    record = {"name": name, "tokens_per_second": round(shape["batch"] * shape["seq"] * steps / seconds, 1)}
    if device.type == "cuda":
        record["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    print(f"{name:<22} {record['tokens_per_second']:>10.1f} tokens/s   peak {record.get('peak_gib', '-')} GiB", flush=True)
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-1b")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--no-save", action="store_true", help="print only; do not append to bench/results")
    args = parser.parse_args()
    if not torch.cuda.is_available() and args.shape != "tiny":
        print("gpu_throughput: no CUDA GPU here; the speed bar needs one (an H100), so this benchmark is skipped.")
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = SHAPES[args.shape]
    peers = [measure("hf_peft_eager", hf_peft_step, shape, device, dtype, False, args.steps)]
    if device.type == "cuda":
        peers.append(measure("hf_peft_compile", hf_peft_step, shape, device, dtype, True, args.steps))
    ours = measure("kftune", kftune_step, shape, device, dtype, False, args.steps)
    best = max(peers, key=lambda r: r["tokens_per_second"])
    ratio = ours["tokens_per_second"] / best["tokens_per_second"]
    print(f"kftune / best peer ({best['name']}): {ratio:.2f}x (target >= {TARGET_RATIO}x at <= {TARGET_GIB} GiB)")
    if not args.no_save:
        record = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": " ".join(["python", *sys.argv]),
                  "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
                  "shape": args.shape, "steps": args.steps, "results": [*peers, ours], "ratio": round(ratio, 3)}
        with open(REPO / "bench" / "results" / "gpu_throughput.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
