"""`kftune run` for real: kfp.local executes the DAG, Ray Train runs 2 workers, MLflow registers.
Then the registered adapter is downloaded from MLflow and must reproduce the predictions the
model made at the end of training."""

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from kftune.models import load_tuned_model
from kftune.prompts.build import read_meta, read_prompts
from kftune.train.loop import PROBE_FILE, PROBE_ROWS, probe_outputs


@pytest.mark.slow
def test_kftune_run_registers_a_reloadable_adapter(make_config, write_config, tmp_path):
    config = make_config(train={"workers": 2, "batch_size": 16, "max_steps": 4, "lr": 5e-3})
    del config["registry"]["tracking_uri"], config["registry"]["artifact_location"]  # the default: sqlite in --out
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "kftune.cli", "run", str(write_config(config)), "--out", str(out)],
        capture_output=True, text=True, timeout=900,
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-5000:]
    assert "train [" in log and "4/4 100%" in log  # the progress bar reached the end
    assert "kftune run: tiny v1" in log and "@champion" in log

    tracking_uri = f"sqlite:///{out / 'mlflow.db'}"
    client = MlflowClient(tracking_uri)
    champion = client.get_model_version_by_alias("tiny", "champion")
    assert str(champion.version) == "1" and str(client.get_model_version_by_alias("tiny", "challenger").version) == "1"
    for tag in ("kftune.base_model", "kftune.method", "kftune.dataset_sha256", "kftune.config_sha256", "kftune.pipeline_run_id"):
        assert champion.tags[tag], tag
    assert champion.tags["kftune.method"] == "lora"

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=champion.source, dst_path=str(tmp_path / "download"), tracking_uri=tracking_uri))
    assert (local / "adapter_model.safetensors").is_file() and not (local / "model.safetensors").exists()
    prompts_dir = next(out.glob("pipeline/*/build-prompts/prompts"))
    rows = read_prompts(prompts_dir, "test")[:PROBE_ROWS]
    probe = json.loads((local / PROBE_FILE).read_text())
    assert probe["sources"] == [r["source"] for r in rows]
    reloaded = probe_outputs(load_tuned_model(local), rows, read_meta(prompts_dir)["pad_token_id"], "sequence_classification")
    torch.testing.assert_close(torch.tensor(reloaded), torch.tensor(probe["outputs"]), atol=1e-5, rtol=1e-5)
