"""Where evaluation runs (`eval.device`, `eval.precision`) and how it generates, on the CPU; the GPU
side of the same functions is tests/test_gpu.py."""

from __future__ import annotations

import pytest
import torch

from conftest import STORIES
from kftune.config import EvalSection
from kftune.errors import KftuneError
from kftune.evaluate.evaluate import batched, generate, placement, progress
from kftune.models import load_base_model, load_tokenizer
from test_gpu import story_rows


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_placement_without_a_gpu():
    assert placement(EvalSection()) == (torch.device("cpu"), torch.float32)
    assert placement(EvalSection(precision="bf16")) == (torch.device("cpu"), torch.bfloat16)
    with pytest.raises(KftuneError, match=r"^eval\.device: cuda, but no CUDA GPU is visible here"):
        placement(EvalSection(device="cuda"))
    with pytest.raises(KftuneError, match=r"^eval\.precision: fp16 needs a GPU"):
        placement(EvalSection(precision="fp16"))


def test_batched_generation_with_left_padding_continues_each_prompt_as_alone():
    """Prompts of different lengths in one batch, padded on the left, generate what each generates alone."""
    tokenizer = load_tokenizer(STORIES)
    rows = story_rows(tokenizer, words=3) + story_rows(tokenizer, words=8)
    assert len({r["labels"].count(-100) for r in rows}) > 2  # really different prompt lengths
    model = load_base_model(STORIES, "causal_lm", None, seed=0).eval()
    alone, references = generate(model, rows, tokenizer, max_new_tokens=10, batch_size=1)
    together, same_references = generate(model, rows, tokenizer, max_new_tokens=10, batch_size=len(rows))
    assert together == alone and same_references == references
    assert all(alone) and references[0].startswith("time, there was a little girl")


def test_a_pass_prints_progress_only_inside_evaluate(capsys):
    rows = list(range(10))
    assert [len(chunk) for chunk in batched(rows, 4)] == [4, 4, 2]
    assert capsys.readouterr().out == ""  # serving calls the same functions: no progress lines there
    with progress("evaluate tuned"):
        list(batched(rows, 4))
    lines = capsys.readouterr().out.splitlines()
    assert lines and lines[-1].startswith("evaluate tuned [") and " 10/10 100%" in lines[-1] and "rows/s" in lines[-1]
