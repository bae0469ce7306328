"""The GPU speed bar: kftune's training step against plain transformers peers on the same batch, in
the same invocation, on a Llama-3.2-1B-shaped random-init model (hidden 2048, 16 layers, 32/8 heads,
vocab 128256), bf16, sequence 2048, micro-batch 8.

    python bench/gpu_throughput.py                  # LoRA r=16, all linear layers, vs transformers + PEFT (eager, compiled; with and without autocast)
    python bench/gpu_throughput.py --method full    # full fine-tuning under ZeRO-2 vs transformers + DeepSpeed ZeRO-2
    python bench/gpu_throughput.py --shape tiny     # the same harness on CPU with a tiny fp32 model (smoke test)
    python bench/gpu_throughput.py --shape narrow --results bench/results/cpu_throughput.jsonl  # bf16 on a CPU

Ours runs in each variant `--ours` lists, as a run config would set it: `eager`, `compile`
(train.compile), `ckpt=K` (activation checkpointing in every K-th decoder layer), joined with `+`
(`compile+ckpt=4`); the peers always run as stated. The ratio is taken for our fastest variant within
the memory target. `--profile FILE` then runs that variant a few steps under torch.profiler and writes
the top kernels by device time and the memory peak.

Targets: lora, our tokens/s >= 1.5x the best peer's at <= 25 GiB peak; full, >= 1.3x HF + DeepSpeed
ZeRO-2's (the issue quotes 39.2k tokens/s at 66.4 GiB for it). Each record carries tokens/s, peak
memory and MFU: model FLOPs (PaLM's count, appendix B: 6N + 12·L·d·T per token for full training,
4N + 12·L·d·T when the frozen weights get no gradient) over the bf16 matrix rate measured on this
device in the same run. Without a GPU the llama-1b shape says so and exits 0; `narrow` (two decoder layers
of that width, vocabulary 32k, 2 x 512 tokens) runs in bf16 on a CPU that has bf16 instructions. Results are
appended to bench/results/gpu_throughput.jsonl (or --results) with the exact command and the method.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import platform
import socket
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHAPES = {
    "llama-1b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "seq": 2048,
        "batch": 8,
        "precision": "bf16",
    },
    "narrow": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 2,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 32000,
        "seq": 512,
        "batch": 2,
        "precision": "bf16",
    },
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 512,
        "seq": 64,
        "batch": 2,
        "precision": "fp32",
    },
}
TARGETS = {"lora": (1.5, 25.0), "full": (1.3, None)}  # method: (our tokens/s over the best peer's, peak GiB at most)


def make_model(shape: dict, device: torch.device, dtype: torch.dtype):
    """Random-initialised on the device itself (a 1B model initialises in seconds there, minutes on the host)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **{k: v for k, v in shape.items() if k not in ("seq", "batch", "precision")},
        max_position_embeddings=shape["seq"],
    )
    torch.manual_seed(0)
    with device:
        return LlamaForCausalLM(config).to(dtype=dtype)


def parse_variant(text: str) -> tuple[bool, int]:
    """`eager`, `compile`, `ckpt=K` or a `+`-joined mix: (train.compile, checkpoint every K-th layer or 0)."""
    compiled, every = False, 0
    for part in text.split("+"):
        if part == "compile":
            compiled = True
        elif part.startswith("ckpt=") and part[5:].isdigit() and int(part[5:]) > 0:
            every = int(part[5:])
        elif part != "eager":
            raise argparse.ArgumentTypeError(
                f"--ours: unknown variant part {part!r} (eager, compile, ckpt=K, joined with +)"
            )
    return compiled, every


def train_settings(method: str, shape: dict, device: torch.device, variant: str = "eager"):
    """The run config's train section both sides read (lr, clipping, precision): one worker, one
    micro-batch a step, a constant learning rate; full fine-tuning under ZeRO-2. `train.compile` and
    activation checkpointing (every k-th layer) are read by ours only: the peers run as the issue states them."""
    from kftune.config import DeepSpeedSection, TrainSection

    compiled, every = parse_variant(variant)
    return TrainSection(
        batch_size=shape["batch"],
        workers=1,
        lr=1e-4,
        schedule="constant",
        use_gpu=device.type == "cuda",
        precision=shape["precision"],
        deepspeed=DeepSpeedSection(stage=2) if method == "full" else None,
        compile=compiled,
        gradient_checkpointing=every > 0,
        gradient_checkpointing_every=max(every, 1),
    )


