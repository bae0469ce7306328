"""The promotion gate against a real MLflow store (sqlite)."""

import json

import mlflow
import pytest
from mlflow import MlflowClient

from kftune.config import parse_config
from kftune.registry.mlflow_registry import register_model

TRAIN_LOG = {"final_loss": 0.5, "seconds": 1.0, "seconds_per_step": 0.1, "trainable_parameters": 10, "history": [{"step": 10, "loss": 0.7, "lr": 0.001, "tokens_per_second": 900.0}, {"step": 20, "loss": 0.5, "lr": 0.0005, "tokens_per_second": 950.0}]}


@pytest.fixture
def model_dir(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4}))
    return folder


def register(config, model_dir, value, metric="accuracy"):
    evaluation = {"tuned": {metric: value}, "base": {metric: 0.5}}
    return register_model(config, model_dir, evaluation, TRAIN_LOG, [], {"kftune.pipeline_run_id": str(value)})


def test_versions_aliases_and_gate(make_config, model_dir):
    config = parse_config(make_config(eval={"metrics": ["accuracy"]}, registry={"gate": {"metric": "accuracy", "margin": 0.01}}))
    first = register(config, model_dir, 0.80)
    assert (first["version"], first["promoted"], first["aliases"]) == (1, True, ["challenger", "champion"])
    worse = register(config, model_dir, 0.805)  # better, but not by the margin
    assert (worse["version"], worse["promoted"]) == (2, False)
    assert "kept champion" in worse["gate"]
    better = register(config, model_dir, 0.83)
    assert (better["version"], better["promoted"]) == (3, True)

    client = MlflowClient(config.registry.tracking_uri)
    assert str(client.get_model_version_by_alias("tiny", "champion").version) == "3"
    assert str(client.get_model_version_by_alias("tiny", "challenger").version) == "3"
    version = client.get_model_version("tiny", "2")
    assert version.tags["kftune.pipeline_run_id"] == "0.805" and "kept champion" in version.tags["kftune.gate"]
    run = client.get_run(version.run_id)
    assert run.data.metrics["tuned_accuracy"] == 0.805 and run.data.params["method.r"] == "4"
    loss = client.get_metric_history(run.info.run_id, "train_loss")  # the train log's history, at its real steps
    assert [(m.step, m.value) for m in loss] == [(10, 0.7), (20, 0.5)]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "train_tokens_per_second")] == [900.0, 950.0]
    files = {f.path for f in client.list_artifacts(run.info.run_id, "model")}
    assert {"model/MLmodel", "model/artifacts"} <= files  # logged as a pyfunc that wraps the Model folder


def test_lower_is_better_for_perplexity(make_config, model_dir):
    config = parse_config(make_config(
        model={"task": "causal_lm", "name_or_path": "x"}, prompt={"template": "text"},
        data={"columns": {}}, eval={"metrics": ["perplexity"]}, registry={"gate": {"metric": "perplexity"}},
    ))
    assert register(config, model_dir, 20.0, "perplexity")["promoted"]
    assert not register(config, model_dir, 25.0, "perplexity")["promoted"]
    assert register(config, model_dir, 15.0, "perplexity")["promoted"]
    mlflow.set_tracking_uri(None)


def test_a_registration_that_loses_the_alias_race_sets_it_again(make_config, model_dir, monkeypatch):
    """Two registrations at once: MLflow's store can answer the second alias insert with a UNIQUE-constraint
    error (seen under load in test_registry_server.py); the alias is then set again and points at the new version."""
    from mlflow.exceptions import MlflowException

    config = parse_config(make_config(eval={"metrics": ["accuracy"]}, registry={"gate": {"metric": "accuracy"}}))
    register(config, model_dir, 0.80)
    real, calls = MlflowClient.set_registered_model_alias, []

    def lose_the_race_once(self, name, alias, version):
        calls.append((alias, version))
        if len(calls) == 1:
            raise MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: registered_model_aliases.name, registered_model_aliases.alias")
        return real(self, name, alias, version)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", lose_the_race_once)
    second = register(config, model_dir, 0.70)
    assert [(alias, str(version)) for alias, version in calls[:2]] == [("challenger", "2")] * 2
    assert second["aliases"] == ["challenger"] and not second["promoted"]
