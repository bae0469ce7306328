"""The DeepSpeed config generated from `train` (and overridden by `train.deepspeed.config_file`).

Batch sizes, accumulation, precision and clipping always come from the run config, so the step
math (`kftune.train.engines`) and the checkpoint's meaning cannot drift from what the user set.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kftune.config import TrainSection
from kftune.errors import KftuneError

OWNED_KEYS = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "bf16",
    "fp16",
    "gradient_clipping",
)


def deepspeed_config(train: TrainSection, world: int) -> dict[str, Any]:
    settings = train.deepspeed
    zero: dict[str, Any] = {"stage": settings.stage}
    if settings.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if settings.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config: dict[str, Any] = {
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch's AdamW is handed in (DeepSpeed's CPU Adam with offload)
        "steps_per_print": 10**9,  # our progress line reports; DeepSpeed's own would repeat it
        "wall_clock_breakdown": False,
    }
    if settings.config_file:
        config.update(read_user_config(settings.config_file))
    config.update(
        {
            "train_batch_size": train.batch_size,
            "train_micro_batch_size_per_gpu": train.micro_batch(world),
            "gradient_accumulation_steps": train.gradient_accumulation,
            "bf16": {"enabled": train.precision == "bf16"},
            "fp16": {"enabled": train.precision == "fp16", "initial_scale_power": 16},
            "gradient_clipping": train.max_grad_norm or 0.0,
        }
    )
    return config


def read_user_config(path: str) -> dict[str, Any]:
    """A DeepSpeed JSON file; keys the run config owns are refused rather than silently ignored."""
    file = Path(path)
    if not file.is_file():
        raise KftuneError(f"train.deepspeed.config_file: {path} not found")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise KftuneError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise KftuneError(f"{path}: expected a JSON object of DeepSpeed settings")
    owned = [key for key in OWNED_KEYS if key in data]
    if owned:
        raise KftuneError(
            f"{path}: {', '.join(owned)} come from the run config's train section (batch_size, gradient_accumulation, "
            "precision, max_grad_norm); remove them from the file"
        )
    return data
