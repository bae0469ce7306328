"""The five pipeline steps as plain functions of a config dict and artifact paths.

Each KFP component in `components/` is a thin typed wrapper that calls one of these; tests call
them directly. A step returns the metadata its component attaches to its output artifact.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from kftune import __version__
from kftune.config import RunConfig, parse_config

EVALUATION_FILE = "evaluation.json"


def _config(config: dict[str, Any]) -> RunConfig:
    return parse_config(config, source="pipeline parameter config")


def prepare_data(config: dict[str, Any], dataset_dir: str, card_path: str) -> dict[str, Any]:
    from kftune.data.prepare import data_card_markdown, prepare, write_prepared

    card = write_prepared(prepare(_config(config)), dataset_dir)
    Path(card_path).write_text(data_card_markdown(card), encoding="utf-8")
    return {"dataset_sha256": card["dataset_sha256"], **{f"{k}_rows": v["rows"] for k, v in card["splits"].items()}}


def build_prompts(config: dict[str, Any], dataset_dir: str, prompts_dir: str, preview_path: str) -> dict[str, Any]:
    from kftune.prompts.build import build_prompts as build, preview_html

    meta = build(_config(config), dataset_dir, prompts_dir)
    Path(preview_path).write_text(preview_html(meta), encoding="utf-8")
    return {"template": meta["template"], **{f"{k}_rows": v.get("rows", 0) for k, v in meta["splits"].items()}}


def train(config: dict[str, Any], prompts_dir: str, model_dir: str, run_name: str) -> dict[str, Any]:
    run_config = _config(config)
    if run_config.cluster.rayjob.enabled:  # on Kubernetes: a KubeRay RayJob trains on GPU nodes; this pod follows it
        from kftune.kube.rayjob import train_on_rayjob

        log = train_on_rayjob(run_config, prompts_dir, model_dir, run_name)
    else:
        from kftune.train.launch import run_training

        with tempfile.TemporaryDirectory(prefix="kftune-ray-") as scratch:  # checkpoints, unless train.checkpoint.storage keeps them
            log = run_training(run_config, prompts_dir, model_dir, scratch)
    return {k: log[k] for k in ("steps", "seconds", "seconds_per_step", "trainable_parameters", "final_loss")}


def evaluate(config: dict[str, Any], prompts_dir: str, model_dir: str, evaluation_dir: str, report_path: str) -> dict[str, float]:
    """Writes evaluation.json and the HTML report; returns the flat metrics for the KFP Metrics artifact."""
    from kftune.evaluate.evaluate import evaluate as run_evaluation
    from kftune.evaluate.report import render_report
    from kftune.train.loop import TRAIN_LOG_FILE

    run_config = _config(config)
    evaluation = run_evaluation(run_config, prompts_dir, model_dir)
    Path(evaluation_dir).mkdir(parents=True, exist_ok=True)
    (Path(evaluation_dir) / EVALUATION_FILE).write_text(json.dumps(evaluation, indent=2))
    train_log = json.loads((Path(model_dir) / TRAIN_LOG_FILE).read_text())
    Path(report_path).write_text(render_report(run_config.registry.model_name, evaluation, train_log, run_config.eval.metrics), encoding="utf-8")
    flat = {f"{kind}_{m}": evaluation[kind][m] for kind in ("tuned", "base") if kind in evaluation for m in run_config.eval.metrics}
    if "forgetting" in evaluation:
        flat[f"forgetting_{evaluation['forgetting']['metric']}"] = evaluation["forgetting"]["tuned"]
    return flat


def register(
    config: dict[str, Any], dataset_dir: str, model_dir: str, evaluation_dir: str, report_path: str, pipeline_run_id: str
) -> dict[str, Any]:
    """Registers the model; returns the summary a user sees at the end of a run."""
    from kftune.registry.mlflow_registry import register_model
    from kftune.train.loop import TRAIN_LOG_FILE

    run_config = _config(config)
    evaluation = json.loads((Path(evaluation_dir) / EVALUATION_FILE).read_text())
    train_log = json.loads((Path(model_dir) / TRAIN_LOG_FILE).read_text())
    card_path = Path(dataset_dir) / "data_card.json"
    report = Path(tempfile.mkdtemp()) / "evaluation_report.html"
    report.write_bytes(Path(report_path).read_bytes())
    lineage = {
        "kftune.base_model": run_config.model.name_or_path,
        "kftune.method": run_config.method.name,
        "kftune.dataset_sha256": json.loads(card_path.read_text())["dataset_sha256"],
        "kftune.config_sha256": run_config.fingerprint(),
        "kftune.pipeline_run_id": pipeline_run_id,
        "kftune.version": __version__,
        "kftune.run_name": f"{run_config.registry.model_name}-{pipeline_run_id}",
    }
    registered = register_model(run_config, model_dir, evaluation, train_log, [report, card_path], lineage, dataset_dir)
    return {"registered": registered, "evaluation": evaluation, "train": {k: v for k, v in train_log.items() if k != "history"}}
