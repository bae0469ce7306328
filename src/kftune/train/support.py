"""Which engine settings can work together, checked when the config is validated (before any step runs)."""

from __future__ import annotations

from kftune.methods import METHODS


def engine_problem(config) -> tuple[str, str] | None:
    """A (field, message) for a train/method combination that cannot work, or None."""
    train, method = config.train, METHODS[config.method.name]
    if train.precision == "fp16" and not train.use_gpu:
        return "train.precision", "fp16 needs GPUs (train.use_gpu: true); on CPU use bf16 or fp32"
    deepspeed = train.deepspeed
    if deepspeed is None:
        return None
    if deepspeed.stage not in method.zero_stages:
        allowed = ", ".join(map(str, method.zero_stages)) or "none"
        return (
            "train.deepspeed.stage",
            f"method {method.name} does not work under ZeRO stage {deepspeed.stage} (supported stages: {allowed}); {method.zero_note}",
        )
    if deepspeed.offload_optimizer and deepspeed.stage == 0:
        return "train.deepspeed.offload_optimizer", "offloading optimizer state needs ZeRO stage 1 or higher"
    if deepspeed.offload_params and deepspeed.stage != 3:
        return "train.deepspeed.offload_params", "offloading parameters needs ZeRO stage 3"
    return None
