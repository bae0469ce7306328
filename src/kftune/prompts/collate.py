"""Rows of a prompts folder into model batches: padded to the longest row, or packed rows with
position ids that restart per example and attention kept inside each example (see `packing`)."""

from __future__ import annotations

from typing import Any

import torch

from kftune.config import VARLEN_ATTENTION
from kftune.prompts.packing import IGNORE_INDEX


class Collator:
    """Pads a batch to its longest row (not to max_length): short SST-2 rows train ~2x faster."""

    def __init__(self, pad_token_id: int, task: str):
        self.pad, self.task = pad_token_id, task

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), longest), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row["input_ids"])] = torch.tensor(row["input_ids"])
            mask[i, : len(row["input_ids"])] = 1
        if self.task == "sequence_classification":
            labels = torch.tensor([r["labels"] for r in rows])
        else:
            labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
            for i, row in enumerate(rows):
                labels[i, : len(row["labels"])] = torch.tensor(row["labels"])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class PackedCollator:
    """Packed rows as one batch. With a mask: padded to the longest row, padding positions get position
    id 0 each, so each is a one-token segment of its own (no query row of the mask is empty: an
    all-masked row gives NaN). Variable-length (`varlen`): the rows laid end to end as a single row
    with no padding and no mask, the form transformers' flash-attention path takes as a list of
    sequences (it looks for example boundaries only in a batch of one row)."""

    def __init__(self, pad_token_id: int, varlen: bool = False):
        self.pad, self.varlen = pad_token_id, varlen

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.varlen:
            return {
                key: torch.tensor([[value for row in rows for value in row[key]]])
                for key in ("input_ids", "labels", "position_ids")
            }
        longest = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), longest), self.pad, dtype=torch.long)
        labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[i, :n] = torch.tensor(row["input_ids"])
            labels[i, :n] = torch.tensor(row["labels"])
            positions[i, :n] = torch.tensor(row["position_ids"])
        return {
            "input_ids": ids,
            "labels": labels,
            "position_ids": positions,
            "attention_mask": block_diagonal_mask(positions),
        }


def block_diagonal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """Additive (batch, 1, L, L) mask: 0 where a token may attend (an earlier or the same token of its own
    example), the most negative float elsewhere. Additive floats work for eager and SDPA attention alike."""
    segment = (position_ids == 0).cumsum(dim=1)
    same = segment[:, :, None] == segment[:, None, :]
    causal = torch.tril(torch.ones(position_ids.shape[1], position_ids.shape[1], dtype=torch.bool))
    allowed = same & causal
    return torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(~allowed, torch.finfo(torch.float32).min)[
        :, None
    ]


def batch_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real (non-padding) tokens of a batch, packed or not. In a packed batch a token is padding when its
    position id is 0 and the next one's is not 1: every example starts 0, 1 (it has two tokens at least:
    its text and the end-of-sequence token)."""
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return int(mask.sum())
    positions = batch["position_ids"]
    starts = (positions[:, :-1] == 0) & (positions[:, 1:] == 1)
    return int((positions != 0).sum() + starts.sum())


def uses_varlen_attention(model) -> bool:
    """Flash- and flex-attention models take packed examples as variable-length sequences, found from
    the position ids (flash: a varlen kernel; flex: a block mask that skips other examples' blocks)."""
    return getattr(model.config, "_attn_implementation", None) in VARLEN_ATTENTION


def make_collator(meta: dict[str, Any], task: str, varlen: bool = False):
    """The training collator for a built prompts folder: packed rows when the build packed them (`varlen`:
    the model's attention finds their boundaries from the position ids, see `uses_varlen_attention`)."""
    if meta.get("packing"):
        return PackedCollator(meta["pad_token_id"], varlen=varlen)
    return Collator(meta["pad_token_id"], task)
