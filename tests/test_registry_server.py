"""Registration, the gate, promotion and rollback against a real MLflow tracking server process
on 127.0.0.1, and serving the champion through `mlflow.pyfunc.load_model`."""

import json
import sys
import threading
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from conftest import TRAIN_LOG, free_port, serve_until
from kftune.cli import main
from kftune.config import parse_config
from kftune.errors import KftuneError
from kftune.registry.mlflow_registry import promote, register_model, rollback


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    command = [
        str(Path(sys.executable).with_name("mlflow")),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{folder / 'mlflow.db'}",
        "--artifacts-destination",
        str(folder / "artifacts"),
        "--workers",
        "1",
    ]
    uri = f"http://127.0.0.1:{port}"
    with serve_until(command, f"{uri}/health", folder / "server.log"):
        yield uri
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A real kftune Model folder: MiniLM + an (untrained) LoRA adapter, as the train step writes it."""
    from kftune.methods import apply_method
    from kftune.models import LABELS_FILE, TUNED_CONFIG_FILE, load_base_model, load_tokenizer, resolve_model_path

    folder = tmp_path_factory.mktemp("model")
    config = parse_config({"data": {"path": "x"}, "method": {"name": "lora", "r": 2}, "registry": {"model_name": "m"}})
    path = resolve_model_path("minilm-l6")
    model = apply_method(
        load_base_model(path, "sequence_classification", 2, 0), config.method, "sequence_classification"
    )
    model.save_pretrained(str(folder))
    load_tokenizer(path).save_pretrained(str(folder))
    resolved = json.loads(config.model_dump_json(exclude_none=True))
    resolved["model"]["num_labels"] = 2
    (folder / TUNED_CONFIG_FILE).write_text(json.dumps(resolved))
    (folder / LABELS_FILE).write_text(json.dumps(["negative", "positive"]))
    return folder


def config_for(server, name, **gate):
    return parse_config(
        {
            "data": {"path": "x"},
            "method": {"name": "lora"},
            "eval": {"metrics": ["accuracy", "macro_f1"]},
            "registry": {
                "model_name": name,
                "tracking_uri": server,
                "gate": {"metric": "accuracy", **gate},
                "retries": 1,
                "backoff_seconds": 0,
            },
        }
    )


def register(config, model_dir, accuracy, run_id, split="split-a"):
    evaluation = {
        "split_sha256": split,
        "tuned": {"accuracy": accuracy, "macro_f1": accuracy},
        "base": {"accuracy": 0.5, "macro_f1": 0.5},
    }
    return register_model(
        config, model_dir, evaluation, TRAIN_LOG, [], {"kftune.pipeline_run_id": run_id, "kftune.run_name": run_id}
    )


def test_register_gate_promote_rollback_and_serve(server, model_dir):
    config = config_for(server, "sentiment", margin=0.01)
    client = MlflowClient(server)
    first = register(config, model_dir, 0.80, "run-1")
    assert (first["version"], first["promoted"], first["aliases"]) == (1, True, ["challenger", "champion"])
    refused = register(config, model_dir, 0.805, "run-2")
    assert (refused["version"], refused["promoted"]) == (2, False) and "kept champion" in refused["gate"]
    other_split = register(config, model_dir, 0.99, "run-3", split="split-b")
    assert not other_split["promoted"] and "different test split" in other_split["gate"]
    better = register(config, model_dir, 0.90, "run-4")
    assert better["promoted"] and str(client.get_model_version_by_alias("sentiment", "champion").version) == "4"
    assert client.get_model_version("sentiment", "4").tags["kftune.promoted_from"] == "1"

    # A retried register step of the same pipeline run creates no second version.
    again = register(config, model_dir, 0.90, "run-4")
    assert again["reused"] and again["version"] == 4
    assert len(client.search_model_versions("name = 'sentiment'")) == 4

    assert "v4 -> v2" in promote(server, "sentiment", "2", "hotfix")
    assert client.get_model_version("sentiment", "2").tags["kftune.promoted_why"] == "by hand: hotfix"
    assert "v2 -> v4 (rollback)" in rollback(server, "sentiment", "hotfix was worse")
    assert str(client.get_model_version_by_alias("sentiment", "champion").version) == "4"
    assert client.get_model_version("sentiment", "2").tags["kftune.rolled_back_why"] == "hotfix was worse"

    served = mlflow.pyfunc.load_model("models:/sentiment@champion")
    predictions = served.predict(pd.DataFrame({"text": ["a wonderful film", "dull and lifeless"]}))
    assert list(predictions.columns) == ["label", "score"] and set(predictions["label"]) <= {"negative", "positive"}
    assert predictions["score"].between(0.5, 1.0).all()


def test_two_registrations_at_once_get_distinct_versions(server, model_dir):
    config = config_for(server, "parallel")
    results, errors = [], []

    def worker(run_id):
        try:
            results.append(register(config, model_dir, 0.7, run_id))
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(f"p-{i}",)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert sorted(r["version"] for r in results) == [1, 2]


def test_bad_names_and_a_server_that_is_down(server, model_dir, capsys):
    config = config_for(server, "names")
    register(config, model_dir, 0.7, "n-1")
    with pytest.raises(KftuneError, match="model 'names' has no version '7'; versions: 1"):
        promote(server, "names", "7", "typo")
    with pytest.raises(KftuneError, match="was the first champion"):
        rollback(server, "names", "nothing before")
    with pytest.raises(KftuneError, match="has no alias 'champion'"):
        rollback(server, "never-registered", "no such model")
    assert main(["promote", "names", "3", "--tracking-uri", server]) == 2
    assert "has no version '3'" in capsys.readouterr().err
    with pytest.raises(KftuneError, match=r"registry.gate.metric: the evaluation produced no 'accuracy'"):
        register_model(
            config, model_dir, {"tuned": {"perplexity": 3.0}}, TRAIN_LOG, [], {"kftune.pipeline_run_id": "x"}
        )

    down = config_for(f"http://127.0.0.1:{free_port()}", "names")
    started = time.time()
    with pytest.raises(
        KftuneError, match=f"MLflow at {down.registry.tracking_uri}: .*the trained model is kept at {model_dir}"
    ):
        register(down, model_dir, 0.9, "n-2")
    assert time.time() - started < 60
    assert (model_dir / "adapter_model.safetensors").is_file()
