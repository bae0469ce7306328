"""Run the pipeline on this machine: the same DAG as on Kubeflow, executed by kfp.local's
SubprocessRunner, with Ray started in-process by the train step and MLflow in a sqlite file."""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

from kftune.config import RunConfig
from kftune.errors import KftuneError

STEP_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error", "RAY_DEDUP_LOGS": "0"}


def with_local_registry(config: RunConfig, out_dir: Path) -> RunConfig:
    """Without a tracking URI, MLflow lives in `out_dir`: a sqlite store and an artifact folder."""
    if config.registry.tracking_uri:
        return config
    registry = config.registry.model_copy(
        update={
            "tracking_uri": f"sqlite:///{(out_dir / 'mlflow.db').resolve()}",
            "artifact_location": config.registry.artifact_location or (out_dir / "mlartifacts").resolve().as_uri(),
        }
    )
    return config.model_copy(update={"registry": registry})


def on_this_machine(config: RunConfig) -> RunConfig:
    """Train here even when the config hands training to a RayJob on a cluster."""
    rayjob = config.cluster.rayjob.model_copy(update={"enabled": False})
    return config.model_copy(update={"cluster": config.cluster.model_copy(update={"rayjob": rayjob})})


def preflight(config: RunConfig) -> None:
    """Fail before any step starts: model folder and weights, the method against the model's
    architecture, data file, columns, splits."""
    from kftune.data.prepare import prepare
    from kftune.methods import check_method_fits_model
    from kftune.models import resolve_model_path

    check_method_fits_model(config.method, resolve_model_path(config.model.name_or_path))
    prepare(config)


def run_pipeline(config: RunConfig, out_dir: str | Path, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
    """Execute the DAG; returns the register step's summary plus wall time and output locations.
    `arguments` override pipeline parameters, as a run started from the Kubeflow UI's form would."""
    from kfp import local

    from kftune.pipelines.kftune_pipeline import build_pipeline, pipeline_arguments

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.update(STEP_ENV)
    # The local runner ignores display names and cannot tell our images hold Python; both are expected here.
    warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
    warnings.filterwarnings("ignore", message=".*custom or non-Python base image.*")
    started = time.perf_counter()
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(out / "pipeline"))
    try:
        task = build_pipeline(config.cluster)(**{**pipeline_arguments(on_this_machine(config)), **(arguments or {})})  # cluster settings: no-ops here
    except RuntimeError as exc:
        raise KftuneError(f"the pipeline failed: {exc} (the failing step's log is above)") from None
    summary_path = Path(task.outputs["Output"].path)
    summary = json.loads(summary_path.read_text())
    summary["wall_seconds"] = round(time.perf_counter() - started, 1)
    summary["outputs"] = {"pipeline": str(summary_path.parents[1]), "run_dir": str(out)}
    return summary
