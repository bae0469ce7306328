"""Validation during training (`train.eval_every_steps`): the loss on the validation split, and the
accuracy for a classification head, with every worker scoring its share of the rows; and which
evaluation was best (`train.keep_best`) or whether to stop early (`train.patience`)."""

from __future__ import annotations

import math
from typing import Any

import torch

from kftune.train.engines import mixed_precision
from kftune.train.losses import loss_items, summed_loss


@torch.no_grad()
def validate(
    model,
    rows: list[dict[str, Any]],
    collate,
    task: str,
    micro_batch: int,
    precision: str,
    device: torch.device,
    rank: int,
    world: int,
) -> dict[str, float]:
    """Mean validation loss over its items (rows or labelled tokens) across all workers; each scores
    every `world`-th row. Every worker runs the same number of forward passes, one on a row it does
    not count when it has run out: under ZeRO-3 a forward pass gathers parameters from all workers."""
    mine = rows[rank::world]
    passes = math.ceil(math.ceil(len(rows) / world) / micro_batch)
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # summed loss, items, correct predictions
    was_training = model.training
    model.eval()
    for start in range(0, passes * micro_batch, micro_batch):
        chunk = mine[start : start + micro_batch]
        batch = {k: v.to(device) for k, v in collate(chunk or rows[:1]).items()}
        with mixed_precision(model, precision, device):
            if task == "sequence_classification":
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
                loss = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum")
                correct = (logits.argmax(dim=-1) == batch["labels"]).sum()
            else:
                loss, correct = summed_loss(model, batch, task), torch.zeros((), device=device)
        if chunk:
            totals += torch.stack([loss.double(), loss_items(batch, task).double(), correct.double()])
    model.train(was_training)
    if torch.distributed.is_initialized() and world > 1:
        torch.distributed.all_reduce(totals)
    scores = {"validation_loss": round(totals[0].item() / max(totals[1].item(), 1), 5)}
    if task == "sequence_classification":
        scores["validation_accuracy"] = round(totals[2].item() / max(totals[1].item(), 1), 5)
    return scores


def best_evaluation(history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The history record with the lowest validation loss (the earliest of equal ones), or None."""
    evaluated = [record for record in history if "validation_loss" in record]
    return min(evaluated, key=lambda record: record["validation_loss"]) if evaluated else None


def evaluations_since_best(history: list[dict[str, Any]]) -> int:
    """How many evaluations came after the best one: early stopping's count, rebuilt from the history on resume."""
    best = best_evaluation(history)
    return sum(1 for record in history if "validation_loss" in record and record["step"] > best["step"]) if best else 0
