"""The register step: an MLflow run with params, metrics, artifacts and lineage; a registered model
version with alias `challenger`; and the promotion gate that moves `champion`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kftune.config import RunConfig, config_to_dict
from kftune.evaluate.metrics import HIGHER_IS_BETTER

CHALLENGER, CHAMPION = "challenger", "champion"
GATE_METRIC_TAG = "kftune.gate_metric"


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _experiment_id(client, name: str, artifact_location: str | None) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location)


def register_model(
    config: RunConfig,
    model_dir: str | Path,
    evaluation: dict[str, Any],
    train_log: dict[str, Any],
    attachments: list[str | Path],
    lineage: dict[str, str],
) -> dict[str, Any]:
    """Log the run, create the model version, apply the gate. Returns what was registered and decided."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if config.registry.tracking_uri:
        mlflow.set_tracking_uri(config.registry.tracking_uri)
    client = MlflowClient()
    experiment_id = _experiment_id(client, config.registry.experiment, config.registry.artifact_location)
    metric_names = config.eval.metrics
    with mlflow.start_run(experiment_id=experiment_id, run_name=lineage.get("kftune.run_name")) as run:
        mlflow.log_params(_flatten(config_to_dict(config)))
        for model_kind in ("tuned", "base"):
            if model_kind in evaluation:
                mlflow.log_metrics({f"{model_kind}_{m}": evaluation[model_kind][m] for m in metric_names})
        mlflow.log_metrics({k: train_log[k] for k in ("final_loss", "seconds", "seconds_per_step", "trainable_parameters")})
        for step, loss in enumerate(train_log["loss_curve"]):
            mlflow.log_metric("train_loss", loss, step=step)
        mlflow.set_tags(lineage)
        mlflow.log_artifacts(str(model_dir), artifact_path="model")
        for path in attachments:
            mlflow.log_artifact(str(path))
        source = f"{run.info.artifact_uri}/model"

    name = config.registry.model_name
    try:
        client.create_registered_model(name, description="Fine-tuned with kftune")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    gate = config.registry.gate
    new_value = evaluation["tuned"][gate.metric]
    version = client.create_model_version(
        name, source=source, run_id=run.info.run_id, tags={**lineage, GATE_METRIC_TAG: f"{gate.metric}={new_value}"}
    )
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    promoted, reason = _gate(client, name, gate.metric, gate.margin, new_value)
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version.version)
    client.set_model_version_tag(name, version.version, "kftune.gate", reason)
    aliases = [CHALLENGER] + ([CHAMPION] if promoted else [])
    return {
        "tracking_uri": mlflow.get_tracking_uri(),
        "experiment": config.registry.experiment,
        "run_id": run.info.run_id,
        "model_name": name,
        "version": int(version.version),
        "aliases": aliases,
        "promoted": promoted,
        "gate": reason,
    }


def _gate(client, name: str, metric: str, margin: float, value: float) -> tuple[bool, str]:
    """Promote when the new version beats the champion's gate metric by `margin` (the first one always)."""
    from mlflow.exceptions import MlflowException

    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return True, f"first version: no champion yet ({metric}={value:.4f})"
    recorded = champion.tags.get(GATE_METRIC_TAG, "")
    champion_metric, _, champion_value = recorded.partition("=")
    if champion_metric != metric:
        return False, f"champion v{champion.version} has no {metric} recorded ({recorded!r}); promote by hand"
    champion_value = float(champion_value)
    if HIGHER_IS_BETTER.get(metric, True):
        passed = value > champion_value + margin
    else:
        passed = value < champion_value - margin
    verdict = "promoted" if passed else "kept champion"
    return passed, f"{verdict}: {metric} {value:.4f} vs champion v{champion.version} {champion_value:.4f} (margin {margin})"
