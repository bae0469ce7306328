"""Preference data through prepare_data and build_prompts, and the stage's config checks."""

from __future__ import annotations

import json

import pytest

from conftest import PREFERENCE_DATA, STORIES, preference_run
from kftune.alignment.collate import FeedbackCollator, PairCollator
from kftune.config import parse_config
from kftune.data.prepare import prepare, write_prepared
from kftune.errors import KftuneError
from kftune.prompts.build import IGNORE_INDEX, build_prompts, read_prompts

pytestmark = pytest.mark.usefixtures("one_thread")


def prepared(tmp_path, stage: str, data, **sections):
    config = parse_config(preference_run(tmp_path, stage, data, **sections))
    return config, prepare(config)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_hh_rlhf_dialogues_split_at_the_last_assistant_turn(tmp_path):
    _, data = prepared(tmp_path, "dpo", PREFERENCE_DATA["hh_rlhf"])
    rows = data.splits["train"] + data.splits["test"]
    first = next(r for r in rows if r["source"].endswith(":1"))
    assert [t["role"] for t in first["prompt"]] == ["user", "assistant", "user", "assistant", "user"]
    assert first["prompt"][0]["content"] == "what are some pranks with a pen i can do?"
    assert first["prompt"][-1]["content"] == "okay some of these do not have anything to do with pens"
    assert first["chosen"].startswith("No, sorry!") and "Human:" not in first["chosen"]
    assert all(r["chosen"] != r["rejected"] and r["prompt"][-1]["role"] == "user" for r in rows)


def test_llamafactory_conversations_are_recognised_by_their_columns(tmp_path):
    _, data = prepared(tmp_path, "dpo", PREFERENCE_DATA["conversations"])
    row = data.splits["train"][0]
    assert row["prompt"][-1]["role"] == "user" and isinstance(row["chosen"], str) and row["chosen"]


