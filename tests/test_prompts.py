import json

import pytest

from conftest import STORIES
from kftune.config import parse_config
from kftune.data.prepare import prepare, write_prepared
from kftune.models import load_tokenizer, resolve_model_path
from kftune.prompts.build import IGNORE_INDEX, build_prompts, preview_html, read_prompts
from kftune.prompts.templates import get_template


def test_templates_render_exact_strings():
    assert get_template("plain").render({"text": "a fine film"}) == [("a fine film", False), ("", True)]
    assert get_template("text").render({"text": "Once upon a time."}) == [("", False), ("Once upon a time.", True)]
    [(prompt, _), (target, _)] = get_template("alpaca").render(
        {"instruction": "Add.", "input": "2 and 3", "output": "5"}
    )
    assert prompt.endswith("### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:\n") and target == "5"
    [(prompt, _), _] = get_template("alpaca").render({"instruction": "Say hi.", "input": "", "output": "hi"})
    assert prompt == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSay hi.\n\n### Response:\n"
    )
    assert get_template("alpaca").fields == ["instruction", "output"]
    assert get_template("pet_sst2").render({"text": "a fine film"}, "1") == [
        ("Review: a fine film\nSentiment:", False),
        (" positive", True),
    ]
    assert get_template("pet_sst2_mlm").render({"text": "a fine film"}, "0") == [
        ("a fine film It was [MASK].", False),
        ("terrible", True),
    ]
    assert get_template("pet_chnsenticorp").render({"text": "房间很干净"}, "1") == [
        ("评论：房间很干净\n情感：", False),
        ("正面", True),
    ]
    assert get_template("cot").render({"question": "2+3?", "answer": "5", "rationale": ""}) == [
        ("Question: 2+3?\nAnswer:", False),
        (" 5", True),
    ]
    assert get_template("cot").render({"question": "2+3?", "answer": "5", "rationale": "Two plus three is five."}) == [
        ("Question: 2+3?\nAnswer:", False),
        (" Two plus three is five. So the answer is 5.", True),
    ]
    entail = get_template("entail_sst2")
    question = "Premise: dull .\nHypothesis: The review is {}.\nDoes the premise entail the hypothesis? Answer:"
    assert entail.render({"text": "dull ."}, "0", hypothesis="0") == [
        (question.format("negative"), False),
        (" yes", True),
    ]
    assert entail.render({"text": "dull ."}, "0", hypothesis="1") == [
        (question.format("positive"), False),
        (" no", True),
    ]


def test_five_field_instruction_renders_every_field_before_the_prompt():
    assert get_template("instruct_sst2").render({"text": "fine ."}, "1") == [
        (
            "Title: Sentiment of a movie review\n"
            "Definition: Read a sentence from a movie review and say whether the reviewer liked the film.\n"
            "Things to avoid: Do not judge the film yourself; answer with one word, positive or negative.\n"
            "Positive example:\nInput: a gorgeous , witty , seductive movie .\nOutput: positive\nExplanation: The reviewer praises the film.\n"
            "Negative example:\nInput: the plot is nothing but boilerplate clichés .\nOutput: great\nExplanation: Answer positive or negative, nothing else.\n"
            "Prompt: Is the review positive or negative?\n\n"
            "Input: fine .\nOutput:",
            False,
        ),
        (" positive", True),
    ]


def test_few_shot_demonstrations_come_before_the_query():
    demos = [{"text": "dull .", "label_name": "0"}, {"text": "lovely .", "label_name": "1"}]
    assert get_template("pet_sst2").render({"text": "fine ."}, "1", demos) == [
        (
            "Review: dull .\nSentiment: negative\n\nReview: lovely .\nSentiment: positive\n\nReview: fine .\nSentiment:",
            False,
        ),
        (" positive", True),
    ]


def test_classification_rows_tokenize_and_count_truncation(make_config, tmp_path):
    config = parse_config(make_config(prompt={"max_length": 8}))
    write_prepared(prepare(config), tmp_path / "data")
    meta = build_prompts(config, tmp_path / "data", tmp_path / "prompts")
    rows = read_prompts(tmp_path / "prompts", "train")
    tokenizer = load_tokenizer(resolve_model_path("minilm-l6"))
    first = json.loads((tmp_path / "data" / "train.jsonl").read_text().splitlines()[0])
    expected = tokenizer(first["text"], truncation=True, max_length=8)["input_ids"]
    assert rows[0]["input_ids"] == expected and rows[0]["labels"] == first["label"]
    assert all(len(r["input_ids"]) <= 8 for r in rows)
    assert meta["splits"]["train"]["rows"] == 64 and meta["splits"]["train"]["truncated"] > 0
    assert first["text"] in preview_html(meta)


