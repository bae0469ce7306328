"""The five pipeline steps as plain functions of a config dict and artifact paths.

Each KFP component in `components/` is a thin typed wrapper that calls one of these; tests call
them directly. A step returns the metadata its component attaches to its output artifact.
"""

from __future__ import annotations

import functools
import json
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kftune import __version__
from kftune.config import RunConfig, parse_config

EVALUATION_FILE = "evaluation.json"
ROOT_CAUSE_PREFIX = "kftune: step failed: "
"""Starts the line a failing step prints before its traceback: the exception at the bottom of the chain
(a Ray worker's own, not the TrainingFailedError around it), for `kftune run` to show first."""
ROOT_CAUSE_CHARS = 1000
NO_SWEEP_REPORT = "<p>This run trained one configuration: its config has no <code>sweep</code> section.</p>\n"


def root_cause(exc: BaseException) -> BaseException:
    """The exception that started it: through explicit causes, Ray Train's worker and controller
    failures, and Ray's task errors (`.cause`) down to the first one."""
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        workers = getattr(exc, "worker_failures", None)
        inner = (
            (workers[min(workers)] if workers else None)
            or getattr(exc, "controller_failure", None)
            or getattr(exc, "cause", None)
        )
        if not isinstance(inner, BaseException):
            inner = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
        if inner is None:
            break
        exc = inner
    return exc


def reports_root_cause(step: Callable) -> Callable:
    """Print the root cause of a step's failure on one line (ROOT_CAUSE_PREFIX) before it propagates."""

    @functools.wraps(step)
    def run(*args, **kwargs):
        try:
            return step(*args, **kwargs)
        except Exception as exc:
            cause = root_cause(exc)
            message = " ".join(str(cause).split())[:ROOT_CAUSE_CHARS]
            print(f"{ROOT_CAUSE_PREFIX}{type(cause).__name__}: {message}", flush=True)
            raise

    return run


def _config(config: dict[str, Any]) -> RunConfig:
    return parse_config(config, source="pipeline parameter config")


@reports_root_cause
def resolve_config(config: dict[str, Any], compiled_form: dict[str, Any], form: dict[str, Any]) -> dict[str, Any]:
    """The run's config: the `config` struct with the run-form values that differ from their compiled defaults
    (`compiled_form`; empty: the config's own values, as in a local run) written in, validated."""
    from kftune.config import config_to_dict
    from kftune.kube.run_form import apply_run_form, run_form_arguments

    merged = apply_run_form(config, compiled_form or run_form_arguments(config), form)
    return config_to_dict(parse_config(merged, source="pipeline parameters config and the run form"))


@reports_root_cause
def fingerprint_data(config: dict[str, Any]) -> str:
    """The data files' fingerprint; for data without one, a value never seen before, so prepare_data is never served from cache."""
    from kftune.data.fingerprint import data_fingerprint

    return data_fingerprint(_config(config)) or f"unfingerprinted-{uuid.uuid4().hex}"


@reports_root_cause
def prepare_data(
    config: dict[str, Any], dataset_dir: str, card_path: str, data_fingerprint: str = ""
) -> dict[str, Any]:
    """`data_fingerprint` (the source files', see `kftune.data.fingerprint`) goes into the data card and on to the registered version."""
    from kftune.data.prepare import data_card_markdown, prepare, write_prepared

    run_config = _config(config)
    card = write_prepared(prepare(run_config), dataset_dir, source_fingerprint=data_fingerprint)
    Path(card_path).write_text(data_card_markdown(card), encoding="utf-8")
    return {
        "source": run_config.data.path,
        "dataset_sha256": card["dataset_sha256"],
        "data_fingerprint": data_fingerprint,
        **{f"{k}_rows": v["rows"] for k, v in card["splits"].items()},
    }


@reports_root_cause
def build_prompts(config: dict[str, Any], dataset_dir: str, prompts_dir: str, preview_path: str) -> dict[str, Any]:
    from kftune.prompts.build import build_prompts as build, preview_html

    meta = build(_config(config), dataset_dir, prompts_dir)
    Path(preview_path).write_text(preview_html(meta), encoding="utf-8")
    return {"template": meta["template"], **{f"{k}_rows": v.get("rows", 0) for k, v in meta["splits"].items()}}


