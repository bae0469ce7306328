"""The register step and promotion: an MLflow run with params, metrics, artifacts and lineage; the
tuned model logged as a pyfunc and registered as a new version with alias `challenger`; the gate
that moves `champion`; and hand promotion / rollback with an audit trail on the versions.
"""

from __future__ import annotations

import os
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kftune.config import RunConfig, config_to_dict
from kftune.errors import KftuneError
from kftune.evaluate.metrics import HIGHER_IS_BETTER
from kftune.retention.forgetting import forgetting_refusal

CHALLENGER, CHAMPION = "challenger", "champion"
GATE_METRIC_TAG = "kftune.gate_metric"
SPLIT_TAG = "kftune.eval_split_sha256"
RUN_ID_TAG = "kftune.pipeline_run_id"
DATASET_TAG = "kftune.dataset_sha256"
CONFIG_TAG = "kftune.config_sha256"
PROMOTED_FROM_TAG = "kftune.promoted_from"
PROMOTED_AT_TAG = "kftune.promoted_at"
KFTUNE_CHAMPION_TAG = "kftune.champion"
"""On the registered model: the version kftune last pointed `champion` at. MLflow keeps no history of
aliases, so this is how rollback tells an alias moved by hand (MLflow UI, API) from its own moves."""


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def connect(tracking_uri: str | None, retries: int = 5, backoff_seconds: int = 1):
    """An MlflowClient whose HTTP calls retry with exponential backoff (MLflow's own retry policy)."""
    import mlflow
    from mlflow import MlflowClient

    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(retries)
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = str(backoff_seconds)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    return MlflowClient()


def _registry_error(exc: Exception, keep: str) -> KftuneError:
    import mlflow

    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:400]
    return KftuneError(f"MLflow at {mlflow.get_tracking_uri()}: {first_line}; {keep}")


