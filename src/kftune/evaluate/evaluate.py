"""The evaluate step: score the tuned model and the base model on the same test split, and measure
forgetting on general text.

Forgetting is measured on held-out general text (`kftune.retention.forgetting`): perplexity and the
likelihood of the base's own answers for causal LMs, the survival of the base's sentence-similarity
structure for encoders.

The scoring functions run wherever the model's parameters are (`eval.device`, `eval.precision`
place it); serving calls the same ones. Inside `evaluate`, each pass over the rows prints a progress line.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import inspect
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from kftune.config import EvalSection, RunConfig
from kftune.errors import KftuneError
from kftune.evaluate import metrics
from kftune.models import load_base_model, load_tokenizer, load_tuned_model, resolve_model_path
from kftune.prompts.build import IGNORE_INDEX, continuation_ids, read_meta, read_prompts, single_token_id
from kftune.prompts.collate import Collator
from kftune.prompts.templates import Template, resolve_template
from kftune.retention.forgetting import measure_forgetting
from kftune.retention.general import held_out_lines
from kftune.train.losses import next_token_losses
from kftune.train.progress import ProgressLine

GENERATION_METRICS = {"exact_match": metrics.exact_match, "rouge_l": metrics.rouge_l, "bleu": metrics.bleu}
_PROGRESS_LABEL: contextvars.ContextVar[str | None] = contextvars.ContextVar("evaluation_progress", default=None)


def placement(settings: EvalSection) -> tuple[torch.device, torch.dtype]:
    """The device and dtype `eval.device` and `eval.precision` ask for, on this machine."""
    has_gpu = torch.cuda.is_available()
    if settings.device == "cuda" and not has_gpu:
        raise KftuneError(
            "eval.device: cuda, but no CUDA GPU is visible here (give the evaluate step a GPU, or use auto or cpu)"
        )
    device = torch.device("cuda" if settings.device == "cuda" or (settings.device == "auto" and has_gpu) else "cpu")
    precision = settings.precision
    if precision == "auto":
        precision = "fp32" if device.type == "cpu" else "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16" and device.type == "cpu":
        raise KftuneError("eval.precision: fp16 needs a GPU; on the CPU use fp32 or bf16")
    return device, {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def place(model, settings: EvalSection):
    """The model where `eval.device`/`eval.precision` ask, in eval mode. A quantized (QLoRA) base stays
    where it was loaded (bitsandbytes weights cannot move or change dtype); its float parameters are cast."""
    from kftune.models import cast_floating_parameters

    device, dtype = placement(settings)
    if getattr(model, "is_quantized", False):
        return cast_floating_parameters(model, dtype).eval()
    return model.to(device=device, dtype=dtype).eval()


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def on_device(model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A collated batch moved to where the model runs."""
    device = model_device(model)
    return {k: v.to(device) for k, v in batch.items()}


@contextlib.contextmanager
def progress(label: str):
    """Inside, each pass over rows prints a progress line under `label` (evaluate's passes; serving prints none)."""
    token = _PROGRESS_LABEL.set(label)
    try:
        yield
    finally:
        _PROGRESS_LABEL.reset(token)


def batched(rows: list, size: int) -> Iterator[list]:
    label = _PROGRESS_LABEL.get()
    line = ProgressLine(len(rows), label=label, unit="rows") if label and rows else None
    for start in range(0, len(rows), size):
        yield rows[start : start + size]
        if line:
            line.update(min(start + size, len(rows)))


def evaluate(config: RunConfig, prompts_dir: str | Path, model_dir: str | Path) -> dict[str, Any]:
    """{"tuned": {...}, "base": {...}, "forgetting": {...}} on the test split, plus row counts and timings."""
    if config.stage != "sft":
        from kftune.alignment.evaluate import evaluate_alignment

        return evaluate_alignment(config, prompts_dir, model_dir)
    meta = read_meta(prompts_dir)
    rows = read_prompts(prompts_dir, "test")
    num_labels = len(meta["label_names"]) or None
    result: dict[str, Any] = {
        "split": "test",
        "rows": len(rows),
        "split_sha256": hashlib.sha256((Path(prompts_dir) / "test.jsonl").read_bytes()).hexdigest(),
        "label_names": meta["label_names"],
    }
    device, dtype = placement(config.eval)
    result["device"], result["dtype"] = str(device), str(dtype).removeprefix("torch.")
    base_path = resolve_model_path(config.model.name_or_path)
    tokenizer = load_tokenizer(base_path)
    models = {"tuned": place(load_tuned_model(model_dir), config.eval)}
    if config.eval.compare_base or config.eval.forgetting:
        models["base"] = place(
            load_base_model(
                base_path, config.model.task, num_labels, config.train.seed, config.model.attn_implementation
            ),
            config.eval,
        )
    for name, model in models.items():
        if name == "base" and not config.eval.compare_base:
            continue
        started = time.perf_counter()
        with progress(f"evaluate {name}"):
            result[name] = score(model, rows, config, tokenizer, meta["label_names"])
        result[name]["seconds"] = round(time.perf_counter() - started, 2)
    if config.eval.forgetting:
        started = time.perf_counter()
        result["forgetting"] = measure_forgetting(
            models["base"],
            models["tuned"],
            held_out_lines(config.eval.general_text),
            tokenizer,
            config.model.task,
            config.prompt.max_length,
            config.eval.batch_size,
        )
        result["forgetting"]["seconds"] = round(time.perf_counter() - started, 2)
    return result


