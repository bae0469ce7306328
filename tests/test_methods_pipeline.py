"""Methods through the real train and evaluate steps (Ray Train, one worker) on stories260K: the
loop's optimizer groups and per-step hook, each artifact format written by the loop, and the
virtual tokens of prompt learning in the probe and the perplexity."""

import json
from pathlib import Path

import pytest
import torch

from conftest import STORIES
from kftune import steps
from kftune.models import load_tuned_model
from kftune.prompts.build import read_meta, read_prompts
from kftune.train.loop import PROBE_FILE, PROBE_ROWS, TRAIN_LOG_FILE, probe_outputs

ANIMALS = ["cat", "dog", "bird", "fish", "frog", "duck", "bear", "lion"]


@pytest.fixture(scope="module")
def stories_lines(tmp_path_factory):
    """40 stories-style sentences: 32 to train on, 8 to test."""
    source = tmp_path_factory.mktemp("stories") / "lines.jsonl"
    source.write_text(
        "".join(
            json.dumps({"text": f"Once upon a time, Lily saw a {ANIMALS[i % 8]} in the park {i}."}) + "\n"
            for i in range(40)
        )
    )
    return source


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "train"),
    [
        ({"name": "gradual_unfreeze", "start_layers": 1, "every_steps": 2}, {"layer_lr_decay": 0.7}),
        ({"name": "prompt_tuning", "virtual_tokens": 4}, {"lr": 3e-2}),
        ({"name": "layer_prompt"}, {"lr": 3e-2}),
    ],
    ids=lambda value: value.get("name", ""),
)
def test_method_through_train_and_evaluate_steps(make_config, stories_lines, method, train, tmp_path):
    config = make_config(
        model={"name_or_path": str(STORIES), "task": "causal_lm"},
        data={"path": str(stories_lines), "columns": {}, "split": {"test": 0.2}},
        prompt={"template": "text", "max_length": 64},
        method=method,
        train={"batch_size": 8, "epochs": 3, "max_steps": 8, "lr": 5e-3, "workers": 1, "log_every_steps": 2, **train},
        eval={"metrics": ["perplexity"]},
        registry={"gate": {"metric": "perplexity"}},
    )
    d = {name: str(tmp_path / name) for name in ("data", "prompts", "model", "evaluation")}
    steps.prepare_data(config, d["data"], str(tmp_path / "card.md"))
    steps.build_prompts(config, d["data"], d["prompts"], str(tmp_path / "preview.html"))
    assert steps.train(config, d["prompts"], d["model"], f"methods-{method['name']}")["steps"] == 8
    history = json.loads((Path(d["model"]) / TRAIN_LOG_FILE).read_text())["history"]
    assert history[-1]["loss"] < history[0]["loss"], history

    scores = steps.evaluate(config, d["prompts"], d["model"], d["evaluation"], str(tmp_path / "report.html"))
    assert scores["tuned_perplexity"] < scores["base_perplexity"], scores
    rows = read_prompts(d["prompts"], "test")[:PROBE_ROWS]
    reloaded = probe_outputs(load_tuned_model(d["model"]), rows, read_meta(d["prompts"])["pad_token_id"], "causal_lm")
    torch.testing.assert_close(
        torch.tensor(reloaded),
        torch.tensor(json.loads((Path(d["model"]) / PROBE_FILE).read_text())["outputs"]),
        atol=1e-4,
        rtol=1e-5,
    )
