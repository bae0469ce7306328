"""Learning-rate schedules as multipliers of the configured lr, one function of the step each.

A plain function (wrapped in torch's LambdaLR) rather than transformers' scheduler zoo: DeepSpeed
and DDP step the same object, a checkpoint restores it from the step count alone, and the cyclical
schedule (Smith 2017) sits beside the usual ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from kftune.config import TrainSection


def lr_multiplier(train: TrainSection, total_steps: int) -> Callable[[int], float]:
    """The factor applied to `train.lr` before optimizer step `step` (0-based), warmup included."""
    warmup = int(train.warmup * total_steps)
    cycle = train.cycle_steps or max(2, total_steps // 4)

    def after_warmup(step: int) -> float:
        progress = (step - warmup) / max(1, total_steps - warmup)
        if train.schedule == "linear":
            return max(0.0, 1.0 - progress)
        if train.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if train.schedule == "cyclical":  # triangle: floor -> 1 -> floor every `cycle` steps
            phase = ((step - warmup) % cycle) / cycle
            return train.cycle_floor + (1.0 - train.cycle_floor) * (1.0 - abs(2.0 * phase - 1.0))
        return 1.0

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return after_warmup(step)

    return multiplier