def test_bad_pairs_are_dropped_and_named_by_line(tmp_path):
    rows = [{"prompt": f"question {i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(12)]
    rows[2]["rejected"] = rows[2]["chosen"]  # line 3
    rows[4]["chosen"] = "   "  # line 5
    _, data = prepared(tmp_path, "dpo", write_jsonl(tmp_path / "pairs.jsonl", rows))
    assert data.dropped["chosen and rejected are identical"] == [f"{tmp_path / 'pairs.jsonl'}:3"]
    assert data.dropped["empty response"] == [f"{tmp_path / 'pairs.jsonl'}:5"]
    assert sum(len(split) for split in data.splits.values()) == 10


def test_missing_columns_and_bad_feedback_labels_are_named(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a"}] * 4)
    with pytest.raises(KftuneError, match=r"no column rejected for preference.format pairs"):
        prepared(tmp_path, "dpo", path)
    rows = [{"prompt": f"q{i}", "completion": f"a{i}", "label": i % 2 == 0} for i in range(8)] + [
        {"prompt": "q", "completion": "a", "label": "maybe"}
    ]
    with pytest.raises(KftuneError, match=r"feedback.jsonl:9: label 'maybe'"):
        prepared(tmp_path, "kto", write_jsonl(tmp_path / "feedback.jsonl", rows))


def test_pairs_encode_the_response_only_and_drop_long_prompts(tmp_path):
    rows = [
        {"prompt": f"Tell me about the cat number {i}.", "chosen": "A cat sat.", "rejected": "No."} for i in range(11)
    ]
    rows.append({"prompt": "long " * 300, "chosen": "yes", "rejected": "no"})
    config, data = prepared(tmp_path, "dpo", write_jsonl(tmp_path / "pairs.jsonl", rows))
    write_prepared(data, tmp_path / "data")
    meta = build_prompts(config, tmp_path / "data", tmp_path / "prompts")
    assert sum(c.get("dropped_prompt_too_long", 0) for c in meta["splits"].values()) == 1
    row = read_prompts(tmp_path / "prompts", "train")[0]
    prompt = [
        i for i, label in zip(row["chosen_input_ids"], row["chosen_labels"], strict=True) if label == IGNORE_INDEX
    ]
    assert prompt == row["rejected_input_ids"][: len(prompt)]  # the same prompt tokens, unlabelled
    trained = [label for label in row["chosen_labels"] if label != IGNORE_INDEX]
    assert trained == row["chosen_input_ids"][len(prompt) :] and trained
    batch = PairCollator(meta["pad_token_id"])(read_prompts(tmp_path / "prompts", "train")[:3])
    assert batch["input_ids"].shape[0] == 6  # chosen rows, then rejected rows


def test_feedback_rows_and_their_mismatched_pairs(tmp_path):
    rows = [{"prompt": f"q{i}", "completion": f"answer {i}", "label": i % 2 == 0} for i in range(8)]
    config, data = prepared(tmp_path, "kto", write_jsonl(tmp_path / "f.jsonl", rows))
    write_prepared(data, tmp_path / "data")
    build_prompts(config, tmp_path / "data", tmp_path / "prompts")
    encoded = read_prompts(tmp_path / "prompts", "train")[:2]
    batch = FeedbackCollator(0)(encoded)
    first, second = encoded
    expected = first["input_ids"][: first["prompt_length"]] + second["input_ids"][second["prompt_length"] :]
    assert batch["kl_input_ids"][0, : len(expected)].tolist() == expected
    assert batch["desirable"].tolist() == [r["desirable"] for r in encoded]


def test_chat_template_renders_the_dialogue(tmp_path):
    from transformers import AutoTokenizer

    from kftune.alignment.encode import render_response
    from kftune.prompts.templates import get_template

    tokenizer = AutoTokenizer.from_pretrained(str(STORIES))
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    turns = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
    ]
    segments = render_response(get_template("preference_chat"), tokenizer, turns, "ciao")
    assert [text for text, trained in segments if trained] == ["ciao</s>"]  # earlier assistant turns are context
    assert "".join(text for text, _ in segments).startswith("<user>hi</s><assistant>hello</s><user>bye</s>")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"stage": "reward", "model": {"name_or_path": str(STORIES), "task": "causal_lm"}}, "model.task: stage reward"),
        ({"prompt": {"template": "alpaca"}}, "prompt.template: stage dpo renders"),
        ({"method": {"name": "full"}, "preference": {"reference": "adapter"}}, "preference.reference: adapter"),
        ({"preference": {"label_smoothing": 0.1, "loss": "ipo"}}, "preference.label_smoothing"),
        ({"stage": "simpo", "preference": {"reference": "copy"}}, "stage simpo uses no reference"),
        ({"eval": {"metrics": ["perplexity"]}}, "eval.metrics: perplexity not available for stage dpo"),
        ({"stage": "sft", "preference": {"beta": 0.2}}, "preference: applies to alignment stages"),
        (
            {"eval": {"metrics": ["win_rate"]}},
            r"eval.metrics: win_rate not available for stage dpo.*set eval.reward_model",
        ),
        ({"eval": {"metrics": ["win_rate"], "reward_model": "rm"}}, "eval.reward_model: 'rm': name a registered"),
        (
            {"stage": "grpo", "online": {"reward_function": "r.py:f"}, "eval": {"reward_model": "models:/rm@a"}},
            "eval.reward_model: judges dpo, kto, orpo and simpo policies; stage grpo is judged by online.reward_model",
        ),
        ({"stage": "rlhf"}, "stage: Input should be 'sft', 'reward', 'dpo', 'kto', 'orpo', 'simpo', 'grpo' or 'ppo'"),
        ({"stage": "ppo", "eval": {"metrics": ["mean_reward"]}}, "online.reward_function: ppo needs one source"),
        (
            {"stage": "grpo", "online": {"reward_function": "r.py:f", "ppo_epochs": 2}, "eval": {"metrics": ["kl"]}},
            "online.ppo_epochs: applies to stage ppo",
        ),
        (
            {
                "stage": "ppo",
                "online": {"reward_function": "r.py:f"},
                "train": {"batch_size": 4, "workers": 1, "deepspeed": {"stage": 3}},
                "eval": {"metrics": ["kl"]},
            },
            "train.deepspeed.stage: ppo samples completions inside each worker",
        ),
        (
            {"stage": "ppo", "online": {"reward_function": "r.py:f"}, "eval": {"metrics": ["preference_accuracy"]}},
            "eval.metrics: preference_accuracy not available for stage ppo",
        ),
        (
            {"stage": "grpo", "eval": {"metrics": ["mean_reward"]}},
            "online.reward_function: grpo needs one source of rewards",
        ),
        ({"online": {"group_size": 8}}, "online: applies to online RL"),
        (
            {"stage": "grpo", "online": {"reward_model": "hh-reward"}, "eval": {"metrics": ["mean_reward"]}},
            "online.reward_model: 'hh-reward': name a registered model as models:/NAME@ALIAS",
        ),
        (
            {"stage": "kto", "method": {"name": "full"}, "preference": {"reference": "precomputed"}},
            "preference.reference: precomputed log-probabilities are dpo's",
        ),
    ],
)
def test_impossible_stage_combinations_are_refused_by_name(tmp_path, change, message):
    config = preference_run(tmp_path, "dpo", PREFERENCE_DATA["hh_rlhf"])
    config.update(change)
    with pytest.raises(KftuneError, match=message):
        parse_config(config)