@torch.no_grad()
def score(model, rows: list[dict], config: RunConfig, tokenizer, label_names: list[str]) -> dict[str, Any]:
    size = config.eval.batch_size
    if config.model.task == "sequence_classification":
        predictions = class_logits(model, rows, tokenizer.pad_token_id, size).argmax(dim=-1).tolist()
        matrix = metrics.confusion_matrix([r["labels"] for r in rows], predictions, len(label_names))
        return {"accuracy": metrics.accuracy(matrix), "macro_f1": metrics.macro_f1(matrix), "confusion_matrix": matrix}
    template = resolve_template(config.prompt.template)
    scores: dict[str, Any] = {}
    if "perplexity" in config.eval.metrics:  # a pass over every test row: only when asked for
        collate = Collator(tokenizer.pad_token_id, config.model.task)
        loss, tokens = _lm_loss(
            model, [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows], collate, size
        )
        scores.update(perplexity=metrics.perplexity(loss, tokens), tokens=tokens)
    if template.labelled:
        gold, predictions = label_predictions(model, rows, tokenizer, template, label_names, config.model.task, size)
        matrix = metrics.confusion_matrix(gold, predictions, len(label_names))
        scores.update(accuracy=metrics.accuracy(matrix), macro_f1=metrics.macro_f1(matrix), confusion_matrix=matrix)
    wanted = [m for m in config.eval.metrics if m in GENERATION_METRICS]
    if wanted:
        generated, references = generate(
            model, rows[: config.eval.generate_rows], tokenizer, config.eval.max_new_tokens, size
        )
        scores.update({m: GENERATION_METRICS[m](generated, references) for m in wanted})
        scores["samples"] = [
            {"generated": g, "reference": r} for g, r in list(zip(generated, references, strict=False))[:5]
        ]
    return scores


@torch.no_grad()
def class_logits(model, rows: list[dict], pad_token_id: int, batch_size: int) -> torch.Tensor:
    """The classification head's logits for encoded rows (evaluation and serving)."""
    collate = Collator(pad_token_id, "sequence_classification")
    logits = []
    for chunk in batched(rows, batch_size):
        batch = on_device(model, collate([{"input_ids": r["input_ids"], "labels": 0} for r in chunk]))
        logits.append(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float().cpu())
    return torch.cat(logits)


def label_predictions(
    model, rows: list[dict], tokenizer, template: Template, label_names: list[str], task: str, batch_size: int
) -> tuple[list[int], list[int]]:
    """(gold, predicted) class ids by the template's words: per example, the label that scores highest."""
    scores = label_scores(model, rows, tokenizer, template, label_names, task, batch_size)
    gold = {row.get("group", i): row["class_label"] for i, row in enumerate(rows)}  # one per example
    return list(gold.values()), [max(range(len(label_names)), key=s.__getitem__) for s in scores]


def label_scores(
    model, rows: list[dict], tokenizer, template: Template, label_names: list[str], task: str, batch_size: int
) -> list[list[float]]:
    """Per example, per label (evaluation and serving): PET, the log-likelihood of the label's best word
    (after the prompt, or at the [MASK] slot); entailment, log p(yes) - log p(no) for the label's
    hypothesis (rows of one example share its `group`; a dropped hypothesis row scores -inf)."""
    if template.hypotheses is None:
        return word_scores(
            model, rows, tokenizer, [template.verbalizer[name] for name in label_names], task, batch_size
        )
    answers = word_scores(model, rows, tokenizer, [template.answers["yes"], template.answers["no"]], task, batch_size)
    margins: dict[int, list[float]] = {}
    for row, (yes, no) in zip(rows, answers, strict=False):
        margins.setdefault(row["group"], [-math.inf] * len(label_names))[row["hypothesis_label"]] = yes - no
    return list(margins.values())


