"""One trial: the sampled values written into the run config, and the train step's own Ray Train run
(`kftune.train.launch.make_trainer`, the same `train_worker`), whose workers report each validation;
those reports, and only those, reach Ray Tune, where ASHA may stop the trial.

The trial function is only a driver (Ray's pattern for Train inside Tune): the workers hold the CPUs
and GPUs. Its Ray Train run is named after the trial and kept in the sweep's folder, so a trial
restarted by `Tuner.restore` resumes from its own checkpoints (`train.checkpoint.every_steps`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback

from kftune.config import RunConfig, config_to_dict, parse_config, with_values
from kftune.sweep.space import PROMPT_SHAPING

MODELS_FOLDER = "models"


class ValidationToTune(TuneReportCallback):
    """Passes on to Tune the workers' validation reports; checkpoint and final reports (without the
    metric) stay with Ray Train, since Tune refuses a result that lacks the metric it optimises."""

    def __init__(self, metric: str):
        super().__init__()
        self.metric = metric

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if self.metric in metrics[0]:
            super().after_report(run_context, metrics, None)


def run_trial(values: dict[str, Any], base: dict[str, Any], work_dir: str, metric: str) -> None:
    """Ray Tune's trainable: train the base config with `values` (dotted fields) written in."""
    import ray.tune

    from kftune.train.checkpoints import run_identity
    from kftune.train.launch import make_trainer

    config = parse_config(with_values(base, values), source="sweep trial")
    prompts = prompts_for(config, Path(work_dir) / "prompts")
    trial_id = ray.tune.get_context().get_trial_id()
    result = make_trainer(
        config,
        prompts,
        run_identity(config, prompts),
        str(Path(work_dir) / "trials"),
        f"trial-{trial_id}",
        callbacks=(ValidationToTune(metric),),
        report_validation=True,
    ).fit()
    result.checkpoint.to_directory(str(trial_model(work_dir, trial_id)))


def trial_model(work_dir: str | Path, trial_id: str) -> Path:
    """Where a finished trial's model is kept (as the train step's Model artifact holds it)."""
    return Path(work_dir) / MODELS_FOLDER / trial_id


def prompts_for(config: RunConfig, folder: Path, built: Path | None = None) -> Path:
    """The prepared data and prompts this config trains on, built once per distinct data, prompt and
    model settings and shared by the trials that have them (written aside, then moved into place);
    `built`: this config's prompts, built already (the pipeline's build_prompts step), copied instead."""
    from kftune import steps

    data = config_to_dict(config)
    shaping = {section: data[section] for section in PROMPT_SHAPING} | {"seed": config.train.seed}
    target = folder / hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]
    if target.is_dir():
        return target / "prompts"
    folder.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=folder, prefix=".building-"))
    if built:
        shutil.copytree(built, scratch / "prompts")
    else:
        steps.prepare_data(data, str(scratch / "data"), str(scratch / "data_card.md"))
        steps.build_prompts(data, str(scratch / "data"), str(scratch / "prompts"), str(scratch / "preview.html"))
    try:
        os.rename(scratch, target)
    except OSError:  # another trial built the same prompts first
        shutil.rmtree(scratch, ignore_errors=True)
    return target / "prompts"
