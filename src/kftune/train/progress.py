"""A progress bar that survives pipes: one plain line every few seconds instead of carriage returns,
because training output travels through Ray's log forwarding and the pipeline runner's log stream."""

from __future__ import annotations

import sys
import time


class ProgressLine:
    def __init__(
        self,
        total: int,
        label: str = "train",
        every_seconds: float = 5.0,
        width: int = 24,
        start_step: int = 0,
        unit: str = "step",
    ):
        self.total, self.label, self.every, self.width, self.start_step, self.unit = (
            total,
            label,
            every_seconds,
            width,
            start_step,
            unit,
        )
        self.start = time.perf_counter()
        self.last_print = 0.0

    def update(self, step: int, loss: float | None = None) -> None:
        now = time.perf_counter()
        if step < self.total and now - self.last_print < self.every:
            return
        self.last_print = now
        elapsed = now - self.start
        rate = (step - self.start_step) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else 0.0
        filled = self.width * step // self.total
        bar = "#" * filled + "-" * (self.width - filled)
        print(
            f"{self.label} [{bar}] {step:>{len(str(self.total))}}/{self.total} {100 * step // self.total:3d}%"
            f"{f'  loss {loss:.4f}' if loss is not None else ''}  {rate:.2f} {self.unit}/s  eta {int(eta) // 60}m{int(eta) % 60:02d}s",
            file=sys.stdout,
            flush=True,
        )