@torch.no_grad()
def word_scores(
    model, rows: list[dict], tokenizer, word_lists: list[list[str]], task: str, batch_size: int
) -> list[list[float]]:
    """Per row, per word list: the best log-likelihood of one of its words where the answer goes (after the
    prompt, the -100-labelled prefix, for causal LMs; at the [MASK] slot for masked LMs). One forward per
    batch of rows scores every single-token word; a longer word (causal LMs only) gets its own candidate."""
    collate = Collator(tokenizer.pad_token_id, "causal_lm")
    results = []
    for chunk in batched(rows, batch_size):
        if task == "masked_lm":
            inputs = [r["input_ids"] for r in chunk]
            slots = [r["input_ids"].index(tokenizer.mask_token_id) for r in chunk]
            shared = [[[single_token_id(tokenizer, w)] for w in ws] for ws in word_lists]
            words = [shared] * len(chunk)
        else:
            inputs = [r["input_ids"][: r["labels"].count(IGNORE_INDEX)] for r in chunk]
            slots = [len(ids) - 1 for ids in inputs]
            prompts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in inputs]
            words = [
                [[continuation_ids(tokenizer, p, ids, w) for w in ws] for ws in word_lists]
                for p, ids in zip(prompts, inputs, strict=False)
            ]
        batch = on_device(model, collate([{"input_ids": ids, "labels": ids} for ids in inputs]))
        log_probs = torch.log_softmax(_slot_logits(model, batch, slots).float(), dim=-1).cpu()
        for i, row_words in enumerate(words):
            longer = [
                {"input_ids": inputs[i] + ids, "labels": [IGNORE_INDEX] * len(inputs[i]) + ids}
                for ws in row_words
                for ids in ws
                if len(ids) > 1
            ]
            longer_scores = iter(
                (-next_token_losses(model, on_device(model, collate(longer))).sum(dim=1)).tolist() if longer else []
            )
            results.append(
                [
                    max(log_probs[i, ids[0]].item() if len(ids) == 1 else next(longer_scores) for ids in ws)
                    for ws in row_words
                ]
            )
    return results


def _slot_logits(model, batch: dict[str, torch.Tensor], slots: list[int]) -> torch.Tensor:
    """Each row's logits at its slot. A model that takes `logits_to_keep` (transformers' causal LMs) projects
    only the batch's slot positions onto the vocabulary, not every position (16 rows of 512 tokens at
    Llama-3's vocabulary: 2 GB of bf16 logits); masked LMs give them all. Positions count from the end:
    prompt-learning methods prepend virtual tokens."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    length, rows = batch["input_ids"].shape[1], torch.arange(len(slots))
    if _takes_logits_to_keep(model):
        kept = sorted(set(slots))
        positions = torch.tensor([slot - length for slot in kept], device=batch["input_ids"].device)
        logits = model(**inputs, logits_to_keep=positions).logits
        return logits[rows, [kept.index(slot) for slot in slots]]
    return model(**inputs).logits[:, -length:][rows, slots]


def _takes_logits_to_keep(model) -> bool:
    inner = getattr(model, "module", model)
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner  # under PEFT
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def _lm_loss(model, rows: list[dict], collate: Collator, size: int) -> tuple[float, int]:
    """Summed next-token loss over labelled positions, and their count."""
    total_loss, total_tokens = 0.0, 0
    for chunk in batched(rows, size):
        batch = on_device(model, collate(chunk))
        total_loss += next_token_losses(model, batch).sum().item()
        total_tokens += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return total_loss, total_tokens


@torch.no_grad()
def generate(
    model, rows: list[dict], tokenizer, max_new_tokens: int, batch_size: int = 16
) -> tuple[list[str], list[str]]:
    """Greedy continuations of each row's prompt (its -100-labelled prefix) and the reference answers
    (evaluation and serving)."""
    prompts = [row["input_ids"][: row["labels"].count(IGNORE_INDEX)] for row in rows]
    continuations = greedy_token_ids(model, prompts, tokenizer, max_new_tokens, batch_size)
    generated = [text.strip() for text in tokenizer.batch_decode(continuations, skip_special_tokens=True)]
    references = [
        tokenizer.decode(row["input_ids"][len(p) :], skip_special_tokens=True).strip()
        for row, p in zip(rows, prompts, strict=True)
    ]
    return generated, references


@torch.no_grad()
def greedy_token_ids(
    model, prompts: list[list[int]], tokenizer, max_new_tokens: int, batch_size: int = 16
) -> list[list[int]]:
    """Each prompt's greedy continuation: a batch at a time, padded on the left so every row continues from
    its last prompt token, with the KV cache (training runs may have switched it off in the config)."""
    continuations = []
    device = model_device(model)
    for chunk in batched(prompts, batch_size):
        width = max(map(len, chunk))
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        output = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        continuations += output[:, width:].tolist()
    return continuations
