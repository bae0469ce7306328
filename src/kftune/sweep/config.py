"""The sweep's settings: a sweep file's keys for `kftune sweep`, and the run config's optional `sweep`
section, with which the pipeline's train step runs the sweep and hands on the best trial's model.

Plain data, validated without reading any file; the search space against the run config is checked
by `kftune.sweep.space.sweep_problems`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kftune.section import Section

SWEEP_METRICS = {"validation_loss": "min", "validation_accuracy": "max"}
"""What a trial reports during training (`train.eval_every_steps`), and which way is better."""


class SweepSettings(Section):
    """A sweep file's keys (`--space`), or a run config's `sweep` section; `kftune sweep`'s flags override them."""

    space: dict[str, str] = Field(default_factory=dict)
    """Config field (dotted path) -> search domain, e.g. `train.lr: loguniform(1e-5, 1e-3)`."""
    metric: Literal["validation_loss", "validation_accuracy"] = "validation_loss"
    """What trials are compared by: reported every `train.eval_every_steps` (validation_accuracy: classification heads)."""
    samples: int | None = Field(default=None, ge=1)
    """Trials drawn from the space (each grid point this many times); empty: 1 when every field is a grid, else 4."""
    parallel: int = Field(default=1, ge=1)
    """Trials that train at once; each takes train.workers x train.cpus_per_worker CPUs (and a GPU per worker with
    train.use_gpu). Under a RayJob each trial gets an equal share of its GPUs."""
    grace_steps: int | None = Field(default=None, ge=1)
    """ASHA compares a trial with the others only after this many optimizer steps; empty: train.eval_every_steps."""
    reduction_factor: float = Field(default=2.0, gt=1)
    """ASHA keeps the best 1/reduction_factor of the trials at each rung (steps grace_steps x reduction_factor^k)."""
    seed: int = 0
    """Seeds Ray Tune's sampling, so the same sweep draws the same trials."""
    storage: str | None = None
    """The pipeline's train step: the folder that holds the sweep (state, trials, their models), reachable by every
    Ray node; the same sweep started there again resumes, a finished one hands on its best model at once. Empty:
    beside `train.checkpoint.storage` (else in the step's scratch space; under a RayJob, its work folder on the
    volume). `kftune sweep` uses `--out`."""

    @property
    def mode(self) -> str:
        return SWEEP_METRICS[self.metric]

    def spec(self) -> dict:
        """What makes two sweeps the same one (where a sweep lives is not part of it)."""
        return self.model_dump(exclude={"storage"})
