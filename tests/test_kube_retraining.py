"""Scheduled retraining retrains: two runs of the same config through kfp.local around a change of the data
file. The second must read the new rows and register a version carrying the new data fingerprint, which on
Kubeflow Pipelines is also what keys prepare_data's cache (tests/test_pipeline_compile.py checks the IR).
The second run also sets run-form parameters (as a run started from the Kubeflow UI would), which must
reach training; evaluate's Metrics and ClassificationMetrics, and the data source and base model the steps'
artifacts name for the lineage view, must be in kfp.local's executor output."""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from conftest import EXAMPLES
from kftune.config import parse_config
from kftune.data.fingerprint import data_fingerprint
from kftune.local import run_pipeline
from kftune.prompts.build import read_meta

NEW_ROWS = 16


@pytest.mark.slow
def test_a_run_after_the_data_changed_trains_on_the_new_rows(make_config, tiny_data, tmp_path):
    data = tmp_path / "train.tsv"
    data.write_text(tiny_data["train"].read_text())
    config = make_config(data={"path": str(data)})
    first_fingerprint = data_fingerprint(parse_config(config))
    run_pipeline(parse_config(config), tmp_path / "first")
    later_lines = (EXAMPLES / "data" / "sst2_train_16k.tsv").read_text().splitlines(keepends=True)[65 : 65 + NEW_ROWS]
    data.write_text(data.read_text() + "".join(later_lines))  # the same path, new rows: what a nightly export does
    run_pipeline(
        parse_config(config), tmp_path / "second", {"learning_rate": 0.0123, "gate_margin": -1.0}
    )  # the run form, as in the UI

    def outputs(run: str, task: str, artifact: str):
        return next((tmp_path / run).glob(f"pipeline/*/{task}/{artifact}"))

    cards = [
        json.loads((outputs(run, "prepare-data", "dataset") / "data_card.json").read_text())
        for run in ("first", "second")
    ]
    assert cards[1]["source_rows"] == cards[0]["source_rows"] + NEW_ROWS
    assert (cards[0]["source_fingerprint"], cards[1]["source_fingerprint"]) == (
        first_fingerprint,
        data_fingerprint(parse_config(config)),
    )
    assert cards[0]["source_fingerprint"] != cards[1]["source_fingerprint"]
    trained = [
        read_meta(outputs(run, "build-prompts", "prompts"))["splits"]["train"]["rows"] for run in ("first", "second")
    ]
    assert trained[1] > trained[0], f"the second run's train split must hold the new rows: {trained}"
    assert "source files: `sha256:" in outputs("second", "prepare-data", "data_card").read_text()
    executed = json.loads((outputs("second", "evaluate", "executor_output.json")).read_text())["artifacts"]
    matrix = executed["confusion"]["artifacts"][0]["metadata"]["confusionMatrix"]
    assert [category["displayName"] for category in matrix["annotationSpecs"]] == ["0", "1"]
    assert sum(sum(row["row"]) for row in matrix["rows"]) == 32, "the KFP UI's confusion matrix counts the 32 test rows"
    assert set(executed["metrics"]["artifacts"][0]["metadata"]) >= {"tuned_accuracy", "tuned_macro_f1"}
    prepared = json.loads(outputs("second", "prepare-data", "executor_output.json").read_text())["artifacts"]
    assert prepared["dataset"]["artifacts"][0]["metadata"]["source"] == str(data)  # lineage: where the rows came from
    trained = json.loads(outputs("second", "train", "executor_output.json").read_text())["artifacts"]
    assert trained["model"]["artifacts"][0]["metadata"]["base_model"] == config["model"]["name_or_path"]
    trained_with = [
        json.loads((outputs(run, "train", "model") / "kftune_config.json").read_text()) for run in ("first", "second")
    ]
    assert (trained_with[0]["train"]["lr"], trained_with[1]["train"]["lr"]) == (
        config["train"].get("lr", 1e-3),
        0.0123,
    ), "the form's value, not the config's"
    assert (
        trained_with[1]["registry"]["gate"]["margin"] == -1.0
        and trained_with[1]["train"]["max_steps"] == config["train"]["max_steps"]
    )
    client = MlflowClient(config["registry"]["tracking_uri"])
    versions = {str(v.version): v.tags["kftune.data_fingerprint"] for v in client.search_model_versions("name='tiny'")}
    assert versions == {"1": cards[0]["source_fingerprint"], "2": cards[1]["source_fingerprint"]}
