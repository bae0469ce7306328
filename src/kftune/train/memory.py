"""Will the run fit its GPUs? A coarse per-GPU estimate checked when a GPU worker starts, so a batch
that cannot fit fails at once with the numbers and the knobs, not after minutes with a CUDA OOM.

Model states follow the ZeRO paper (weights, gradients and Adam state, each partitioned from its
stage on); activations follow Korthikanti et al. 2022 (34 x sequence x micro-batch x hidden bytes
per layer in 16-bit, attention scores left out as SDPA/flash attention do not keep them; with
activation checkpointing only each recomputed layer's input stays, plus one layer being recomputed);
a causal LM adds its fp32 logits and their gradient, or one chunk of them when its loss goes through
the output layer in chunks.
"""

from __future__ import annotations

from kftune.config import DeepSpeedSection, TrainSection
from kftune.errors import KftuneError
from kftune.methods import full_numel
from kftune.train.linear_cross_entropy import CHUNK_LOGITS
from kftune.train.losses import plain_output_head

GIB = 2**30


def estimate_bytes(model, train: TrainSection, sequence: int, world: int, task: str) -> dict[str, float]:
    """Bytes per GPU by kind: weights, gradients, optimizer, activations, logits."""
    trainable = sum(full_numel(p) for p in model.parameters() if p.requires_grad)
    stage = train.deepspeed.stage if train.deepspeed else 0
    half = train.precision in ("bf16", "fp16")
    weight_bytes = 2 if half and train.deepspeed else 4  # what trains: DDP autocast keeps fp32 master weights
    frozen_bytes = 2 if half else 4  # see kftune.models.weights_dtype
    total_weight_bytes = (
        trainable * weight_bytes + sum(full_numel(p) for p in model.parameters() if not p.requires_grad) * frozen_bytes
    )
    # Adam: two fp32 moments, plus an fp32 master copy when DeepSpeed trains 16-bit weights.
    optimizer_bytes = (
        0 if train.deepspeed and train.deepspeed.offload_optimizer else 8 + (4 if weight_bytes == 2 else 0)
    )
    config = model.config
    hidden, layers = config.hidden_size, config.num_hidden_layers
    micro = train.micro_batch(world)
    activation_scale = 1 if half else 2  # the 34 bytes are for 16-bit activations
    per_layer = 34 * sequence * micro * hidden * activation_scale
    layer_input = 2 * sequence * micro * hidden * activation_scale
    recomputed = -(-layers // train.gradient_checkpointing_every) if train.gradient_checkpointing else 0
    kept = recomputed * layer_input + (layers - recomputed) * per_layer + (per_layer if recomputed else 0)
    # fp32 logits and their gradient: all of them, or one chunk when the loss goes through the head in chunks
    logits = (
        0
        if task != "causal_lm"
        else 2 * 4 * (CHUNK_LOGITS if plain_output_head(model) else micro * sequence * config.vocab_size)
    )
    return {
        "weights": total_weight_bytes / (world if stage == 3 else 1),
        "gradients": trainable * weight_bytes / (world if stage >= 2 else 1),
        "optimizer": trainable * optimizer_bytes / (world if stage >= 1 else 1),
        "activations": kept,
        "logits": logits,
    }


def check_fits(model, train: TrainSection, sequence: int, world: int, task: str, capacity_bytes: int) -> None:
    parts = estimate_bytes(model, train, sequence, world, task)
    needed = sum(parts.values())
    sharded = train.model_copy(
        update={"deepspeed": (train.deepspeed or DeepSpeedSection()).model_copy(update={"stage": 3})}
    )
    states = sum(
        v
        for k, v in estimate_bytes(model, sharded, sequence, world, task).items()
        if k in ("weights", "gradients", "optimizer")
    )
    if (
        states > capacity_bytes
    ):  # no batch setting helps: the model's own states do not fit even partitioned over every GPU
        raise KftuneError(
            f"train.workers: the model's weights, gradients and optimizer state need about {states / GIB:.1f} GiB per GPU even "
            f"partitioned with ZeRO-3 over {world} GPUs of {capacity_bytes / GIB:.1f} GiB; declare more GPUs (train.workers, "
            "cluster.rayjob.nodes), offload to CPU (train.deepspeed.offload_optimizer / offload_params), or use LoRA with "
            "model.quantization"
        )
    if needed > capacity_bytes:
        detail = ", ".join(f"{kind} {value / GIB:.1f}" for kind, value in parts.items())
        raise KftuneError(
            f"train.batch_size: a micro-batch of {train.micro_batch(world)} rows x {sequence} tokens needs about "
            f"{needed / GIB:.1f} GiB per GPU ({detail}); the GPU has {capacity_bytes / GIB:.1f} GiB. Lower train.batch_size, "
            "raise train.gradient_accumulation, lower prompt.max_length, turn on train.gradient_checkpointing (every layer), or use a higher "
            "train.deepspeed.stage"
        )


def built_peak_gb(device) -> dict[str, float]:
    """This process's memory high-water marks so far, in GB: host RSS (the kernel's, for the whole process)
    and, on a GPU, what torch allocated there. Recorded once the model and engine are built, before training,
    so a run's log says what building cost apart from what training adds."""
    import resource
    import sys

    import torch

    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    peaks = {"host_rss": round(max_rss * (1 if sys.platform == "darwin" else 1024) / 1e9, 3)}
    if device.type == "cuda":
        peaks["gpu_allocated"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 3)
    return peaks
