"""Packing: several short causal-LM examples in one row of at most max_length tokens, none attending to another.

Short rows (SST-2 phrases, one-line instructions) waste most of a padded batch. A packed row keeps
`position_ids` that restart at 0 for every example, so each example sees the positions it would see
alone. Attention stays inside each example in one of two ways:
- a block-diagonal causal 4D mask (any attention implementation, CPU included);
- the variable-length path: with flash attention, transformers finds the example boundaries from the
  position ids and runs a varlen kernel; no mask is built at all.
The first label of every example is -100: unpacked, nothing predicts an example's first token either,
so a packed batch has the same loss as the unpacked one.
"""

from __future__ import annotations

from typing import Any

import torch

IGNORE_INDEX = -100


def pack_rows(rows: list[dict[str, Any]], max_length: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """First-fit decreasing: the longest example first, into the first row it fits. Returns the packed rows
    (each with `position_ids`) and the statistics the preview shows."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["input_ids"]))
    bins: list[list[int]] = []
    space: list[int] = []
    for i in order:
        length = len(rows[i]["input_ids"])
        slot = next((b for b, free in enumerate(space) if free >= length), None)
        if slot is None:
            bins.append([])
            space.append(max_length)
            slot = len(bins) - 1
        bins[slot].append(i)
        space[slot] -= length
    packed = []
    for members in bins:
        row: dict[str, Any] = {"input_ids": [], "labels": [], "position_ids": [], "sources": []}
        for i in members:
            ids = rows[i]["input_ids"]
            row["input_ids"] += ids
            row["labels"] += [IGNORE_INDEX] + rows[i]["labels"][1:]
            row["position_ids"] += list(range(len(ids)))
            row["sources"].append(rows[i]["source"])
        packed.append(row)
    tokens = sum(len(r["input_ids"]) for r in rows)
    unpacked_padding = len(rows) * max_length - tokens
    stats = {
        "examples": len(rows),
        "rows": len(packed),
        "examples_per_row": round(len(rows) / max(len(packed), 1), 2),
        "fill": round(tokens / max(len(packed) * max_length, 1), 4),
        "padding_saved": round(1 - (len(packed) * max_length - tokens) / unpacked_padding, 4) if unpacked_padding else 0.0,
    }
    return packed, stats


class PackedCollator:
    """Pads packed rows to the longest in the batch. Padding positions get position id 0 each, so each
    is a one-token segment of its own: no query row of the mask is empty (an all-masked row gives NaN)."""

    def __init__(self, pad_token_id: int, varlen: bool = False):
        self.pad, self.varlen = pad_token_id, varlen

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), longest), self.pad, dtype=torch.long)
        labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[i, :n] = torch.tensor(row["input_ids"])
            labels[i, :n] = torch.tensor(row["labels"])
            positions[i, :n] = torch.tensor(row["position_ids"])
        batch = {"input_ids": ids, "labels": labels, "position_ids": positions}
        if not self.varlen:
            batch["attention_mask"] = block_diagonal_mask(positions)
        return batch


def block_diagonal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """Additive (batch, 1, L, L) mask: 0 where a token may attend (an earlier or the same token of its own
    example), the most negative float elsewhere. Additive floats work for eager and SDPA attention alike."""
    segment = (position_ids == 0).cumsum(dim=1)
    same = segment[:, :, None] == segment[:, None, :]
    causal = torch.tril(torch.ones(position_ids.shape[1], position_ids.shape[1], dtype=torch.bool))
    allowed = same & causal
    return torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]


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
    """Flash-attention models run packed rows through varlen kernels, found from the position ids."""
    return "flash" in str(getattr(model.config, "_attn_implementation", ""))


def make_collator(meta: dict[str, Any], task: str, model=None):
    """The training collator for a built prompts folder: packed rows when the build packed them. Packed
    training turns the model's KV cache off: transformers looks for example boundaries in the position
    ids only when no cache is passed (training never reads the cache anyway)."""
    if meta.get("packing"):
        if model is not None:
            model.config.use_cache = False
        return PackedCollator(meta["pad_token_id"], varlen=model is not None and uses_varlen_attention(model))
    from kftune.train.loop import Collator  # the loop imports the prompts package

    return Collator(meta["pad_token_id"], task)
