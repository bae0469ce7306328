"""Alignment stages through the step functions the components call, on stories260K: a reward model
and a DPO policy trained, evaluated (held-out preference accuracy, tuned against base) and registered;
the reward model's pyfunc scores prompt + response."""

from __future__ import annotations

import json

import mlflow
import pandas as pd
import pytest

from conftest import preference_run
from kftune import steps
from kftune.alignment.online import check_reward_model, load_reward_model
from kftune.errors import KftuneError
from kftune.steps import EVALUATION_FILE as WRITTEN

ANIMALS = ["cat", "dog", "bird", "fish", "frog", "duck", "bear", "lion", "fox", "owl"]


def pairs_file(tmp_path):
    """Pairs a tiny model can learn to tell apart: a story sentence over letter noise."""
    rows = [
        {
            "prompt": f"Tell me about the {animal} number {i}.",
            "chosen": f"The {animal} was happy and played.",
            "rejected": f"zq xv kj {animal} qq.",
        }
        for i in range(4)
        for animal in ANIMALS
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def run_steps(config: dict, tmp_path, name: str) -> dict:
    d = {part: str(tmp_path / name / part) for part in ("data", "prompts", "model", "evaluation")}
    steps.prepare_data(config, d["data"], str(tmp_path / f"{name}-card.md"))
    steps.build_prompts(config, d["data"], d["prompts"], str(tmp_path / f"{name}-preview.html"))
    steps.train(config, d["prompts"], d["model"], name)
    steps.evaluate(config, d["prompts"], d["model"], d["evaluation"], str(tmp_path / f"{name}-report.html"))
    summary = steps.register(
        config, d["data"], d["model"], d["evaluation"], str(tmp_path / f"{name}-report.html"), name
    )
    return {**summary, "evaluation": json.loads((tmp_path / name / "evaluation" / WRITTEN).read_text())}


@pytest.mark.slow
def test_reward_model_and_dpo_policy_through_the_steps(tmp_path):
    data = pairs_file(tmp_path)
    train = {"batch_size": 8, "workers": 1, "max_steps": 8, "lr": 2e-2, "log_every_steps": 4}
    dpo = preference_run(tmp_path, "dpo", data, train=train, preference={"beta": 0.5})
    dpo["data"] = {"path": str(data), "split": {"test": 0.25}}
    result = run_steps(dpo, tmp_path, "dpo")
    tuned, base = result["evaluation"]["tuned"], result["evaluation"]["base"]
    assert base["preference_accuracy"] == 0.5  # the base model is its own reference: every reward is 0
    assert tuned["preference_accuracy"] > 0.9 and tuned["reward_margin"] > 0, result["evaluation"]
    assert tuned["likelihood_accuracy"] >= base["likelihood_accuracy"]
    assert result["registered"]["version"] == 1

    reward = preference_run(tmp_path, "reward", data, train=train)
    reward["data"] = dpo["data"]
    result = run_steps(reward, tmp_path, "reward")
    assert result["evaluation"]["tuned"]["preference_accuracy"] > 0.9, result["evaluation"]
    mlflow.set_tracking_uri(reward["registry"]["tracking_uri"])
    served = mlflow.pyfunc.load_model(f"models:/{reward['registry']['model_name']}/1")
    scores = served.predict(
        pd.DataFrame(
            {
                "prompt": ["Tell me about the cat number 7.", "\n\nHuman: Tell me about the owl number 9."],
                "response": ["The cat was happy and played.", "zq xv kj owl qq."],
            }
        )
    )["reward"].tolist()
    assert scores[0] > scores[1]

    # As GRPO's reward: only a reward model is accepted; it reads a policy's rendered prompt as a transcript.
    uri = reward["registry"]["tracking_uri"]
    with pytest.raises(KftuneError, match=r"models:/tiny-dpo@champion was trained with stage dpo"):
        check_reward_model("models:/tiny-dpo@champion", uri)
    rewards = load_reward_model("models:/tiny-reward@champion", uri)(
        ["Human: Tell me about the owl number 9.\n\nAssistant:"] * 2,
        ["The owl was happy and played.", "zq xv kj owl qq."],
    )
    assert rewards[0] > rewards[1]
