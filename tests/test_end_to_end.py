"""`kftune run` for real: kfp.local executes the DAG, Ray Train runs 2 workers, MLflow registers.
Then the registered adapter is downloaded from MLflow and must reproduce the predictions the
model made at the end of training."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from conftest import CLUSTER
from kftune.config import parse_config
from kftune.errors import KftuneError
from kftune.local import run_pipeline
from kftune.models import load_tuned_model
from kftune.prompts.build import read_meta, read_prompts
from kftune.train.loop import PROBE_FILE, PROBE_ROWS, probe_outputs

STEPS = ("prepare-data", "build-prompts", "train", "evaluate", "register")
PROGRESS_UPDATE = re.compile(r"^\s*[a-z]+(?: [a-z]+)? \[[#-]+\] ")


@pytest.mark.slow
def test_kftune_run_registers_a_reloadable_adapter(make_config, write_config, tmp_path):
    # The cluster section (GPUs, PVC, secrets, node selectors) must be a no-op for the local runner.
    config = make_config(train={"workers": 2, "batch_size": 16, "max_steps": 4, "lr": 5e-3}, cluster=CLUSTER)
    del config["registry"]["tracking_uri"], config["registry"]["artifact_location"]  # the default: sqlite in --out
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "kftune.cli", "run", str(write_config(config)), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-5000:]
    assert "train [" in log and "4/4 100%" in log  # the progress bar reached the end
    assert "evaluate tuned [" in log and "evaluate base [" in log  # evaluation's passes show theirs
    assert "kftune run: tiny v1" in log and "@champion" in log
    # One screen: the steps, progress, the table. Executor input, Ray's and the libraries' logs are in the step logs.
    shown = [line for line in log.splitlines() if not PROGRESS_UPDATE.match(line)]
    assert len(shown) <= 60, log
    for noise in ("executor_input", "PlacementGroupCleaner", "Token authentication", "FutureWarning", "Traceback"):
        assert noise not in log, noise
    assert [f"kftune: {step} done in" in log for step in STEPS] == [True] * len(STEPS)
    assert "Got executor_input" in (out / "logs" / "train.log").read_text()

    tracking_uri = f"sqlite:///{out / 'mlflow.db'}"
    client = MlflowClient(tracking_uri)
    champion = client.get_model_version_by_alias("tiny", "champion")
    assert str(champion.version) == "1" and str(client.get_model_version_by_alias("tiny", "challenger").version) == "1"
    for tag in (
        "kftune.base_model",
        "kftune.method",
        "kftune.dataset_sha256",
        "kftune.config_sha256",
        "kftune.pipeline_run_id",
    ):
        assert champion.tags[tag], tag
    assert champion.tags["kftune.method"] == "lora"

    mlflow.set_tracking_uri(tracking_uri)
    try:
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri="models:/tiny@champion", dst_path=str(tmp_path / "download")
            )
        )
        served = mlflow.pyfunc.load_model("models:/tiny@champion")
    finally:
        mlflow.set_tracking_uri(None)
    folder = next((local / "artifacts").glob("*/kftune_config.json")).parent  # the logged Model folder
    assert (folder / "adapter_model.safetensors").is_file() and not (folder / "model.safetensors").exists()
    prompts_dir = next(out.glob("pipeline/*/build-prompts/prompts"))
    rows = read_prompts(prompts_dir, "test")[:PROBE_ROWS]
    probe = json.loads((folder / PROBE_FILE).read_text())
    assert probe["sources"] == [r["source"] for r in rows]
    reloaded = probe_outputs(
        load_tuned_model(folder), rows, read_meta(prompts_dir)["pad_token_id"], "sequence_classification"
    )
    torch.testing.assert_close(torch.tensor(reloaded), torch.tensor(probe["outputs"]), atol=1e-5, rtol=1e-5)

    # Serving: the pyfunc behind models:/tiny@champion predicts the same classes from raw text.
    texts = [
        json.loads(line)["text"]
        for line in next(out.glob("pipeline/*/prepare-data/dataset")).joinpath("test.jsonl").read_text().splitlines()
    ][:PROBE_ROWS]
    frame = pd.DataFrame({"sentence": texts})  # the data's column (data.columns.text), as the signature names it
    labels = served.predict(frame)["label"].tolist()
    assert labels == [str(max(range(2), key=lambda i: logits[i])) for logits in probe["outputs"]]


@pytest.mark.slow
def test_a_failing_step_reports_its_root_cause_then_its_log(make_config, tmp_path, capsys):
    # Preflight would stop this config (tests/test_bad_input.py); without it, a Ray worker meets the mismatch.
    config = parse_config(make_config(method={"name": "lora", "r": 4, "target_modules": ["q_proj"]}))
    environment = dict(os.environ)
    with pytest.raises(KftuneError) as failure:
        run_pipeline(config, tmp_path / "run", verbose=True)
    assert (
        dict(os.environ) == environment
    )  # the steps' settings (Ray's auth mode) do not leak into this process's own Ray
    log = tmp_path / "run" / "logs" / "train.log"
    first, second = str(failure.value).splitlines()
    assert first.startswith("step train failed: NoMatchingPeftModuleError: No modules were targeted for adaptation")
    assert second == f"  log: {log}"
    assert "Traceback" in log.read_text() and "WorkerGroupError" in log.read_text()
    assert "Got executor_input" in capsys.readouterr().out  # -v: every step's log, live
