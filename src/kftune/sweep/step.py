"""The pipeline's train step with a `sweep` section: run (or resume) the sweep on the step's Ray cluster and
hand on the best finished trial's model as the step's Model, without training it again.

Under kfp.local the sweep runs on the step's local Ray; on Kubernetes with `cluster.rayjob` inside the
RayJob (`python -m kftune.train`), whose Ray cluster holds the trials' workers. The model folder's train
log names the sweep (`SWEEP_KEY`), so the register step tags the registered version with the sweep's
parent MLflow run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from kftune.config import RunConfig
from kftune.errors import KftuneError
from kftune.train import TRAIN_LOG_FILE

SWEEP_KEY = "sweep"
"""The train log's record of the sweep that chose the model: its parent MLflow run, best trial, folder."""
SWEEP_PARENT_TAG = "kftune.sweep.parent_run_id"
"""On the registered version (and its MLflow run): the sweep's parent run, whose children are the trials."""


def sweep_folder(config: RunConfig, prompts_dir: str | Path, scratch: str | Path) -> Path:
    """`sweep.storage`, else a folder named after the run's identity beside `train.checkpoint.storage`
    (else in `scratch`), so that a restarted step resumes its own sweep."""
    from kftune.train.checkpoints import run_identity
    from kftune.train.launch import storage_location

    if config.sweep.storage:
        return Path(config.sweep.storage)
    storage = storage_location(config.train.checkpoint.storage, scratch)
    if "://" in storage:
        raise KftuneError("sweep.storage: a sweep needs a folder; train.checkpoint.storage is a URI, so name one")
    return Path(storage) / f"{config.registry.model_name}-sweep-{run_identity(config, prompts_dir)[:16]}"


def train_by_sweep(
    config: RunConfig, prompts_dir: str | Path, model_dir: str | Path, folder: Path, report_path: str | Path | None
) -> dict[str, Any]:
    """Run the sweep in `folder`; copy the best finished trial's model into `model_dir` (and the sweep's report
    to `report_path`). Returns the model's train log, which names the sweep."""
    from kftune.sweep.run import REPORT_FILE, run_sweep
    from kftune.sweep.trial import trial_model

    summary = run_sweep(config, config.sweep, folder, config, prompts=Path(prompts_dir))
    if summary["interrupted"]:
        raise KftuneError(f"the sweep in {folder} was interrupted; run the step again to resume it")
    best = summary["best"]
    if not best or best["outcome"] != "finished":
        raise KftuneError(f"no trial of the sweep in {folder} finished, so there is no model to hand on")
    model_dir = Path(model_dir)
    if model_dir.exists():
        shutil.rmtree(model_dir)
    shutil.copytree(trial_model(folder, best["trial_id"]), model_dir)
    log = json.loads((model_dir / TRAIN_LOG_FILE).read_text())
    log[SWEEP_KEY] = {
        "parent_run_id": summary["parent_run_id"],
        "best_trial": best["trial"],
        "trials": len(summary["trials"]),
        "folder": str(folder),
    }
    (model_dir / TRAIN_LOG_FILE).write_text(json.dumps(log, indent=2))
    if report_path:
        shutil.copyfile(folder / REPORT_FILE, report_path)
    print(
        f"sweep: handing on {best['trial']} ({config.sweep.metric} {best['metric']:.4f}) of {len(summary['trials'])}"
        " trials, not trained again; the sweep's report is this step's sweep_report",
        flush=True,
    )
    return log