@reports_root_cause
def train(
    config: dict[str, Any], prompts_dir: str, model_dir: str, run_name: str, sweep_report_path: str = ""
) -> dict[str, Any]:
    """With a `sweep` section the step runs the sweep and hands on its best trial's model (`kftune.sweep.step`);
    `sweep_report_path` gets the sweep's report (a line saying there was none, without one)."""
    from kftune.sweep.step import SWEEP_KEY, sweep_folder, train_by_sweep

    run_config = _config(config)
    if run_config.cluster.rayjob.enabled:  # on Kubernetes: a KubeRay RayJob trains on GPU nodes; this pod follows it
        from kftune.kube.rayjob import train_on_rayjob

        log = train_on_rayjob(run_config, prompts_dir, model_dir, run_name, sweep_report_path)
    else:
        from kftune.train.launch import run_training

        with tempfile.TemporaryDirectory(
            prefix="kftune-ray-"
        ) as scratch:  # checkpoints, unless train.checkpoint.storage keeps them
            if run_config.sweep:
                folder = sweep_folder(run_config, prompts_dir, scratch)
                log = train_by_sweep(run_config, prompts_dir, model_dir, folder, sweep_report_path)
            else:
                log = run_training(run_config, prompts_dir, model_dir, scratch)
    if sweep_report_path and not run_config.sweep:
        Path(sweep_report_path).write_text(NO_SWEEP_REPORT, encoding="utf-8")
    return {
        "base_model": run_config.model.name_or_path,
        **{k: log[k] for k in ("steps", "seconds", "seconds_per_step", "trainable_parameters", "final_loss")},
        **({"sweep_parent_run_id": log[SWEEP_KEY]["parent_run_id"]} if SWEEP_KEY in log else {}),
    }


@reports_root_cause
def evaluate(
    config: dict[str, Any], prompts_dir: str, model_dir: str, evaluation_dir: str, report_path: str
) -> dict[str, float]:
    """Writes evaluation.json and the HTML report; returns the flat metrics for the KFP Metrics artifact."""
    from kftune.evaluate.evaluate import evaluate as run_evaluation
    from kftune.evaluate.report import render_report
    from kftune.train.loop import TRAIN_LOG_FILE

    run_config = _config(config)
    evaluation = run_evaluation(run_config, prompts_dir, model_dir)
    Path(evaluation_dir).mkdir(parents=True, exist_ok=True)
    (Path(evaluation_dir) / EVALUATION_FILE).write_text(json.dumps(evaluation, indent=2))
    train_log = json.loads((Path(model_dir) / TRAIN_LOG_FILE).read_text())
    Path(report_path).write_text(
        render_report(run_config.registry.model_name, evaluation, train_log, run_config.eval.metrics), encoding="utf-8"
    )
    flat = {
        f"{kind}_{m}": evaluation[kind][m]
        for kind in ("tuned", "base")
        if kind in evaluation
        for m in run_config.eval.metrics
    }
    if "forgetting" in evaluation:
        flat[f"forgetting_{evaluation['forgetting']['metric']}"] = evaluation["forgetting"]["tuned"]
        flat["forgetting_score"] = evaluation["forgetting"]["score"]
    return flat


def tuned_confusion_matrix(evaluation_dir: str) -> tuple[list[str], list[list[int]]] | None:
    """(label names, rows = true label, columns = predicted) of the tuned model, for KFP's ClassificationMetrics; None without labels."""
    evaluation = json.loads((Path(evaluation_dir) / EVALUATION_FILE).read_text())
    matrix = evaluation.get("tuned", {}).get("confusion_matrix")
    return (evaluation["label_names"], matrix) if matrix else None


@reports_root_cause
def register(
    config: dict[str, Any],
    dataset_dir: str,
    model_dir: str,
    evaluation_dir: str,
    report_path: str,
    pipeline_run_id: str,
) -> dict[str, Any]:
    """Registers the model; returns the summary a user sees at the end of a run."""
    from kftune.registry.mlflow_registry import CONFIG_TAG, DATASET_TAG, register_model
    from kftune.sweep.step import SWEEP_KEY, SWEEP_PARENT_TAG
    from kftune.train.loop import TRAIN_LOG_FILE

    run_config = _config(config)
    evaluation = json.loads((Path(evaluation_dir) / EVALUATION_FILE).read_text())
    train_log = json.loads((Path(model_dir) / TRAIN_LOG_FILE).read_text())
    card_path = Path(dataset_dir) / "data_card.json"
    card = json.loads(card_path.read_text())
    report = Path(tempfile.mkdtemp()) / "evaluation_report.html"
    report.write_bytes(Path(report_path).read_bytes())
    lineage = {
        "kftune.base_model": run_config.model.name_or_path,
        "kftune.method": run_config.method.name,
        DATASET_TAG: card["dataset_sha256"],
        "kftune.data_fingerprint": card["source_fingerprint"],
        CONFIG_TAG: run_config.fingerprint(),
        "kftune.pipeline_run_id": pipeline_run_id,
        "kftune.version": __version__,
        "kftune.run_name": f"{run_config.registry.model_name}-{pipeline_run_id}",
    }
    if SWEEP_KEY in train_log:  # the model is a sweep's best trial: link the sweep's parent MLflow run
        lineage[SWEEP_PARENT_TAG] = train_log[SWEEP_KEY]["parent_run_id"]
    registered = register_model(run_config, model_dir, evaluation, train_log, [report, card_path], lineage, dataset_dir)
    return {
        "registered": registered,
        "evaluation": evaluation,
        "train": {k: v for k, v in train_log.items() if k != "history"},
    }