def register_model(
    config: RunConfig,
    model_dir: str | Path,
    evaluation: dict[str, Any],
    train_log: dict[str, Any],
    attachments: list[str | Path],
    lineage: dict[str, str],
    dataset_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Log the run and the pyfunc model, register a version, apply the gate; idempotent per pipeline run.
    `dataset_dir` (the prepared data) gives the version its input example."""
    from mlflow.exceptions import MlflowException

    registry = config.registry
    gate = registry.gate
    if gate.metric not in evaluation["tuned"]:
        raise KftuneError(
            f"registry.gate.metric: the evaluation produced no {gate.metric!r} (it has: {', '.join(sorted(evaluation['tuned']))})"
        )
    client = connect(registry.tracking_uri, registry.retries, registry.backoff_seconds)
    keep = f"the trained model is kept at {model_dir}"
    try:
        existing = _version_for_pipeline_run(client, registry.model_name, lineage[RUN_ID_TAG])
        if existing is not None:  # a retried register step: report what the first attempt did
            return _summary(
                client,
                registry.model_name,
                existing,
                promoted=None,
                gate=existing.tags.get("kftune.gate", ""),
                reused=True,
            )
        alike = None if registry.allow_duplicate else _version_trained_alike(client, registry.model_name, lineage)
        if alike is not None:  # e.g. a scheduled retraining whose data did not change
            return _summary(
                client,
                registry.model_name,
                alike,
                promoted=None,
                gate=f"not registered: version {alike.version} was trained on the same data with the same config "
                "(set registry.allow_duplicate: true to register another)",
                reused=True,
            )
        model_uri = _log_run(config, model_dir, evaluation, train_log, attachments, lineage, dataset_dir)
        version = _create_version(
            registry.model_name,
            model_uri,
            {
                **lineage,
                GATE_METRIC_TAG: f"{gate.metric}={evaluation['tuned'][gate.metric]}",
                SPLIT_TAG: evaluation.get("split_sha256", ""),
            },
        )
        _set_alias(client, registry.model_name, CHALLENGER, version.version)
        promoted, reason = _gate(
            client,
            registry.model_name,
            gate.metric,
            gate.margin,
            evaluation["tuned"][gate.metric],
            evaluation.get("split_sha256", ""),
        )
        refusal = forgetting_refusal(gate.max_forgetting, evaluation)  # better at the task, but forgot too much
        if refusal:
            promoted, reason = False, refusal
        if promoted:
            _move_champion(client, registry.model_name, version.version, f"gate: {reason}")
        client.set_model_version_tag(registry.model_name, version.version, "kftune.gate", reason)
        return _summary(client, registry.model_name, version, promoted, reason, reused=False)
    except (MlflowException, OSError) as exc:  # after MLflow's own retries with backoff
        raise _registry_error(exc, keep) from None


def _version_for_pipeline_run(client, name: str, pipeline_run_id: str):
    found = client.search_model_versions(f"name = '{name}' and tags.`{RUN_ID_TAG}` = '{pipeline_run_id}'")
    return found[0] if found else None


def _version_trained_alike(client, name: str, lineage: dict[str, str]):
    """A version trained on the same prepared data (its content hash) with the same config, if the lineage says."""
    if not (lineage.get(DATASET_TAG) and lineage.get(CONFIG_TAG)):
        return None
    found = client.search_model_versions(
        f"name = '{name}' and tags.`{DATASET_TAG}` = '{lineage[DATASET_TAG]}' "
        f"and tags.`{CONFIG_TAG}` = '{lineage[CONFIG_TAG]}'"
    )
    return min(found, key=lambda v: int(v.version)) if found else None


def _log_run(config: RunConfig, model_dir, evaluation, train_log, attachments, lineage, dataset_dir) -> str:
    """The MLflow run (params, the data as its input, train metrics, lineage tags, attachments) and the
    logged model, which the evaluation metrics are linked to; returns the model's URI."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from kftune.prompts.templates import resolve_template, write_template
    from kftune.registry.packaging import log_served_model, training_dataset
    from kftune.registry.pyfunc_model import MODEL_ARTIFACT, TEMPLATE_ARTIFACT

    with mlflow.start_run(experiment_id=experiment_id(config), run_name=lineage.get("kftune.run_name")):
        params = config_to_dict(config)
        params["prompt"]["template"] = resolve_template(config.prompt.template).name  # its contents: the model's file
        mlflow.log_params(_flatten(params))
        dataset = None
        if lineage.get(DATASET_TAG):
            dataset = training_dataset(config, lineage[DATASET_TAG])
            mlflow.log_input(dataset, context="training", tags={DATASET_TAG: lineage[DATASET_TAG]})
        mlflow.log_metrics(
            {k: train_log[k] for k in ("final_loss", "seconds", "seconds_per_step", "trainable_parameters")}
        )
        now = int(time.time() * 1000)
        per_step = [
            Metric(f"train_{key}", value, now, record["step"])
            for record in train_log["history"]
            for key, value in record.items()
            if key != "step"
        ]
        MlflowClient().log_batch(mlflow.active_run().info.run_id, metrics=per_step)  # one request, not one per point
        mlflow.set_tags(lineage)
        for path in attachments:
            mlflow.log_artifact(str(path))
        with tempfile.TemporaryDirectory() as scratch:
            template = write_template(resolve_template(config.prompt.template), Path(scratch) / "template.yaml")
            info = log_served_model(
                config, {MODEL_ARTIFACT: str(model_dir), TEMPLATE_ARTIFACT: str(template)}, dataset_dir
            )
        for kind in ("tuned", "base"):  # the tuned metrics describe the logged model; base ones the run's baseline
            if kind in evaluation:
                values = {f"{kind}_{m}": v for m, v in evaluation[kind].items() if isinstance(v, (int, float))}
                mlflow.log_metrics(values, model_id=info.model_id if kind == "tuned" else None, dataset=dataset)
        if "forgetting" in evaluation:
            mlflow.log_metric("forgetting_score", evaluation["forgetting"]["score"], model_id=info.model_id)
    return info.model_uri


def experiment_id(config: RunConfig) -> str:
    """The experiment's id, created on first use (a concurrent creator may win the race: then reuse theirs)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    experiment = client.get_experiment_by_name(config.registry.experiment)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(config.registry.experiment, artifact_location=config.registry.artifact_location)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(config.registry.experiment).experiment_id


def _create_version(name: str, model_uri: str, tags: dict[str, str]):
    import mlflow

    return mlflow.register_model(model_uri, name, tags=tags)


def _gate(client, name: str, metric: str, margin: float, value: float, split_sha256: str) -> tuple[bool, str]:
    """Promote when the new version beats the champion's gate metric by `margin` on the same split."""
    champion = _champion_or_none(client, name)
    if champion is None:
        return True, f"first version: no champion yet ({metric}={value:.4f})"
    recorded = champion.tags.get(GATE_METRIC_TAG, "")
    champion_metric, _, champion_value = recorded.partition("=")
    if champion_metric != metric:
        return False, f"champion v{champion.version} has no {metric} recorded ({recorded!r}); promote by hand"
    if champion.tags.get(SPLIT_TAG, "") != split_sha256:
        return (
            False,
            f"champion v{champion.version} was evaluated on a different test split; compare by hand, then `kftune promote`",
        )
    champion_value = float(champion_value)
    passed = value > champion_value + margin if HIGHER_IS_BETTER.get(metric, True) else value < champion_value - margin
    verdict = "promoted" if passed else "kept champion"
    return (
        passed,
        f"{verdict}: {metric} {value:.4f} vs champion v{champion.version} {champion_value:.4f} (margin {margin})",
    )


def _set_racing(set_value, attempts: int = 5) -> None:
    """`set_value()`: setting a registered model's alias or tag. MLflow's SQL store looks the key up, then
    inserts it: two registrations at once can both insert, and the loser gets a UNIQUE-constraint error; by
    then the row exists, so setting it again updates it."""
    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            set_value()
            return
        except MlflowException as exc:
            message = str(exc).lower()
            lost_the_race = "unique constraint" in message or "duplicate entry" in message  # sqlite and postgres; mysql
            if not lost_the_race or attempt == attempts - 1:
                raise
            time.sleep(0.1 * (attempt + 1))


def _set_alias(client, name: str, alias: str, version: str) -> None:
    _set_racing(lambda: client.set_registered_model_alias(name, alias, version))


def _champion_or_none(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def _move_champion(client, name: str, version: str, reason: str) -> str | None:
    """Point `champion` at `version`, recording when, from which version and why on that version."""
    previous = _champion_or_none(client, name)
    _point_champion(client, name, str(version))
    audit = {
        PROMOTED_FROM_TAG: str(previous.version) if previous else "",
        PROMOTED_AT_TAG: datetime.now(UTC).isoformat(timespec="seconds"),
        "kftune.promoted_why": reason,
    }
    for key, value in audit.items():
        client.set_model_version_tag(name, str(version), key, value)
    return str(previous.version) if previous else None


def _summary(client, name: str, version, promoted: bool | None, gate: str, reused: bool) -> dict[str, Any]:
    import mlflow

    current = client.get_model_version(name, str(version.version))
    return {
        "tracking_uri": mlflow.get_tracking_uri(),
        "model_name": name,
        "version": int(current.version),
        "run_id": current.run_id,
        "aliases": sorted(current.aliases),
        "promoted": CHAMPION in current.aliases if promoted is None else promoted,
        "gate": gate,
        "reused": reused,
    }


def promote(tracking_uri: str | None, name: str, version: str, reason: str) -> str:
    """Hand promotion: `champion` -> `version` of model `name`."""
    client = connect(tracking_uri)
    if not _version_exists(client, name, str(version)):
        raise KftuneError(f"model {name!r} has no version {version!r}; versions: {_versions(client, name)}")
    previous = _move_champion(client, name, str(version), f"by hand: {reason}")
    return f"{name}: champion v{previous or '-'} -> v{version}"


def _point_champion(client, name: str, version: str) -> None:
    _set_alias(client, name, CHAMPION, version)
    _set_racing(lambda: client.set_registered_model_tag(name, KFTUNE_CHAMPION_TAG, version))


def rollback(tracking_uri: str | None, name: str, reason: str) -> str:
    """Move `champion` back to the version it replaced: the one recorded when kftune promoted it, or,
    when the alias was moved outside kftune since, the champion kftune last set."""
    client = connect(tracking_uri)
    champion = _champion_or_none(client, name)
    last_set = _registered_model_tag(client, name, KFTUNE_CHAMPION_TAG)
    if champion is None:
        if last_set:
            raise KftuneError(
                f"model {name!r} has no alias {CHAMPION!r}: it was removed outside kftune, which last set it to "
                f"v{last_set}; `kftune promote {name} {last_set}` restores that one"
            )
        raise KftuneError(
            f"model {name!r} has no alias {CHAMPION!r} to roll back (versions: {_versions(client, name)})"
        )
    note = ""
    if last_set and last_set != str(champion.version):
        previous = last_set
        note = (
            f"; v{champion.version} had been made champion outside kftune, which records no alias history, "
            f"so v{previous} is the last champion known (any version set by hand in between is not)"
        )
    elif champion.tags.get(PROMOTED_AT_TAG):
        previous = champion.tags.get(PROMOTED_FROM_TAG)
        if not previous:
            raise KftuneError(f"{name} v{champion.version} was the first champion; there is nothing to roll back to")
    else:
        raise KftuneError(
            f"{name} v{champion.version} was made champion outside kftune and kftune recorded no champion "
            f"before it, so the registry cannot say which version that was; choose one with "
            f"`kftune promote {name} VERSION` (versions: {_versions(client, name)})"
        )
    if not _version_exists(client, name, previous):
        raise KftuneError(
            f"{name}: the champion before v{champion.version} was v{previous}, which no longer exists "
            f"(versions: {_versions(client, name)}); choose one with `kftune promote {name} VERSION`"
        )
    _point_champion(client, name, previous)
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    client.set_model_version_tag(name, champion.version, "kftune.rolled_back_at", stamp)
    client.set_model_version_tag(name, champion.version, "kftune.rolled_back_why", reason)
    return f"{name}: champion v{champion.version} -> v{previous} (rollback){note}"


def _registered_model_tag(client, name: str, key: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name).tags.get(key)
    except MlflowException:
        return None


def _version_exists(client, name: str, version: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_model_version(name, version)
        return True
    except MlflowException:
        return False


def _versions(client, name: str) -> str:
    from mlflow.exceptions import MlflowException

    try:
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
    except MlflowException:
        versions = []
    return ", ".join(map(str, versions)) or "none (is the model name right?)"
