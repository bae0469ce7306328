"""Retention inside the real training step (Ray Train, 2 CPU workers over gloo, stories260K): with
L2-SP, EWC, distillation on task and general inputs and replay all on, two workers make the same update
as one worker with twice the accumulation (each term counts once per optimizer step, and every worker
gets the Fisher rank 0 computed), the loss history records each term, and the Fisher lands in the
run's storage for later runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import stories_run
from kftune import steps
from kftune.config import config_to_dict, parse_config
from kftune.train.launch import run_training
from kftune.train.loop import TRAIN_LOG_FILE

RETENTION = {
    "l2_sp": {"alpha": 0.5},
    "ewc": {"strength": 0.5, "fisher_rows": 8},
    "distill": {"weight": 0.5, "inputs": ["task", "general"]},
    "replay": {"ratio": 0.5, "weight": 0.5},
    "general_rows": 32,
}


def config(folder: Path, **train) -> dict:
    settings = {"max_steps": 4, "lr": 5e-3, "log_every_steps": 2, **train}
    run = stories_run(
        folder, "retention", {"name": "lora", "r": 4, "dropout": 0.0, "target_modules": "all-linear"}, settings
    )
    return config_to_dict(parse_config({**run, "retention": RETENTION}))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("retention")
    steps.prepare_data(config(folder), str(folder / "data"), str(folder / "card.md"))
    steps.build_prompts(config(folder), str(folder / "data"), str(folder / "prompts"), str(folder / "preview.html"))
    made = {}
    for name, train in {"two": {}, "one": {"workers": 1, "gradient_accumulation": 2}}.items():
        made[name] = folder / name
        run_training(
            parse_config(config(folder, **train)), folder / "prompts", folder / name, folder / f"storage-{name}"
        )
    made["storage"] = folder / "storage-two"
    return made


def test_two_workers_and_one_with_twice_the_accumulation_agree_with_every_term_on(trained):
    logs = {name: json.loads((trained[name] / TRAIN_LOG_FILE).read_text()) for name in ("two", "one")}
    for log in logs.values():
        terms = {k for record in log["history"] for k in record if k.startswith("retention_")}
        assert terms == {"retention_anchor", "retention_distill_task", "retention_distill_general", "retention_replay"}
        assert log["history"][-1]["retention_anchor"] > 0
    assert [r["loss"] for r in logs["two"]["history"]] == pytest.approx(
        [r["loss"] for r in logs["one"]["history"]], abs=1e-4
    )
    two, one = (load_file(str(trained[name] / "adapter_model.safetensors")) for name in ("two", "one"))
    assert max((two[k] - one[k]).abs().max().item() for k in two) < 1e-4


def test_the_fisher_is_cached_in_the_runs_storage(trained):
    cached = list((trained["storage"] / "retention").glob("fisher-*.safetensors"))
    assert len(cached) == 1
    assert "model.layers.0.self_attn.q_proj.weight" in load_file(str(cached[0]))
