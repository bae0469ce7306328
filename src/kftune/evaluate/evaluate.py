"""The evaluate step: score the tuned model and the base model on the same test split."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from kftune.config import RunConfig
from kftune.evaluate import metrics
from kftune.models import load_base_model, load_tuned_model, resolve_model_path
from kftune.prompts.build import IGNORE_INDEX, read_meta, read_prompts
from kftune.train.loop import Collator


def evaluate(config: RunConfig, prompts_dir: str | Path, model_dir: str | Path) -> dict[str, Any]:
    """{"tuned": {...}, "base": {...}} metrics on the test split, plus row counts and timings."""
    meta = read_meta(prompts_dir)
    rows = read_prompts(prompts_dir, "test")
    num_labels = len(meta["label_names"]) or None
    result: dict[str, Any] = {"split": "test", "rows": len(rows), "label_names": meta["label_names"]}
    models = {"tuned": lambda: load_tuned_model(model_dir)}
    if config.eval.compare_base:
        path = resolve_model_path(config.model.name_or_path)
        models["base"] = lambda: load_base_model(path, config.model.task, num_labels, config.train.seed).eval()
    for name, load in models.items():
        started = time.perf_counter()
        result[name] = score(load(), rows, config, meta["pad_token_id"], num_labels)
        result[name]["seconds"] = round(time.perf_counter() - started, 2)
    return result


@torch.no_grad()
def score(model, rows: list[dict], config: RunConfig, pad_token_id: int, num_labels: int | None) -> dict[str, Any]:
    collate = Collator(pad_token_id, config.model.task)
    size = config.eval.batch_size
    if config.model.task == "sequence_classification":
        labels, predictions = [], []
        for start in range(0, len(rows), size):
            batch = collate(rows[start : start + size])
            gold = batch.pop("labels")
            predictions += model(**batch).logits.argmax(dim=-1).tolist()
            labels += gold.tolist()
        matrix = metrics.confusion_matrix(labels, predictions, num_labels)
        return {"accuracy": metrics.accuracy(matrix), "macro_f1": metrics.macro_f1(matrix), "confusion_matrix": matrix}
    total_loss, total_tokens = 0.0, 0
    for start in range(0, len(rows), size):
        batch = collate(rows[start : start + size])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        logits = logits[:, -batch["labels"].shape[1] :]  # prompt-learning methods prepend virtual tokens
        targets = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="sum")
        total_loss += loss.item()
        total_tokens += int((targets != IGNORE_INDEX).sum())
    return {"perplexity": metrics.perplexity(total_loss, total_tokens), "tokens": total_tokens}
