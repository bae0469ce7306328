import json

from kftune.config import parse_config
from kftune.data.prepare import prepare, write_prepared
from kftune.models import load_tokenizer, resolve_model_path
from kftune.prompts.build import IGNORE_INDEX, build_prompts, preview_html, read_prompts
from kftune.prompts.templates import TEMPLATES

from conftest import STORIES


def test_templates_render_exact_strings():
    assert TEMPLATES["plain"].render({"text": "a fine film"}) == ("a fine film", "")
    prompt, target = TEMPLATES["alpaca"].render({"instruction": "Add.", "input": "2 and 3", "output": "5"})
    assert prompt.endswith("### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:\n") and target == "5"
    prompt, _ = TEMPLATES["alpaca"].render({"instruction": "Say hi.", "input": "", "output": "hi"})
    assert "### Input" not in prompt and prompt.startswith("Below is an instruction that describes a task. Write")
    assert TEMPLATES["alpaca"].fields == ["instruction", "output"]


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
    config = parse_config(make_config(
        model={"name_or_path": str(STORIES), "task": "causal_lm"},
        data={"path": str(source), "columns": {}, "split": {"test": 0.3}},
        prompt={"template": "alpaca", "max_length": 256},
        eval={"metrics": ["perplexity"]},
        registry={"gate": {"metric": "perplexity"}},
    ))
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
    return parse_config(make_config(
        model={"name_or_path": str(STORIES), "task": "causal_lm"},
        prompt={"template": "pet_sst2", "max_length": 96},
        eval={"metrics": ["accuracy", "macro_f1", "perplexity"]},
        **extra,
    ))


def test_pet_targets_are_the_label_words_and_scoring_matches_the_lm_loss(make_config, tmp_path):
    import torch

    from kftune.evaluate.evaluate import _verbalizer_predictions
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
    template = TEMPLATES["pet_sst2"]
    predicted = _verbalizer_predictions(model, rows, tokenizer, template, ["0", "1"])
    for row, label in zip(rows, predicted):  # independent check: the summed token loss of each full candidate
        prompt = tokenizer.decode(row["input_ids"][: row["labels"].count(IGNORE_INDEX)], skip_special_tokens=True)
        best = {}
        for name in ("0", "1"):
            for word in template.verbalizer[name]:
                prompt_ids = tokenizer(prompt)["input_ids"]
                full = tokenizer(prompt + word)["input_ids"]
                ids = torch.tensor([full])
                labels = torch.tensor([[IGNORE_INDEX] * len(prompt_ids) + full[len(prompt_ids):]])
                with torch.no_grad():
                    loss = model(input_ids=ids, labels=labels).loss.item() * (len(full) - len(prompt_ids))
                best[int(name)] = max(best.get(int(name), float("-inf")), -loss)
        assert label == max(best, key=best.get)


def test_verbalizer_must_cover_every_label(make_config, tmp_path):
    import pytest

    from kftune.errors import KftuneError

    source = tmp_path / "three.jsonl"
    source.write_text("".join(json.dumps({"sentence": f"row {i}", "label": i % 3}) + "\n" for i in range(9)))
    with pytest.raises(KftuneError, match="prompt.template: the verbalizer of 'pet_sst2' has no words for label\\(s\\) 2"):
        prepare(pet_config(make_config, data={"path": str(source), "split": {"test": 0.3}}))
