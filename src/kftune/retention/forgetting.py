"""How much a tuned model forgot of what its base knew, measured on held-out general text.

Causal LMs: perplexity on the general passages, and the likelihood of the base model's own greedy
answers to general prompts (a passage's first half): the tuned model should still find probable what
the base would have said. Encoders: how well the base's sentence-similarity structure survives (the
Spearman rank correlation of all pairwise cosine similarities of mean-pooled sentence embeddings,
before against after), and the masked-LM loss where the model has an MLM head.

`score` is the one number `registry.gate.max_forgetting` compares against (0 = nothing forgotten):
for causal LMs the rise of the per-token loss of the base's own answers (nats), for encoders 1 - the
rank correlation. Not the perplexity rise: general-text perplexity measures the text as much as the
model (tuning on instructions *lowers* it on English prose for a base trained on children's stories),
while the base's own answers are what it knew by construction, whatever its pre-training data was.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from kftune.prompts.collate import Collator
from kftune.prompts.packing import IGNORE_INDEX
from kftune.retention.embedding import sentence_embeddings, sentence_rows
from kftune.retention.general import language_model_rows
from kftune.retention.generated import base_answers
from kftune.train.losses import token_losses


@torch.no_grad()
def measure_forgetting(
    base, tuned, lines: list[str], tokenizer, task: str, max_length: int, batch_size: int
) -> dict[str, Any]:
    if task == "causal_lm":
        rows = language_model_rows(lines, tokenizer, task, max_length)
        before, after = (
            math.exp(mean_token_loss(m, rows, tokenizer.pad_token_id, task, batch_size)) for m in (base, tuned)
        )
        answers = base_answers(base, tokenizer, lines, max_length, batch_size)
        answer_loss = {
            name: mean_token_loss(m, answers, tokenizer.pad_token_id, task, batch_size)
            for name, m in (("base", base), ("tuned", tuned))
        }
        return {
            "metric": "general_perplexity",
            "base": before,
            "tuned": after,
            "change": after - before,
            "base_answer_loss": answer_loss,
            "lines": len(lines),
            "score": answer_loss["tuned"] - answer_loss["base"],
        }
    sentences = sentence_rows(lines, tokenizer, max_length)
    correlation = rank_correlation(
        pairwise_similarities(pooled_embeddings(base, sentences, tokenizer.pad_token_id, batch_size)),
        pairwise_similarities(pooled_embeddings(tuned, sentences, tokenizer.pad_token_id, batch_size)),
    )
    result = {
        "metric": "similarity_rank_correlation",
        "tuned": correlation,
        "lines": len(lines),
        "score": 1 - correlation,
    }
    if task == "masked_lm":
        rows = language_model_rows(lines, tokenizer, task, max_length)
        result["masked_lm_loss"] = {
            name: mean_token_loss(m, rows, tokenizer.pad_token_id, task, batch_size)
            for name, m in (("base", base), ("tuned", tuned))
        }
    return result


def mean_token_loss(model, rows: list[dict], pad_token_id: int, task: str, batch_size: int) -> float:
    """The mean loss per labelled token (next token, or the masked one) over `rows`."""
    collate = Collator(pad_token_id, task)
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in collate(rows[start : start + batch_size]).items()}
        total += token_losses(model, batch, task).sum().item()
        labels = batch["labels"] if task == "masked_lm" else batch["labels"][:, 1:]
        tokens += int((labels != IGNORE_INDEX).sum())
    return total / max(tokens, 1)


def pooled_embeddings(model, rows: list[dict], pad_token_id: int, batch_size: int) -> torch.Tensor:
    """`sentence_embeddings` of every row, batched, on the CPU."""
    collate = Collator(pad_token_id, "sequence_classification")
    device = next(model.parameters()).device
    pooled = []
    for start in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in collate(rows[start : start + batch_size]).items()}
        pooled.append(sentence_embeddings(model, batch).float().cpu())
    return torch.cat(pooled)


def pairwise_similarities(embeddings: torch.Tensor) -> torch.Tensor:
    """The cosine similarity of every pair of sentences (the upper triangle, flattened)."""
    normal = torch.nn.functional.normalize(embeddings, dim=-1)
    rows, columns = torch.triu_indices(len(normal), len(normal), offset=1)
    return (normal @ normal.T)[rows, columns]


def rank_correlation(first: torch.Tensor, second: torch.Tensor) -> float:
    """Spearman's rho: the Pearson correlation of the ranks."""
    ranks = [values.argsort().argsort().double() for values in (first, second)]
    centred = [r - r.mean() for r in ranks]
    return float((centred[0] * centred[1]).sum() / (centred[0].norm() * centred[1].norm()))


def forgetting_refusal(max_forgetting: float | None, evaluation: dict[str, Any]) -> str | None:
    """Why the gate refuses to promote a version that forgot more than `registry.gate.max_forgetting`, or None."""
    if max_forgetting is None:
        return None
    measured = evaluation.get("forgetting", {}).get("score")
    if measured is None:
        return "kept champion: registry.gate.max_forgetting is set but the evaluation measured no forgetting"
    if measured > max_forgetting:
        return f"kept champion: forgot too much (forgetting score {measured:.4f} > registry.gate.max_forgetting {max_forgetting})"
    return None
