"""Shared test data: tiny slices of the shipped SST-2 files and a config builder around them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
STORIES = EXAMPLES / "models" / "stories260K"
CLUSTER_RUN_CONFIG = REPO / "charts" / "kftune" / "files" / "run-config.yaml"
"""The chart's run config: data on the volume every step mounts, so it compiles for a cluster (kftune.kube.locations)."""

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def needs_cluster_tool(missing: bool, reason: str) -> None:
    """Skip a test whose tool (helm, the API server) this machine lacks; with CI=true fail it instead, so CI cannot pass without them."""
    if not missing:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


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
    "evaluate": {"resources": {"cpu": "4", "memory": "32Gi", "gpus": 1}, "node_selector": {"pool": "gpu"}},
    "volume": {"claim": "kftune-data", "mount_path": "/data"},
    "mlflow_secret": {"name": "mlflow-credentials", "env": {"password": "MLFLOW_TRACKING_PASSWORD"}},
    "image_pull_secrets": ["ghcr"],
}
# Where a compiled config's data lives on CLUSTER's volume (compiling refuses paths only this machine has).
ON_VOLUME = {"path": "/data/sst2/train.tsv", "split": {"test": "/data/sst2/dev.tsv"}}
