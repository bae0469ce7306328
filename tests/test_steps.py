"""The step functions the components call, chained by hand on a real tiny Llama (causal LM path)."""

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from conftest import STORIES
from kftune import steps
from kftune.train.loop import TRAIN_LOG_FILE

ANIMALS = ["cat", "dog", "bird", "fish", "frog", "duck", "bear", "lion"]


@pytest.mark.slow
def test_prepare_build_train_evaluate_register_on_stories260k(make_config, tmp_path):
    source = tmp_path / "qa.jsonl"
    source.write_text(
        "".join(
            json.dumps(
                {
                    "instruction": f"What did Lily see in story {i}?",
                    "input": "",
                    "output": f"Lily saw a {ANIMALS[i % 8]}.",
                }
            )
            + "\n"
            for i in range(40)
        )
    )
    config = make_config(
        model={"name_or_path": str(STORIES), "task": "causal_lm"},
        data={"path": str(source), "columns": {}, "split": {"test": 0.2}},
        prompt={"template": "alpaca", "max_length": 160},
        method={"name": "lora", "r": 8, "target_modules": "all-linear"},
        train={"batch_size": 8, "epochs": 3, "max_steps": 12, "lr": 2e-2, "workers": 1, "log_every_steps": 3},
        eval={"metrics": ["perplexity", "exact_match", "rouge_l", "bleu"], "max_new_tokens": 12},
        registry={"gate": {"metric": "perplexity"}},
    )
    d = {name: str(tmp_path / name) for name in ("data", "prompts", "model", "evaluation")}
    assert steps.prepare_data(config, d["data"], str(tmp_path / "card.md"))["test_rows"] == 8
    assert "| train | 32 |" in (tmp_path / "card.md").read_text()
    assert steps.build_prompts(config, d["data"], d["prompts"], str(tmp_path / "preview.html"))["train_rows"] == 32

    trained = steps.train(config, d["prompts"], d["model"], "steps-test")
    assert trained["steps"] == 12
    history = json.loads((Path(d["model"]) / TRAIN_LOG_FILE).read_text())["history"]
    assert history[-1]["loss"] < history[0]["loss"] * 0.8, history

    scores = steps.evaluate(config, d["prompts"], d["model"], d["evaluation"], str(tmp_path / "report.html"))
    assert scores["tuned_perplexity"] < scores["base_perplexity"], scores
    assert scores["tuned_rouge_l"] > scores["base_rouge_l"], scores  # it learned the answer's form
    assert {"tuned_exact_match", "tuned_bleu", "forgetting_general_perplexity", "forgetting_score"} <= set(scores)
    report = (tmp_path / "report.html").read_text()
    assert "<svg" in report and "perplexity on general text" in report and "Generations" in report

    summary = steps.register(config, d["data"], d["model"], d["evaluation"], str(tmp_path / "report.html"), "run-1")
    assert summary["registered"]["version"] == 1 and summary["registered"]["promoted"]

    # Serving: the registered pyfunc continues a prompt the way training taught it.
    mlflow.set_tracking_uri(config["registry"]["tracking_uri"])
    try:
        served = mlflow.pyfunc.load_model("models:/tiny@champion")
    finally:
        mlflow.set_tracking_uri(None)
    generated = served.predict(
        pd.DataFrame(
            {
                "prompt": [
                    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\nWhat did Lily see in story 3?\n\n### Response:\n"
                ]
            }
        )
    )
    assert generated["generated"][0].startswith("Lily saw")
