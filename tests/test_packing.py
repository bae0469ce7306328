"""Packing on the real tiny Llama stories260K: a packed batch has the loss of the unpacked one, with the
block-diagonal 4D mask and with the position-ids-only (variable-length) path."""

import pytest
import torch

from kftune.prompts.build import preview_html
from kftune.prompts.collate import (
    Collator,
    PackedCollator,
    batch_tokens,
    block_diagonal_mask,
    make_collator,
    uses_varlen_attention,
)
from kftune.prompts.packing import pack_rows
from kftune.train.loop import build_model
from kftune.train.losses import summed_loss


def test_packing_keeps_every_example_and_restarts_positions(packed_build):
    _, meta, packed, unpacked = packed_build
    assert sum(len(r["sources"]) for r in packed) == len(unpacked) == meta["packing"]["examples"] == 36
    assert len(packed) == meta["packing"]["rows"] < len(unpacked) and all(len(r["input_ids"]) <= 256 for r in packed)
    by_source = {r["source"]: r for r in unpacked}
    for row in packed:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        pieces = [row["input_ids"][a:b] for a, b in zip(starts, [*starts[1:], len(row["input_ids"])], strict=False)]
        assert pieces == [by_source[s]["input_ids"] for s in row["sources"]]
    assert f"{meta['packing']['examples']} training examples in {meta['packing']['rows']} rows" in preview_html(meta)


def test_block_diagonal_mask_keeps_attention_inside_each_example():
    mask = block_diagonal_mask(torch.tensor([[0, 1, 2, 0, 1, 0, 0]]))[0, 0] == 0  # two examples, then two pads
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0],
            [0, 0, 0, 1, 0, 0, 0],
            [0, 0, 0, 1, 1, 0, 0],
            [0, 0, 0, 0, 0, 1, 0],
            [0, 0, 0, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)
    assert batch_tokens({"position_ids": torch.tensor([[0, 1, 2, 0, 1, 0, 0]])}) == 5


@pytest.mark.parametrize("varlen", [False, True], ids=["4d-mask", "position-ids"])
def test_packed_batches_give_the_unpacked_loss(packed_build, varlen):
    config, meta, packed, unpacked = packed_build
    model = build_model(
        config, None, for_training=True
    ).eval()  # as the train worker builds it (LoRA starts as the identity)
    collate = make_collator(meta, "causal_lm", varlen=uses_varlen_attention(model))
    assert isinstance(collate, PackedCollator) and not collate.varlen  # eager/SDPA on CPU: the 4D mask
    with torch.no_grad():
        expected = model(**Collator(meta["pad_token_id"], "causal_lm")(unpacked)).loss.item()
        batch = PackedCollator(meta["pad_token_id"], varlen=varlen)(packed)
        assert ("attention_mask" in batch) != varlen
        assert len(batch["input_ids"]) == (1 if varlen else len(packed))  # varlen: every row end to end, no padding
        got = model(**batch).loss.item()
        single = model(**PackedCollator(meta["pad_token_id"], varlen=varlen)(packed[:1])).loss.item()
        first = PackedCollator(meta["pad_token_id"])(packed[:1])
        crossing = model(input_ids=first["input_ids"], labels=first["labels"]).loss.item()  # no mask, no position reset
        # the training loop's own loss (summed over labelled tokens, position ids passed on) agrees too
        summed_unpacked = summed_loss(model, Collator(meta["pad_token_id"], "causal_lm")(unpacked), "causal_lm").item()
        summed_packed = summed_loss(model, batch, "causal_lm").item()
    assert got == pytest.approx(expected, rel=1e-4)
    assert summed_packed == pytest.approx(summed_unpacked, rel=1e-4)
    assert abs(crossing - single) > 1e-3  # attending across examples would change the loss: the test can fail
    assert batch_tokens(batch) == sum(len(r["input_ids"]) for r in unpacked)


def test_pack_rows_statistics():
    rows = [{"input_ids": [1] * n, "labels": [1] * n, "source": str(n)} for n in (6, 5, 4, 3, 2)]
    packed, stats = pack_rows(rows, 8)
    assert [r["sources"] for r in packed] == [["6", "2"], ["5", "3"], ["4"]]
    assert stats == {"examples": 5, "rows": 3, "examples_per_row": 1.67, "fill": 0.8333, "padding_saved": 0.8}


def test_varlen_batches_are_what_the_flash_attention_path_reads(packed_build):
    """transformers' flash path turns the position ids of a one-row batch into the varlen kernel's
    cumulative sequence lengths: they must be exactly the examples' boundaries."""
    from transformers.modeling_flash_attention_utils import _is_packed_sequence, prepare_fa_kwargs_from_position_ids

    _, meta, packed, unpacked = packed_build
    batch = PackedCollator(meta["pad_token_id"], varlen=True)(packed[:3])
    (cu_seqlens, _), (longest, _) = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
    by_source = {r["source"]: len(r["input_ids"]) for r in unpacked}
    lengths = [by_source[source] for row in packed[:3] for source in row["sources"]]
    assert cu_seqlens.tolist() == [0, *torch.tensor(lengths).cumsum(0).tolist()] and longest == max(lengths)
    assert _is_packed_sequence(batch["position_ids"], batch_size=1)
    assert batch_tokens(batch) == sum(lengths)


def test_flex_attention_takes_packed_rows_as_variable_length_sequences(packed_build):
    """The variable-length path end to end on CPU: flex attention (a block mask built from the position
    ids, other examples' blocks skipped) gives the training loop's loss of the unpacked rows. Forward
    only: torch has no flex-attention backward on CPU (so config validation keeps it to GPU runs)."""
    config, meta, packed, unpacked = packed_build
    flex = config.model_copy(
        update={"model": config.model.model_copy(update={"attn_implementation": "flex_attention"})}
    )
    model = build_model(flex, None, for_training=True).eval()
    collate = make_collator(meta, "causal_lm", varlen=uses_varlen_attention(model))
    assert collate.varlen
    rows = packed[:4]
    sources = {source for row in rows for source in row["sources"]}
    with torch.no_grad():
        expected = summed_loss(
            model,
            Collator(meta["pad_token_id"], "causal_lm")([r for r in unpacked if r["source"] in sources]),
            "causal_lm",
        )
        got = summed_loss(model, collate(rows), "causal_lm")
    assert got.item() == pytest.approx(expected.item(), rel=1e-4)
