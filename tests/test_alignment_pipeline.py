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
from kftune.config import parse_config
from kftune.errors import KftuneError
from kftune.preflight import preflight
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

    # The DPO policy judged by the reward model: mean reward of greedy generations, win rate, KL.
    judged = {**dpo, "eval": {**dpo["eval"], "reward_model": "models:/tiny-reward@champion"}}
    judged["eval"]["metrics"] = ["preference_accuracy", "mean_reward", "win_rate", "kl"]
    d = tmp_path / "dpo"
    steps.evaluate(judged, str(d / "prompts"), str(d / "model"), str(d / "judged"), str(tmp_path / "judged.html"))
    evaluation = json.loads((d / "judged" / WRITTEN).read_text())
    assert evaluation["base"]["win_rate"] == 0.5 and evaluation["base"]["kl"] == 0.0, evaluation
    assert evaluation["tuned"]["preference_accuracy"] > 0.9 and evaluation["tuned"]["kl"] != 0.0, evaluation
    assert evaluation["tuned"]["mean_reward"] != evaluation["base"]["mean_reward"]
    assert evaluation["tuned"]["samples"]
    with pytest.raises(KftuneError, match=r"eval.reward_model: models:/tiny-dpo@champion was trained with stage dpo"):
        check_reward_model("models:/tiny-dpo@champion", uri, "eval.reward_model")

    # PPO (InstructGPT's third step) against a reward model with another tokenizer: an encoder (MiniLM, BERT's
    # WordPiece) judging a Llama policy's texts, which its pyfunc re-tokenizes. Gated on win rate; the value
    # head is not saved.
    encoder_reward = preference_run(
        tmp_path,
        "reward",
        data,
        model={"name_or_path": "minilm-l6", "task": "sequence_classification"},
        prompt={"template": "preference", "max_length": 64},
        method={"name": "lora", "r": 4, "target_modules": ["query", "value"]},
        train={**train, "max_steps": 2},
    )
    encoder_reward["data"] = dpo["data"]
    encoder_reward["registry"] = {**encoder_reward["registry"], "model_name": "minilm-reward"}
    assert run_steps(encoder_reward, tmp_path, "minilm-reward")["registered"]["version"] == 1
    ppo = preference_run(
        tmp_path,
        "ppo",
        data,
        train={"batch_size": 4, "workers": 1, "max_steps": 4, "lr": 1e-2, "log_every_steps": 2},
        online={"reward_model": "models:/minilm-reward/1", "group_size": 2, "max_new_tokens": 8, "ppo_epochs": 2},
    )
    ppo["data"] = {"path": str(data), "max_rows": 16, "split": {"test": 0.25}}
    ppo["eval"] = {**ppo["eval"], "metrics": ["mean_reward", "win_rate", "kl"], "max_new_tokens": 8}
    ppo["registry"] = {**ppo["registry"], "gate": {"metric": "win_rate"}}
    missing = {**ppo, "online": {**ppo["online"], "reward_model": "models:/missing@champion"}}
    with pytest.raises(KftuneError, match=r"online.reward_model: models:/missing@champion is not in MLflow"):
        preflight(parse_config(missing))  # before any step runs: kftune run and resolve-config call it
    result = run_steps(ppo, tmp_path, "ppo")
    assert set(result["evaluation"]["tuned"]) >= {"mean_reward", "win_rate", "kl"}, result["evaluation"]
    assert result["registered"]["version"] == 1
    saved = json.loads((tmp_path / "ppo" / "model" / "train_log.json").read_text())
    assert saved["steps"] == 4 and len(saved["history"]) == 2
    assert "value_head" not in (tmp_path / "ppo" / "model").joinpath("adapter_model.safetensors").read_bytes().decode(
        "latin-1"
    )


@pytest.mark.slow
def test_kto_with_full_fine_tuning_under_zero3_scores_against_a_partitioned_reference_copy(tmp_path):
    """No worker holds the starting weights whole under ZeRO-3, so KTO's frozen reference is loaded partitioned
    too (KTO cannot precompute it); its first loss equals the one against a whole copy under ZeRO-2."""
    rows = [
        {"prompt": f"Tell me about the {animal}.", "completion": completion, "label": label}
        for animal in ANIMALS
        for completion, label in ((f"The {animal} was happy and played.", True), (f"zq xv kj {animal} qq.", False))
    ]
    data = tmp_path / "feedback.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    first_losses = {}
    for stage in (2, 3):
        config = preference_run(
            tmp_path,
            "kto",
            data,
            method={"name": "full"},
            train={
                "batch_size": 4,
                "workers": 2,
                "max_steps": 1,
                "lr": 1e-4,
                "log_every_steps": 1,
                "deepspeed": {"stage": stage},
            },
        )
        assert parse_config(config).preference.reference == "auto"
        d = {part: str(tmp_path / f"zero{stage}" / part) for part in ("data", "prompts", "model")}
        steps.prepare_data(config, d["data"], str(tmp_path / "card.md"))
        steps.build_prompts(config, d["data"], d["prompts"], str(tmp_path / "preview.html"))
        steps.train(config, d["prompts"], d["model"], f"kto-zero{stage}")
        log = json.loads((tmp_path / f"zero{stage}" / "model" / "train_log.json").read_text())
        assert log["engine"] == f"deepspeed-zero{stage}" and log["steps"] == 1
        first_losses[stage] = log["history"][0]["loss"]
    assert first_losses[3] == pytest.approx(first_losses[2], abs=1e-4), first_losses
