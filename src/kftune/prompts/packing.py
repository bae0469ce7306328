"""Packing: several short causal-LM examples in one row of at most max_length tokens, none attending to another.

Short rows (SST-2 phrases, one-line instructions) waste most of a padded batch. A packed row keeps
`position_ids` that restart at 0 for every example, so each example sees the positions it would see
alone. Attention stays inside each example in one of two ways:
- a block-diagonal causal 4D mask (any attention implementation, CPU included);
- the variable-length path (`model.attn_implementation` flash or flex attention): the batch's rows
  laid end to end as one row, and transformers finds the example boundaries from the position ids
  (flash: a varlen kernel; flex: a block mask that skips other examples' blocks); no dense mask.
The first label of every example is -100: unpacked, nothing predicts an example's first token either,
so a packed batch has the same loss as the unpacked one. The batches themselves are made in
`kftune.prompts.collate`.
"""

from __future__ import annotations

from typing import Any

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
            row["labels"] += [IGNORE_INDEX, *rows[i]["labels"][1:]]
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
        "padding_saved": round(1 - (len(packed) * max_length - tokens) / unpacked_padding, 4)
        if unpacked_padding
        else 0.0,
    }
    return packed, stats
