"""Preference rows into token ids, for the build_prompts step. The run's template renders the dialogue
before the response (its chat template, or a plain one with `{prompt}` and `{response}` slots); the
response alone carries labels. A row whose prompt alone exceeds `prompt.max_length`, or whose
prompt and response do not fit, is dropped and counted, never cut."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from kftune.data.prepare import SPLITS, read_split
from kftune.models import load_tokenizer, resolve_model_path
from kftune.prompts.build import IGNORE_INDEX, META_FILE, PREVIEW_ROWS, _bucket, encode, write_split
from kftune.prompts.templates import Segment, Template, chat_segments, resolve_template

REWARD_LABELS = ["reward"]
"""A reward model's one output: the head is built with one label, the scalar reward."""
SPEAKERS = {"user": "Human", "assistant": "Assistant", "system": "System"}


def build_preference_prompts(config, data_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Tokenize every split of prepared preference data into `out_dir`; returns the metadata written
    (the same keys as SFT's, plus `stage`)."""
    template = resolve_template(config.prompt.template)
    tokenizer = load_tokenizer(resolve_model_path(config.model.name_or_path))
    data_card = json.loads((Path(data_dir) / "data_card.json").read_text())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stats, preview = {}, []
    for split in SPLITS:
        counts: Counter = Counter()
        encoded_rows = []
        for row in read_split(data_dir, split):
            encoded, segments = encode_preference(row, template, tokenizer, config.prompt.max_length, counts)
            if encoded is None:
                continue
            encoded_rows.append({**encoded, "source": row["source"]})
            counts["rows"] += 1
            tokens = max(len(ids) for key, ids in encoded.items() if key.endswith("input_ids"))
            counts[f"tokens_{_bucket(tokens)}"] += 1
            if split == "train" and len(preview) < PREVIEW_ROWS:
                preview.append({"segments": segments, "tokens": tokens})
        write_split(out, split, encoded_rows)
        stats[split] = dict(counts)
    meta = {
        "task": config.model.task,
        "stage": config.stage,
        "template": template.name,
        "max_length": config.prompt.max_length,
        "few_shot": 0,
        "label_names": REWARD_LABELS if config.stage == "reward" else [],
        "dataset_sha256": data_card["dataset_sha256"],
        "pad_token_id": tokenizer.pad_token_id,
        "splits": stats,
        "packing": None,
        "preview": preview,
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False))
    return meta


def encode_preference(
    row: dict[str, Any], template: Template, tokenizer, max_length: int, counts: Counter
) -> tuple[dict | None, list[Segment]]:
    """A prepared row's token ids: chosen_*/rejected_* for a pair, input_ids/labels plus `desirable`
    and `prompt_length` for feedback, the prompt's input_ids alone for a prompt. None when dropped."""
    prompt_segments = render_prompt(template, tokenizer, row["prompt"])
    prompt_ids = tokenizer("".join(text for text, _ in prompt_segments), add_special_tokens=not template.chat)
    if len(prompt_ids["input_ids"]) > max_length:
        counts["dropped_prompt_too_long"] += 1
        return None, prompt_segments
    if set(row) <= {"prompt", "source"}:
        return {"input_ids": prompt_ids["input_ids"]}, prompt_segments
    responses = {"chosen": row["chosen"], "rejected": row["rejected"]} if "chosen" in row else {"": row["completion"]}
    encoded, shown = {}, None
    for name, response in responses.items():
        segments = render_response(template, tokenizer, row["prompt"], response)
        ids = encode("causal_lm", tokenizer, segments, max_length, template, Counter())
        if ids is None:
            counts["dropped_too_long"] += 1
            return None, segments
        encoded.update({f"{name}_{key}" if name else key: value for key, value in ids.items()})
        shown = shown or segments
    if "label" in row:
        prompt_length = next(i for i, label in enumerate(encoded["labels"]) if label != IGNORE_INDEX)
        encoded.update(desirable=int(row["label"]), prompt_length=prompt_length)
    return encoded, shown


def render_prompt(template: Template, tokenizer, turns: list[dict[str, str]]) -> list[Segment]:
    """The dialogue before the response, up to where the response starts (nothing trained)."""
    if template.chat:
        return [(tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True), False)]
    return [(render_response(template, tokenizer, turns, "")[0][0], False)]


def render_response(template: Template, tokenizer, turns: list[dict[str, str]], response: str) -> list[Segment]:
    """The dialogue and one response; only the response is trained on (earlier assistant turns are context)."""
    if template.chat:
        segments = chat_segments(tokenizer, [*turns, {"role": "assistant", "content": response}])
        last = max(i for i, (_, trained) in enumerate(segments) if trained)
        return [(text, i == last) for i, (text, _) in enumerate(segments)]
    dialogue = "\n\n".join(f"{SPEAKERS[turn['role']]}: {turn['content']}" for turn in turns)
    prompt, target = template._pair({"prompt": dialogue, "response": response}, None, None)
    return [(prompt, False), (target, True)]