def model_flops_per_token(shape: dict, method: str) -> float:
    """PaLM's model FLOPs per token (Chowdhery et al. 2022, appendix B): 6N + 12·L·d·T for training every
    weight, where N counts the matrix parameters (the embedding lookup is no product); with frozen weights
    their gradient (2N) is never computed, so 4N. LoRA's own products are under 1% and left out."""
    d, layers, inner, vocab = (
        shape["hidden_size"],
        shape["num_hidden_layers"],
        shape["intermediate_size"],
        shape["vocab_size"],
    )
    kv = d * shape["num_key_value_heads"] // shape["num_attention_heads"]
    matrices = layers * (2 * d * d + 2 * d * kv + 3 * d * inner) + d * vocab
    return (6 if method == "full" else 4) * matrices + 12 * layers * d * shape["seq"]


def matmul_rate(device: torch.device) -> float | None:
    """The bf16 matrix rate this device reaches (FLOP/s; 8192^3 products on random data, median of 10), the MFU denominator."""
    if device.type != "cuda":
        return None
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * 8192**3 / sorted(times)[len(times) // 2]


def init_process_group(device: torch.device) -> None:
    """DeepSpeed runs inside a torch.distributed group even on one device: one of world size 1, once
    per process, on a free port (other jobs may hold the usual one). On CPU, gloo, and DeepSpeed's
    shared-memory op is skipped as kftune's CPU runs skip it (it would JIT-compile)."""
    from kftune.train.engines import skip_shm_op

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    if device.type == "cpu":
        skip_shm_op()
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")


def loop_loss(model, batch: dict) -> torch.Tensor:
    """The training loop's loss for one worker and one micro-batch: summed over the labelled tokens, over their count."""
    from kftune.train.losses import summed_loss

    return summed_loss(model, batch, "causal_lm") / (batch["labels"][:, 1:] != -100).sum()


def adamw_step(model, loss, settings, device: torch.device):
    """A step as a plain training script takes it: backward, torch's AdamW over the trainable parameters, gradients cleared."""
    from kftune.train.engines import torch_adamw

    optimizer = torch_adamw([{"params": [p for p in model.parameters() if p.requires_grad]}], settings, device)

    def step(batch):
        loss(batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def peft_lora(model):
    """The peers' LoRA: PEFT's own, r=16 on every linear layer."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))


def kftune_lora_model(model):
    """Ours: the same LoRA through the method registry, as a run config's `method` applies it."""
    from kftune.methods import apply_method
    from kftune.methods.lora import LoraOptions

    return apply_method(model, LoraOptions(r=16, alpha=32, target_modules="all-linear"), "causal_lm")


@contextlib.contextmanager
def hf_peft(model, settings, device: torch.device, compiled: bool = False, autocast: bool = False):
    """The LoRA peer: PEFT's LoRA and the model's own loss (full logits), eager or under torch.compile, and
    on the 16-bit model as it is or under bf16 autocast (HF Trainer's `bf16=True`: PEFT's fp32 LoRA
    weights then multiply in bf16)."""
    model = peft_lora(model)
    if compiled:
        model.compile()

    def loss(batch: dict) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            return model(**batch).loss

    yield adamw_step(model, loss, settings, device)


@contextlib.contextmanager
def kftune_lora(model, settings, device: torch.device):
    """Ours: the method registry's LoRA and the training loop's loss in its mixed precision, exactly as a worker runs them."""
    from kftune.train.engines import mixed_precision
    from kftune.train.loop import checkpoint_activations

    checkpoint_activations(model, settings)
    model = kftune_lora_model(model)
    if settings.compile:
        model.compile()  # as the DDP engine does for train.compile

    def loss(batch: dict) -> torch.Tensor:
        with mixed_precision(model, settings.precision, device):
            return loop_loss(model, batch)

    yield adamw_step(model, loss, settings, device)


@contextlib.contextmanager
def hf_deepspeed(model, settings, device: torch.device):
    """The full fine-tuning peer as HF Trainer's DeepSpeed integration runs it: the ZeRO-2 config of
    HF's docs (no offload) with the Trainer's fills, its default AdamW (torch's, fused on GPUs)
    handed in, the model's own loss, engine.backward and engine.step."""
    import deepspeed

    from kftune.train.engines import torch_adamw

    config = {
        "zero_optimization": {
            "stage": 2,
            "allgather_partitions": True,
            "allgather_bucket_size": 2e8,
            "overlap_comm": True,
            "reduce_scatter": True,
            "reduce_bucket_size": 2e8,
            "contiguous_gradients": True,
        },
        "bf16": {"enabled": settings.precision == "bf16"},
        "train_batch_size": settings.batch_size,
        "train_micro_batch_size_per_gpu": settings.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": settings.max_grad_norm,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2000,
        "wall_clock_breakdown": False,
    }
    optimizer = torch_adamw([{"params": list(model.parameters())}], settings, device)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)

    def step(batch):
        engine.backward(engine(**batch).loss)
        engine.step()

    try:
        yield step
    finally:
        engine.destroy()


@contextlib.contextmanager
def kftune_zero2(model, settings, device: torch.device):
    """Ours: the method `full`, its parameter groups, kftune's DeepSpeed engine and the loop's loss,
    exactly as the training worker builds them."""
    from kftune.methods import apply_method, optimizer_parameter_groups
    from kftune.methods.full import FullOptions
    from kftune.train.engines import make_engine
    from kftune.train.loop import checkpoint_activations

    options = FullOptions()
    checkpoint_activations(model, settings)
    model = apply_method(model, options, "causal_lm")
    groups = optimizer_parameter_groups(model, options, settings.lr, settings.layer_lr_decay)
    engine = make_engine(
        model, groups, settings, total_steps=1, world=1, device=device
    )  # constant schedule: steps do not matter

    def step(batch):
        with engine.micro_step():
            engine.backward(loop_loss(engine.model, batch))
        engine.step()

    try:
        yield step
    finally:
        engine.model.destroy()


def peers(method: str, device: torch.device, dtype: torch.dtype) -> list[tuple[str, object]]:
    """(name, contender) pairs; torch.compile's peers only on GPUs, where they pay for their compile time,
    and the LoRA peers under autocast too when the model is bf16 (whichever is faster is the best peer)."""
    if method == "full":
        return [("hf_deepspeed_zero2", hf_deepspeed)]
    ways = [("eager", {})] + ([("compile", {"compiled": True})] if device.type == "cuda" else [])
    autocast = [True] if dtype == torch.bfloat16 else []
    return [
        (f"hf_peft_{name}{'_autocast' if cast else ''}", functools.partial(hf_peft, **options, autocast=cast))
        for name, options in ways
        for cast in [False, *autocast]
    ]


OURS = {"lora": ("kftune", kftune_lora), "full": ("kftune_zero2", kftune_zero2)}


def timed(step, batch: dict, count: int, device: torch.device) -> float:
    started = time.perf_counter()
    for _ in range(count):
        step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def random_batch(shape: dict, device: torch.device) -> dict:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape["vocab_size"], (shape["batch"], shape["seq"]), generator=generator).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def release(device: torch.device) -> None:
    gc.collect()  # DeepSpeed's engines sit in reference cycles
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(
    name: str,
    contender,
    shape: dict,
    settings,
    device: torch.device,
    dtype: torch.dtype,
    steps: int,
    flops_per_token: float,
    rate: float | None,
) -> dict:
    """Tokens/s over `steps` whole training steps (forward, backward, update) after two warm-up steps,
    the peak GPU memory and MFU; the contender's engine is torn down and its memory released before the next is built."""
    batch = random_batch(shape, device)
    started = time.perf_counter()
    with contender(make_model(shape, device, dtype), settings, device) as step:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        timed(step, batch, 2, device)  # warm-up (and compilation)
        warm_seconds = time.perf_counter() - started
        tokens_per_second = shape["batch"] * shape["seq"] * steps / timed(step, batch, steps, device)
        record = {
            "name": name,
            "tokens_per_second": round(tokens_per_second, 1),
            "setup_and_warmup_seconds": round(warm_seconds, 1),
        }
        if device.type == "cuda":
            record["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if rate:
            record["mfu"] = round(tokens_per_second * flops_per_token / rate, 4)
    del step  # its closure holds the model and optimizer
    release(device)
    print(
        f"{name:<28} {record['tokens_per_second']:>10.1f} tokens/s   peak {record.get('peak_gib', '-')} GiB   "
        f"MFU {record.get('mfu', '-')}   (setup + 2 warm-up steps {warm_seconds:.0f} s)",
        flush=True,
    )
    return record


def profile(contender, shape: dict, settings, device: torch.device, dtype: torch.dtype, path: Path) -> None:
    """Three steps of `contender` under torch.profiler: the top operators by device (or host) time and the memory peak."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    batch = random_batch(shape, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with contender(make_model(shape, device, dtype), settings, device) as step:
        timed(step, batch, 2, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with torch_profile(activities=activities, profile_memory=True) as prof:
            timed(step, batch, 3, device)
        sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=70)
        peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if device.type == "cuda" else "n/a (CPU)"
        path.write_text(
            f"{path.stem}: 3 steps, shape {shape}, settings {settings.model_dump(exclude_defaults=True)}\n"
            f"peak allocated over the profiled steps: {peak}\n\n{table}\n"
        )
    del step
    release(device)
    print(f"profile written to {path}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-1b")
    parser.add_argument("--method", choices=sorted(TARGETS), default="lora")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument(
        "--ours",
        nargs="+",
        default=["eager"],
        metavar="VARIANT",
        help="our variants: eager, compile, ckpt=K (activation checkpointing every K-th layer), joined with + (compile+ckpt=2)",
    )
    parser.add_argument(
        "--profile", type=Path, metavar="FILE", help="profile one of our variants and write the summary here"
    )
    parser.add_argument(
        "--profile-variant",
        metavar="VARIANT",
        help="the variant --profile runs (default: the one the ratio is taken for)",
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=REPO / "bench" / "results" / "gpu_throughput.jsonl",
        help="the JSONL file records are appended to",
    )
    parser.add_argument("--no-save", action="store_true", help="print only; do not append a record")
    args = parser.parse_args()
    for variant in args.ours + ([args.profile_variant] if args.profile_variant else []):
        try:
            parse_variant(variant)
        except argparse.ArgumentTypeError as exc:
            parser.error(str(exc))
    if not torch.cuda.is_available() and args.shape == "llama-1b":
        print("gpu_throughput: no CUDA GPU here; the speed bar needs one (an H100), so this benchmark is skipped.")
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[SHAPES[args.shape]["precision"]]
    shape = SHAPES[args.shape]
    flops, rate = model_flops_per_token(shape, args.method), matmul_rate(device)
    if rate:
        print(
            f"bf16 matrix rate measured on {torch.cuda.get_device_name(device)}: {rate / 1e12:.0f} TFLOP/s", flush=True
        )
    if args.method == "full":
        init_process_group(device)
    peer_settings = train_settings(args.method, shape, device)
    measured = [
        measure(name, contender, shape, peer_settings, device, dtype, args.steps, flops, rate)
        for name, contender in peers(args.method, device, dtype)
    ]
    ours_name, ours_contender = OURS[args.method]
    for variant in args.ours:
        record = measure(
            f"{ours_name}[{variant}]",
            ours_contender,
            shape,
            train_settings(args.method, shape, device, variant),
            device,
            dtype,
            args.steps,
            flops,
            rate,
        )
        measured.append({**record, "variant": variant, "ours": True})
    target_ratio, target_gib = TARGETS[args.method]
    best = max((r for r in measured if not r.get("ours")), key=lambda r: r["tokens_per_second"])
    fitting = [r for r in measured if r.get("ours") and (target_gib is None or r.get("peak_gib", 0) <= target_gib)]
    ours = max(fitting or [r for r in measured if r.get("ours")], key=lambda r: r["tokens_per_second"])
    ratio = ours["tokens_per_second"] / best["tokens_per_second"]
    fastest = max((r for r in measured if r.get("ours")), key=lambda r: r["tokens_per_second"])
    within = (
        ""
        if target_gib is None
        else f", {ours.get('peak_gib', '-')} GiB (target <= {target_gib} GiB{'' if fitting else ': no variant fits'})"
    )
    met = ratio >= target_ratio and (target_gib is None or bool(fitting))
    print(
        f"{ours['name']} / best peer ({best['name']}): {ratio:.2f}x (target >= {target_ratio}x){within}: "
        f"{'met' if met else 'NOT met'}",
        flush=True,
    )
    if fastest is not ours:
        print(
            f"fastest of ours regardless of memory: {fastest['name']} {fastest['tokens_per_second'] / best['tokens_per_second']:.2f}x "
            f"at {fastest.get('peak_gib', '-')} GiB",
            flush=True,
        )
    if args.profile:
        variant = args.profile_variant or ours["variant"]
        profile(ours_contender, shape, train_settings(args.method, shape, device, variant), device, dtype, args.profile)
    if not args.no_save:
        record = {
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": " ".join(["python", *sys.argv]),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__,
            "shape": args.shape,
            "method": args.method,
            "steps": args.steps,
            "bf16_matmul_tflops": round(rate / 1e12, 1) if rate else None,
            "model_flops_per_token": flops,
            "results": measured,
            "ours": ours["name"],
            "best_peer": best["name"],
            "ratio": round(ratio, 3),
            "met": met,
            "fastest_ours_ratio": round(fastest["tokens_per_second"] / best["tokens_per_second"], 3),
        }
        args.results.parent.mkdir(parents=True, exist_ok=True)
        with open(args.results, "a") as handle:
            handle.write(json.dumps(record) + "\n")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
