"""General data: text that stands for what the base model knew before tuning.

A user's file (one passage per line), or the packaged general text (see
src/kftune/evaluate/data/SOURCE.md). The packaged text is split by line parity: training uses the even
lines (Fisher, distillation, replay) and evaluation measures forgetting on the odd ones, so retention
never trains on the text forgetting is scored on.
"""

from __future__ import annotations

from pathlib import Path

from kftune.errors import KftuneError
from kftune.prompts.packing import IGNORE_INDEX

PACKAGED_GENERAL_TEXT = Path(__file__).resolve().parents[1] / "evaluate" / "data" / "general_text.txt"
MASKED_FRACTION = 0.15
"""Masked-LM rows mask this fraction of their tokens (BERT's pre-training objective, Devlin et al. 2019)."""


def read_lines(path: str | Path, field: str) -> list[str]:
    """The non-empty lines of a text file; `field` names the config field in the errors."""
    path = Path(path)
    if not path.is_file():
        raise KftuneError(f"{field}: {path} is not a file")
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as exc:
        raise KftuneError(f"{field}: {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not lines:
        raise KftuneError(f"{field}: {path} holds no text (one passage per line expected)")
    return lines


def training_lines(general_data: str | None, rows: int) -> list[str]:
    """The general passages retention trains with: the user's file, or the packaged text's even lines."""
    if general_data:
        return read_lines(general_data, "retention.general_data")[:rows]
    return read_lines(PACKAGED_GENERAL_TEXT, "retention.general_data")[::2][:rows]


def held_out_lines(general_text: str | None) -> list[str]:
    """The passages evaluation scores forgetting on: `eval.general_text`, or the packaged text's odd lines."""
    if general_text:
        return read_lines(general_text, "eval.general_text")
    return read_lines(PACKAGED_GENERAL_TEXT, "eval.general_text")[1::2]


def language_model_rows(lines: list[str], tokenizer, task: str, max_length: int, seed: int = 0) -> list[dict]:
    """Rows for the pre-training objective: every token a label for a causal LM; for a masked LM,
    MASKED_FRACTION of the (non-special) tokens replaced by [MASK] and labelled, seeded."""
    import torch

    rows = []
    generator = torch.Generator().manual_seed(seed)
    for line in lines:
        ids = tokenizer(line, truncation=True, max_length=max_length)["input_ids"]
        if task != "masked_lm":
            rows.append({"input_ids": ids, "labels": ids})
            continue
        special = set(tokenizer.all_special_ids)
        chosen = torch.rand(len(ids), generator=generator) < MASKED_FRACTION
        if not any(chosen[i] for i in range(len(ids)) if ids[i] not in special):
            chosen[next((i for i in range(len(ids)) if ids[i] not in special), 0)] = True  # at least one per row
        masked = [
            tokenizer.mask_token_id if c and t not in special else t for t, c in zip(ids, chosen.tolist(), strict=True)
        ]
        labels = [t if c and t not in special else IGNORE_INDEX for t, c in zip(ids, chosen.tolist(), strict=True)]
        rows.append({"input_ids": masked, "labels": labels})
    return rows