def test_causal_lm_loss_covers_the_response_only(make_config, tmp_path):
    source = tmp_path / "alpaca.jsonl"
    records = [{"instruction": f"Name animal {i}.", "input": "", "output": "A cat."} for i in range(6)]
    records.append({"instruction": "Too long.", "input": "", "output": "word " * 400})
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = parse_config(
        make_config(
            model={"name_or_path": str(STORIES), "task": "causal_lm"},
            data={"path": str(source), "columns": {}, "split": {"test": 0.3}},
            prompt={"template": "alpaca", "max_length": 256},
            eval={"metrics": ["perplexity"]},
            registry={"gate": {"metric": "perplexity"}},
        )
    )
    write_prepared(prepare(config), tmp_path / "data")
    meta = build_prompts(config, tmp_path / "data", tmp_path / "prompts")
    tokenizer = load_tokenizer(STORIES)
    dropped = sum(split.get("dropped_too_long", 0) for split in meta["splits"].values())
    assert dropped == 1  # the over-long answer is dropped and counted, never cut
    for row in read_prompts(tmp_path / "prompts", "train") + read_prompts(tmp_path / "prompts", "test"):
        prompt_len = row["labels"].count(IGNORE_INDEX)
        assert row["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
        assert row["labels"][prompt_len:] == row["input_ids"][prompt_len:]
        assert tokenizer.decode(row["input_ids"][prompt_len:], skip_special_tokens=True).strip() == "A cat."
        assert row["input_ids"][-1] == tokenizer.eos_token_id


def pet_config(make_config, **extra):
    return parse_config(
        make_config(
            model={"name_or_path": str(STORIES), "task": "causal_lm"},
            prompt={"template": "pet_sst2", "max_length": 96},
            eval={"metrics": ["accuracy", "macro_f1", "perplexity"]},
            **extra,
        )
    )


def test_pet_targets_are_the_label_words_and_scoring_matches_the_lm_loss(make_config, tmp_path):
    import torch

    from kftune.evaluate.evaluate import label_predictions
    from kftune.models import load_base_model

    config = pet_config(make_config)
    write_prepared(prepare(config), tmp_path / "data")
    build_prompts(config, tmp_path / "data", tmp_path / "prompts")
    tokenizer = load_tokenizer(STORIES)
    rows = read_prompts(tmp_path / "prompts", "test")[:6]
    for row in rows:
        prompt_len = row["labels"].count(IGNORE_INDEX)
        word = tokenizer.decode(row["input_ids"][prompt_len:], skip_special_tokens=True)
        assert word.strip() == ["negative", "positive"][row["class_label"]]
        assert tokenizer.decode(row["input_ids"][:prompt_len], skip_special_tokens=True).startswith("Review: ")

    model = load_base_model(STORIES, "causal_lm", None, 0).eval()
    template = get_template("pet_sst2")
    _, predicted = label_predictions(model, rows, tokenizer, template, ["0", "1"], "causal_lm", batch_size=4)
    for row, label in zip(
        rows, predicted, strict=False
    ):  # independent check: the summed token loss of each full candidate
        prompt = tokenizer.decode(row["input_ids"][: row["labels"].count(IGNORE_INDEX)], skip_special_tokens=True)
        best = {}
        for name in ("0", "1"):
            for word in template.verbalizer[name]:
                prompt_ids = tokenizer(prompt)["input_ids"]
                full = tokenizer(prompt + word)["input_ids"]
                ids = torch.tensor([full])
                labels = torch.tensor([[IGNORE_INDEX] * len(prompt_ids) + full[len(prompt_ids) :]])
                with torch.no_grad():
                    loss = model(input_ids=ids, labels=labels).loss.item() * (len(full) - len(prompt_ids))
                best[int(name)] = max(best.get(int(name), float("-inf")), -loss)
        assert label == max(best, key=best.get)


def test_perplexity_is_computed_only_when_listed(make_config, tmp_path, monkeypatch):
    import math

    import torch

    from kftune.evaluate import evaluate
    from kftune.models import load_base_model

    config = pet_config(make_config)  # eval.metrics lists perplexity
    write_prepared(prepare(config), tmp_path / "data")
    build_prompts(config, tmp_path / "data", tmp_path / "prompts")
    rows = read_prompts(tmp_path / "prompts", "test")[:8]
    model, tokenizer = load_base_model(STORIES, "causal_lm", None, 0).eval(), load_tokenizer(STORIES)
    passes = []
    lm_loss = evaluate._lm_loss
    monkeypatch.setattr(evaluate, "_lm_loss", lambda *args: passes.append(args) or lm_loss(*args))
    asked = evaluate.score(model, rows, config, tokenizer, ["0", "1"])
    unlisted = config.model_copy(update={"eval": config.eval.model_copy(update={"metrics": ["accuracy", "macro_f1"]})})
    not_asked = evaluate.score(model, rows, unlisted, tokenizer, ["0", "1"])
    assert len(passes) == 1 and {"perplexity", "tokens"}.isdisjoint(not_asked)
    assert not_asked["accuracy"] == asked["accuracy"]
    with torch.no_grad():  # independently: the mean next-token loss over the target tokens (label word + EOS)
        counts = [sum(label != IGNORE_INDEX for label in r["labels"][1:]) for r in rows]
        losses = [
            model(input_ids=torch.tensor([r["input_ids"]]), labels=torch.tensor([r["labels"]])).loss.item()
            for r in rows
        ]
    assert asked["tokens"] == sum(counts)
    assert asked["perplexity"] == pytest.approx(
        math.exp(sum(loss * n for loss, n in zip(losses, counts, strict=False)) / sum(counts)), rel=1e-5
    )


def test_verbalizer_must_cover_every_label(make_config, tmp_path):
    from kftune.errors import KftuneError

    source = tmp_path / "three.jsonl"
    source.write_text("".join(json.dumps({"sentence": f"row {i}", "label": i % 3}) + "\n" for i in range(9)))
    with pytest.raises(
        KftuneError, match=r"prompt.template: the verbalizer of 'pet_sst2' has no words for label\(s\) 2"
    ):
        prepare(pet_config(make_config, data={"path": str(source), "split": {"test": 0.3}}))
