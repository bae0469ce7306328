"""Checkpoints on S3-compatible storage (a real moto S3 server on localhost) through Ray Train: the
run writes its checkpoints and model there, and a restarted run finds the finished run and reuses
its model instead of training again."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kftune.config import parse_config
from kftune.errors import KftuneError
from kftune.train.checkpoints import check_writable
from kftune.train.launch import run_training
from kftune.train.loop import TRAIN_LOG_FILE
from test_train_engine import config, prompts  # noqa: F401  (prompts is a fixture)

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3_endpoint():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    import boto3

    os.environ.update(CREDENTIALS)
    client = boto3.client("s3", endpoint_url=endpoint)
    for _ in range(100):
        try:
            client.create_bucket(Bucket="checkpoints")
            break
        except Exception:  # not listening yet
            time.sleep(0.1)
    yield endpoint
    server.terminate()


@pytest.fixture
def fresh_ray():
    """Ray workers inherit the environment Ray started with: restart it with the S3 credentials set."""
    import ray

    ray.shutdown()
    yield
    ray.shutdown()


def uri(endpoint: str, bucket: str = "checkpoints") -> str:
    return f"s3://{bucket}/runs?endpoint_override={endpoint}&scheme=http&region=us-east-1"


def test_checkpoints_on_s3_and_a_finished_run_is_reused(s3_endpoint, fresh_ray, prompts, tmp_path):  # noqa: F811
    settings = {"max_steps": 12, "checkpoint": {"storage": uri(s3_endpoint), "every_steps": 5}}
    first = run_training(parse_config(config(tmp_path, **settings)), prompts, tmp_path / "first", tmp_path / "unused")
    assert first["steps"] == 12

    import boto3

    keys = [
        o["Key"] for o in boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket="checkpoints")["Contents"]
    ]
    assert any(k.endswith("/trainer_state.json") for k in keys) and any(
        k.endswith("/adapter_model.safetensors") for k in keys
    ), keys

    again = run_training(parse_config(config(tmp_path, **settings)), prompts, tmp_path / "again", tmp_path / "unused")
    assert again == first  # the same train log: nothing was trained again
    assert (tmp_path / "again" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "first" / "adapter_model.safetensors"
    ).read_bytes()
    assert json.loads((tmp_path / "again" / TRAIN_LOG_FILE).read_text())["steps"] == 12


def test_a_missing_bucket_is_refused_before_ray_starts(s3_endpoint):
    with pytest.raises(
        KftuneError, match=r"train\.checkpoint\.storage: cannot write to s3://no-such-bucket/runs.*not found"
    ):
        check_writable(uri(s3_endpoint, "no-such-bucket"))
