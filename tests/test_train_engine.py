"""The training engine under real Ray Train (2 CPU workers over gloo) and real DeepSpeed on stories260K:
the update does not depend on how the global batch is split, ZeRO-3 trains the same weights as DDP and
consolidates them into a normal adapter, and a run whose worker is killed mid-run resumes from its
checkpoint and ends where an uninterrupted run ends, CPU offload of its optimizer state and parameters
changing nothing. Six Ray runs: about 4 minutes."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from conftest import EXAMPLES, STORIES
from kftune import steps
from kftune.config import config_to_dict, parse_config
from kftune.models import load_tuned_model
from kftune.prompts.build import read_meta, read_prompts
from kftune.train.launch import run_training
from kftune.train.loop import PROBE_FILE, PROBE_ROWS, TRAIN_LOG_FILE, probe_outputs

STEPS = 30  # inside the first epoch, where every global batch is full for both splits of it


LORA = {"name": "lora", "r": 4, "dropout": 0.0, "target_modules": "all-linear"}


def config(tmp_path: Path, method: dict = LORA, **train) -> dict:
    return config_to_dict(
        parse_config(
            {
                "model": {"name_or_path": str(STORIES), "task": "causal_lm"},
                "data": {
                    "path": str(EXAMPLES / "data" / "sst2_train_16k.tsv"),
                    "columns": {"text": "sentence"},
                    "max_rows": 400,
                    "split": {"test": 0.1},
                },
                "prompt": {"template": "text", "max_length": 48},
                "method": method,
                "train": {
                    "batch_size": 8,
                    "max_steps": STEPS,
                    "lr": 5e-3,
                    "workers": 2,
                    "log_every_steps": 10,
                    **train,
                },
                "eval": {"metrics": ["perplexity"], "compare_base": False, "forgetting": False},
                "registry": {
                    "model_name": "engine",
                    "gate": {"metric": "perplexity"},
                    "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                },
            }
        )
    )


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("engine")
    conf = config(folder)
    steps.prepare_data(conf, str(folder / "data"), str(folder / "card.md"))
    steps.build_prompts(conf, str(folder / "data"), str(folder / "prompts"), str(folder / "preview.html"))
    return str(folder / "prompts")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, prompts) -> dict[str, Path]:
    """Trained model folders, each made once for the whole module."""
    made: dict[str, Path] = {}

    def train(name: str, storage: Path | None = None, during=None, **settings) -> Path:
        if name not in made:
            folder = tmp_path_factory.mktemp(name)
            conf = parse_config(config(folder, **settings))
            stop = threading.Event()
            watcher = threading.Thread(target=during, args=(storage, stop)) if during else None
            if watcher:
                watcher.start()
            try:
                run_training(conf, prompts, folder / "model", storage or folder / "ray")
            finally:
                stop.set()
                if watcher:
                    watcher.join()
            made[name] = folder / "model"
        return made[name]

    return train


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor the artifact saved (adapter, trained parameters or whole model)."""
    return {k: v for path in sorted(model_dir.glob("*.safetensors")) for k, v in load_file(str(path)).items()}


def assert_same_weights(a: Path, b: Path, atol: float) -> None:
    first, second = weights(a), weights(b)
    assert first and first.keys() == second.keys()
    worst = max((first[k] - second[k]).abs().max().item() for k in first)
    assert worst < atol, f"largest difference {worst}"


def log(model_dir: Path) -> dict:
    return json.loads((model_dir / TRAIN_LOG_FILE).read_text())


def test_two_workers_make_the_same_update_as_one_worker_with_twice_the_accumulation(runs):
    two = runs("ddp2")
    one = runs("ddp1x2", workers=1, gradient_accumulation=2)
    assert log(two)["steps"] == log(one)["steps"] == STEPS
    built = log(two)["peak_gb_when_built"]  # each worker's own high-water mark once built, gathered for the log
    assert len(built) == 2 and all(0.1 < peak["host_rss"] < 20 for peak in built), built
    assert [r["loss"] for r in log(two)["history"]] == pytest.approx([r["loss"] for r in log(one)["history"]], abs=1e-4)
    assert_same_weights(two, one, atol=1e-4)
    losses = [r["loss"] for r in log(two)["history"]]
    assert losses[-1] < losses[0] * 0.9, losses


def test_gradual_unfreezing_keeps_workers_in_step_as_layers_join(runs):
    """DDP only averages gradients of parameters trainable when it wrapped the model; each unfreezing re-wraps it."""
    method = {"name": "gradual_unfreeze", "start_layers": 1, "every_steps": 10}
    two = runs("unfreeze2", method=method, lr=1e-3)
    one = runs("unfreeze1x2", method=method, lr=1e-3, workers=1, gradient_accumulation=2)
    assert_same_weights(two, one, atol=1e-4)


def test_zero3_trains_the_same_weights_and_consolidates_to_a_normal_adapter(runs, prompts):
    zero3 = runs("zero3", deepspeed={"stage": 3})
    assert log(zero3)["engine"] == "deepspeed-zero3"
    assert_same_weights(runs("ddp2"), zero3, atol=1e-4)
    # The consolidated folder is a plain PEFT adapter that reloads to the outputs recorded in training.
    reloaded = load_tuned_model(zero3)
    rows = read_prompts(prompts, "test")[:PROBE_ROWS]
    expected = json.loads((zero3 / PROBE_FILE).read_text())["outputs"]
    outputs = probe_outputs(reloaded, rows, read_meta(prompts)["pad_token_id"], "causal_lm")
    assert torch.allclose(torch.tensor(outputs), torch.tensor(expected), rtol=1e-5)


def kill_a_worker_after_the_first_checkpoint(storage: Path, stop: threading.Event) -> None:
    """Preemption: SIGKILL one Ray Train worker process once Ray Train has committed a checkpoint."""
    while not stop.is_set():
        if any(_committed(path) for path in storage.glob("*/checkpoint_manager_snapshot.json")):
            for process in psutil.Process().children(recursive=True):  # this test's Ray, not another one on the machine
                if "RayTrainWorker" in " ".join(process.cmdline()):
                    process.send_signal(signal.SIGKILL)
                    return
        time.sleep(0.05)


def _committed(snapshot: Path) -> bool:
    try:
        return bool(json.loads(snapshot.read_text()).get("latest_checkpoint_result"))
    except ValueError:  # caught mid-write
        return False


def test_a_killed_offloading_worker_resumes_from_the_checkpoint_and_ends_like_an_uninterrupted_run(runs, tmp_path):
    """ZeRO-3 with its optimizer state and parameters offloaded to the CPU, over 2 gloo workers: on CPU
    offloading moves no bytes, but DeepSpeed still takes its offload path (own CPU buffers, gradient
    copies, optimizer step, and their checkpoint), so the run trains the weights plain ZeRO-3 trains."""
    offload = {"stage": 3, "offload_optimizer": True, "offload_params": True}
    checkpointing = {"deepspeed": offload, "checkpoint": {"every_steps": 10, "max_failures": 1}}
    killed = runs(
        "zero3-killed", storage=tmp_path / "storage", during=kill_a_worker_after_the_first_checkpoint, **checkpointing
    )
    resumed = log(killed)["resumed_at_steps"]
    assert len(resumed) == 1 and 10 <= resumed[0] < STEPS, resumed
    uninterrupted = runs("zero3")
    assert [r["loss"] for r in log(killed)["history"]] == pytest.approx(
        [r["loss"] for r in log(uninterrupted)["history"]], abs=1e-4
    )
    assert_same_weights(killed, uninterrupted, atol=1e-4)