ALIGNMENT_RUNS = {
    "reward": [
        "stage=reward",
        "data.path=/data/hh/pairs.jsonl",
        "data.columns={}",
        "data.split.test=0.2",
        "prompt.template=preference",
        "eval.metrics=[preference_accuracy, reward_margin]",
        "registry.gate.metric=preference_accuracy",
    ],
    "ppo": [  # against the reward model a reward run registered
        "stage=ppo",
        "model.name_or_path=smollm2-135m-instruct",
        "model.task=causal_lm",
        "method.target_modules=all-linear",
        "data.path=/data/hh/prompts.jsonl",
        "data.columns={}",
        "data.split.test=0.2",
        "prompt.template=preference",
        "online.reward_model=models:/hh-reward@champion",
        "online.ppo_epochs=2",
        "eval.metrics=[mean_reward, win_rate, kl]",
        "registry.gate.metric=win_rate",
    ],
}


@pytest.mark.parametrize("stage", ALIGNMENT_RUNS)
def test_an_alignment_run_compiles_to_the_same_dag(tmp_path, stage):
    import subprocess
    import sys

    import yaml

    from conftest import CLUSTER_RUN_CONFIG
    from kftune.config import config_to_dict, load_config
    from test_pipeline_compile import LINEAGE, STEPS

    run = ALIGNMENT_RUNS[stage]
    out = tmp_path / "pipeline.yaml"
    overrides = [arg for item in run for arg in ("--set", item)]
    done = subprocess.run(
        [sys.executable, "-m", "kftune.cli", "compile", str(CLUSTER_RUN_CONFIG), *overrides, "-o", str(out)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    ir = next(yaml.safe_load_all(out.read_text()))
    assert sorted(ir["root"]["dag"]["tasks"]) == sorted(STEPS + list(LINEAGE))
    default = ir["root"]["inputDefinitions"]["parameters"]["config"]["defaultValue"]
    assert default["stage"] == stage and default == config_to_dict(load_config(CLUSTER_RUN_CONFIG, run))


def test_a_dpo_policy_judged_by_a_reward_model_may_be_gated_on_win_rate(tmp_path):
    config = preference_run(tmp_path, "dpo", PREFERENCE_DATA["hh_rlhf"])
    config["eval"] = {"metrics": ["preference_accuracy", "win_rate"], "reward_model": "models:/rm@champion"}
    config["registry"] = {**config["registry"], "gate": {"metric": "win_rate"}}
    assert parse_config(config).registry.gate.metric == "win_rate"


def test_under_zero3_without_peft_dpo_precomputes_its_reference_and_kto_copies_it_partitioned(tmp_path):
    from kftune.alignment.config import resolved_reference

    config = preference_run(tmp_path, "dpo", PREFERENCE_DATA["hh_rlhf"], method={"name": "full"})
    assert resolved_reference(parse_config(config)) == "copy"
    config["train"] = {**config["train"], "deepspeed": {"stage": 3}}
    assert resolved_reference(parse_config(config)) == "precomputed"
    # KTO cannot precompute (its mismatched pairs change): its frozen copy is partitioned too (kftune.train.partitioned)
    config = preference_run(tmp_path, "kto", PREFERENCE_DATA["hh_rlhf"], method={"name": "full"})
    config["train"] = {**config["train"], "deepspeed": {"stage": 3}}
    assert resolved_reference(parse_config(config)) == "copy"


def test_ppo_settings_out_of_range_are_named_at_once(tmp_path):
    online = {"reward_function": "r.py:f", "ppo_epochs": 0, "clip_range": -1, "lam": 2}
    with pytest.raises(KftuneError) as error:
        parse_config(preference_run(tmp_path, "ppo", PREFERENCE_DATA["hh_rlhf"], online=online))
    assert all(f"online.{field}:" in str(error.value) for field in ("ppo_epochs", "clip_range", "lam"))
