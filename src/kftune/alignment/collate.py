"""Preference rows into model batches. A pair batch holds the chosen sequences then the rejected ones
(2B rows, one forward pass for both); a feedback batch (KTO) also holds each prompt with the next
row's completion, the mismatched pairs its KL estimate is taken on."""

from __future__ import annotations

from typing import Any

import torch

from kftune.prompts.build import IGNORE_INDEX
from kftune.prompts.collate import Collator


class PairCollator:
    def __init__(self, pad_token_id: int):
        self.pad = Collator(pad_token_id, "causal_lm")

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return self.pad(
            [
                {"input_ids": row[f"{side}_input_ids"], "labels": row[f"{side}_labels"]}
                for side in ("chosen", "rejected")
                for row in rows
            ]
        )


class FeedbackCollator:
    def __init__(self, pad_token_id: int):
        self.pad = Collator(pad_token_id, "causal_lm")

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.pad(rows)
        batch["desirable"] = torch.tensor([row["desirable"] for row in rows])
        mismatched = [mismatch(row, rows[(i + 1) % len(rows)]) for i, row in enumerate(rows)]
        batch.update({f"kl_{key}": value for key, value in self.pad(mismatched).items()})
        return batch


def mismatch(prompt_row: dict[str, Any], completion_row: dict[str, Any]) -> dict[str, list[int]]:
    """One row's prompt followed by another row's completion."""
    prompt = prompt_row["input_ids"][: prompt_row["prompt_length"]]
    completion = completion_row["input_ids"][completion_row["prompt_length"] :]
    return {"input_ids": prompt + completion, "labels": [IGNORE_INDEX] * len(prompt) + completion}


class PromptCollator:
    """Prompts padded on the left, so that sampling continues every row from its last token."""

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(row["input_ids"]) for row in rows)
        return {
            "input_ids": torch.tensor([[self.pad] * (width - len(r["input_ids"])) + r["input_ids"] for r in rows]),
            "attention_mask": torch.tensor(
                [[0] * (width - len(r["input_ids"])) + [1] * len(r["input_ids"]) for r in rows]
            ),
        }


def as_sequences(rows: list[dict[str, Any]], task: str) -> list[dict[str, Any]]:
    """Rows as single sequences, for what reads one sequence per row (the reload probe): a pair's chosen
    sequence (its label, under a reward model's head, a placeholder); other rows as they are."""
    return [
        {
            "source": row["source"],
            "input_ids": row["chosen_input_ids"],
            "labels": 0 if task == "sequence_classification" else row["chosen_labels"],
        }
        if "chosen_input_ids" in row
        else {**row, "labels": row["input_ids"]}
        if "labels" not in row  # a prompt of online RL: scored as text
        else row
        for row in rows
    ]
