"""Validation during training under real Ray Train (2 CPU workers): the validation loss is recorded
every `eval_every_steps`, `keep_best` makes the artifact hold the weights of the evaluation with the
lowest validation loss (the same weights a run stopped at that step trains), and `patience` stops the
run after that many evaluations without improvement."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from conftest import EXAMPLES, STORIES
from kftune import steps
from kftune.config import parse_config
from kftune.errors import KftuneError
from kftune.train.launch import run_training
from kftune.train.loop import TRAIN_LOG_FILE
from kftune.train.validation import best_evaluation, evaluations_since_best


def story_config(tmp_path, **train):
    return parse_config(
        {
            "model": {"name_or_path": str(STORIES), "task": "causal_lm"},
            "data": {
                "path": str(EXAMPLES / "data" / "sst2_train_16k.tsv"),
                "columns": {"text": "sentence"},
                "max_rows": 120,
                "split": {"validation": 0.25, "test": 0.1},
            },
            "prompt": {"template": "text", "max_length": 48},
            "method": {"name": "lora", "r": 4, "target_modules": "all-linear"},
            "train": {
                "batch_size": 8,
                "lr": 0.01,
                "epochs": 20,
                "schedule": "constant",
                "workers": 2,
                "log_every_steps": 100,
                **train,
            },
            "eval": {"metrics": ["perplexity"], "compare_base": False, "forgetting": False},
            "registry": {
                "model_name": "validation",
                "gate": {"metric": "perplexity"},
                "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            },
        }
    )


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("validation")
    raw = json.loads(story_config(folder).model_dump_json(exclude_none=True))
    steps.prepare_data(raw, str(folder / "data"), str(folder / "card.md"))
    steps.build_prompts(raw, str(folder / "data"), str(folder / "prompts"), str(folder / "preview.html"))
    return folder / "prompts"


def train(tmp_path, prompts, name: str, **settings):
    run_training(story_config(tmp_path, **settings), prompts, tmp_path / name, tmp_path / f"ray-{name}")
    return json.loads((tmp_path / name / TRAIN_LOG_FILE).read_text()), load_file(
        str(tmp_path / name / "adapter_model.safetensors")
    )


def test_keep_best_saves_the_lowest_validation_loss_weights_and_patience_stops_the_run(tmp_path, prompts):
    log, weights = train(tmp_path, prompts, "best", max_steps=60, eval_every_steps=3, keep_best=True, patience=2)
    evaluated = [r for r in log["history"] if "validation_loss" in r]
    assert [r["step"] for r in evaluated] == list(range(3, log["steps"] + 1, 3))
    best = min(evaluated, key=lambda r: r["validation_loss"])
    assert log["best_evaluation"] == {"step": best["step"], "validation_loss": best["validation_loss"]}
    assert log["weights_from_step"] == best["step"] < log["steps"]  # measured: best at step 15 of 21
    assert log["stopped_early_at_step"] == log["steps"] == best["step"] + 2 * 3
    _, at_best = train(tmp_path, prompts, "until-best", max_steps=best["step"])
    assert weights.keys() == at_best.keys()
    assert max((weights[k] - at_best[k]).abs().max().item() for k in weights) < 1e-6


def test_best_evaluation_and_patience_count_come_from_the_history():
    history = [
        {"step": 1, "loss": 3.0},
        {"step": 2, "loss": 2.0, "validation_loss": 2.5},
        {"step": 4, "loss": 1.0, "validation_loss": 2.5},
        {"step": 6, "loss": 1.0, "validation_loss": 2.7},
    ]
    assert best_evaluation(history)["step"] == 2  # the earliest of equal losses: a tie is no improvement
    assert evaluations_since_best(history) == 2
    assert best_evaluation(history[:1]) is None and evaluations_since_best(history[:1]) == 0


@pytest.mark.parametrize(
    ("train", "data", "message"),
    [
        ({"eval_every_steps": 5}, {}, r"train\.eval_every_steps: needs validation rows: set data\.split\.validation"),
        (
            {"keep_best": True},
            {"split": {"validation": 0.2}},
            r"train\.keep_best: needs validation during training: set train\.eval_every_steps",
        ),
        ({"patience": 2}, {"split": {"validation": 0.2}}, r"train\.patience: needs validation during training"),
    ],
)
def test_validation_settings_without_what_they_need_are_refused(make_config, train, data, message):
    config = make_config(train=train)
    config["data"]["split"].update(data.get("split", {}))
    with pytest.raises(KftuneError, match=message):
        parse_config(config)


def test_keep_best_weights_saved_with_a_checkpoint_come_back_to_the_worker_that_kept_them(tmp_path):
    """Each worker writes the weights it kept (its partitions under ZeRO-3, rank 0 alone under DDP);
    on resume every worker agrees whether there are any, so the final save stays collective."""
    import torch

    from kftune.train.loop import BEST_STATE_FILE, load_best_state

    assert load_best_state(tmp_path, 0) is None and load_best_state(tmp_path, 1) is None
    torch.save({"w": torch.tensor([1.0, 2.0])}, tmp_path / BEST_STATE_FILE.format(0))
    assert torch.equal(load_best_state(tmp_path, 0)["w"], torch.tensor([1.0, 2.0]))
    assert load_best_state(tmp_path, 1) == {}  # DDP: rank 0 keeps them all
    torch.save({"w": torch.tensor([3.0])}, tmp_path / BEST_STATE_FILE.format(1))
    assert torch.equal(load_best_state(tmp_path, 1)["w"], torch.tensor([3.0]))  # ZeRO-3: its own partition
