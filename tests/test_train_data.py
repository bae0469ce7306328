"""Training data streams to the workers: build_prompts stores the training splits as Arrow files that a
worker memory-maps, so opening one costs no memory whatever its size; rows read back as written; the
workers' shares of an epoch are disjoint and together cover every row once."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pytest

from kftune.config import TrainSection
from kftune.prompts.build import PromptRows, open_prompts, read_prompts, write_split
from kftune.prompts.collate import Collator
from kftune.train.loop import worker_loader

ROWS = [
    {"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "source": "a"},
    {"input_ids": [4], "labels": [4], "source": "b", "group": 0, "hypothesis_label": 1},  # columns only some rows have
    {"input_ids": [5, 6], "labels": [5, 6], "source": "c"},
]


def test_rows_read_back_as_written(tmp_path):
    write_split(tmp_path, "train", ROWS)
    write_split(tmp_path, "test", ROWS)
    rows = open_prompts(tmp_path, "train")
    assert isinstance(rows, PromptRows) and len(rows) == 3
    assert [rows[i] for i in range(3)] == ROWS == rows[0:3] == read_prompts(tmp_path, "train")
    assert rows[-1] == ROWS[-1] and rows[::2] == ROWS[::2]
    with pytest.raises(IndexError, match=r"train\.arrow: row 3 of 3"):
        rows[3]
    assert (
        read_prompts(tmp_path, "test") == ROWS and (tmp_path / "test.jsonl").is_file()
    )  # what the evaluate step reads and fingerprints
    write_split(tmp_path, "validation", [])
    assert len(open_prompts(tmp_path, "validation")) == 0


def test_opening_a_large_split_reads_none_of_it_into_memory(tmp_path):
    rows = [
        {"input_ids": list(range(i % 50, i % 50 + 96)), "labels": list(range(96)), "source": f"row {i}"}
        for i in range(60_000)
    ]
    write_split(tmp_path, "train", rows)
    del rows
    size = (tmp_path / "train.arrow").stat().st_size
    assert size > 80e6
    heap, private = pa.total_allocated_bytes(), anonymous_resident_bytes()
    opened = open_prompts(tmp_path, "train")
    batch = [opened[i] for i in range(0, 60_000, 4000)]
    assert len(batch) == 15 and batch[1]["source"] == "row 4000"
    assert pa.total_allocated_bytes() - heap < 1e6  # the table's buffers point into the file mapping
    assert (
        anonymous_resident_bytes() - private < size / 20
    )  # page cache aside (shared, reclaimable), nothing was copied


def anonymous_resident_bytes() -> int:
    """The process's own resident memory (Linux RssAnon), without the file pages a mapping shows in its RSS."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"RssAnon:\s+(\d+) kB", status).group(1)) * 1024


def test_workers_get_disjoint_shares_that_cover_the_epoch(tmp_path):
    rows = [{"input_ids": [i + 1, i + 2], "labels": [i + 1, i + 2], "source": str(i)} for i in range(64)]
    write_split(tmp_path, "train", rows)
    opened = open_prompts(tmp_path, "train")
    collate = Collator(0, "causal_lm")
    settings = TrainSection(batch_size=8, workers=2)
    seen = []
    for rank in range(2):
        loader, sampler = worker_loader(opened, collate, settings, rank, world=2)
        sampler.set_epoch(1)
        seen.append({int(b) for batch in loader for b in batch["input_ids"][:, 0] - 1})
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(64))
    one, sampler = worker_loader(opened, collate, settings.model_copy(update={"workers": 1}), 0, world=1)
    sampler.set_epoch(1)
    assert {int(b) for batch in one for b in batch["input_ids"][:, 0] - 1} == set(range(64))
