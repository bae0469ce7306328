"""The build_prompts step: render each row through its template and tokenize it for training.

Classification rows keep their integer label; causal-LM rows carry per-token labels where the
prompt part is -100, so the loss covers the response only. Nothing is cut silently: truncated and
dropped rows are counted in `prompts_meta.json` and in the preview.
"""

from __future__ import annotations

import html
import json
from collections import Counter
from pathlib import Path
from typing import Any

from kftune.config import RunConfig
from kftune.data.prepare import SPLITS, read_split
from kftune.models import load_tokenizer, resolve_model_path
from kftune.prompts.templates import TEMPLATES

IGNORE_INDEX = -100
META_FILE = "prompts_meta.json"
PREVIEW_ROWS = 8


def build_prompts(config: RunConfig, data_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Tokenize every split of a prepared dataset into `out_dir`; returns the metadata written."""
    template = TEMPLATES[config.prompt.template]
    tokenizer = load_tokenizer(resolve_model_path(config.model.name_or_path))
    data_card = json.loads((Path(data_dir) / "data_card.json").read_text())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stats: dict[str, Counter] = {}
    preview: list[dict[str, Any]] = []
    for split in SPLITS:
        counts: Counter = Counter()
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as handle:
            for row in read_split(data_dir, split):
                label_name = data_card["label_names"][row["label"]] if template.labelled else None
                prompt, target = template.render(row, label_name)
                encoded = _encode(config, tokenizer, prompt, target, row, counts)
                if encoded is None:
                    continue
                handle.write(json.dumps(encoded) + "\n")
                counts["rows"] += 1
                counts[f"tokens_{_bucket(len(encoded['input_ids']))}"] += 1
                if split == "train" and len(preview) < PREVIEW_ROWS:
                    preview.append({"prompt": prompt, "target": target if target else data_card["label_names"][row["label"]], "tokens": len(encoded["input_ids"])})
        stats[split] = counts
    meta = {
        "task": config.model.task,
        "template": template.name,
        "max_length": config.prompt.max_length,
        "label_names": data_card["label_names"],
        "dataset_sha256": data_card["dataset_sha256"],
        "pad_token_id": tokenizer.pad_token_id,
        "splits": {split: dict(counts) for split, counts in stats.items()},
        "preview": preview,
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False))
    return meta


def _encode(config: RunConfig, tokenizer, prompt: str, target: str, row: dict, counts: Counter) -> dict | None:
    max_length = config.prompt.max_length
    if config.model.task == "sequence_classification":
        ids = tokenizer(prompt, truncation=False)["input_ids"]
        if len(ids) > max_length:
            counts["truncated"] += 1
            ids = tokenizer(prompt, truncation=True, max_length=max_length)["input_ids"]
        return {"input_ids": ids, "labels": row["label"], "source": row["source"]}
    prompt_ids = tokenizer(prompt)["input_ids"] if prompt else [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    target_ids = continuation_ids(tokenizer, prompt, prompt_ids, target) + [tokenizer.eos_token_id]
    if len(prompt_ids) + len(target_ids) > max_length:
        counts["dropped_too_long"] += 1  # cutting would remove (part of) the answer the model must learn
        return None
    encoded = {"input_ids": prompt_ids + target_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + target_ids, "source": row["source"]}
    if "label" in row:
        encoded["class_label"] = row["label"]
    return encoded


def continuation_ids(tokenizer, prompt: str, prompt_ids: list[int], text: str) -> list[int]:
    """Token ids of `text` as it continues `prompt`. Tokenized together, so a word such as " great"
    gets the ids it has after the prompt (SentencePiece merges the leading space differently alone)."""
    if prompt:
        joint = tokenizer(prompt + text)["input_ids"]
        if joint[: len(prompt_ids)] == prompt_ids and len(joint) > len(prompt_ids):
            return joint[len(prompt_ids) :]
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _bucket(n_tokens: int, width: int = 16) -> str:
    low = (n_tokens - 1) // width * width + 1
    return f"{low:04d}-{low + width - 1:04d}"


def read_prompts(prompts_dir: str | Path, split: str) -> list[dict[str, Any]]:
    with open(Path(prompts_dir) / f"{split}.jsonl", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def read_meta(prompts_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(prompts_dir) / META_FILE).read_text())


def preview_html(meta: dict[str, Any]) -> str:
    """First rendered rows, token-length histogram and truncation counts, for the KFP UI."""
    rows = "".join(
        f"<tr><td><pre>{html.escape(r['prompt'])}</pre></td><td><pre>{html.escape(str(r['target']))}</pre></td><td>{r['tokens']}</td></tr>"
        for r in meta["preview"]
    )
    stats = "".join(
        f"<tr><td>{split}</td><td>{c.get('rows', 0)}</td><td>{c.get('truncated', 0)}</td><td>{c.get('dropped_too_long', 0)}</td></tr>"
        for split, c in meta["splits"].items()
    )
    train = meta["splits"]["train"]
    buckets = sorted((k.removeprefix("tokens_"), v) for k, v in train.items() if k.startswith("tokens_"))
    peak = max((v for _, v in buckets), default=1)
    bars = "".join(
        f"<tr><td>{span}</td><td><div style='background:#4a7bd0;height:12px;width:{300 * v // peak}px'></div></td><td>{v}</td></tr>"
        for span, v in buckets
    )
    return (
        f"<html><body style='font-family:sans-serif'><h2>Prompts: template <code>{meta['template']}</code>, max {meta['max_length']} tokens</h2>"
        f"<table border=1 cellpadding=4><tr><th>split</th><th>rows</th><th>truncated</th><th>dropped (too long)</th></tr>{stats}</table>"
        f"<h3>Tokens per training row</h3><table>{bars}</table>"
        f"<h3>First rows</h3><table border=1 cellpadding=4><tr><th>prompt</th><th>target</th><th>tokens</th></tr>{rows}</table>"
        "</body></html>"
    )
