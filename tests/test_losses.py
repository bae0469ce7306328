"""The causal-LM loss without full logits: the chunked linear cross-entropy gives the loss and the
gradients of the plain computation (logits, then cross-entropy), for every method that trains a
causal LM and for online RL's per-token losses, and families whose logits are more than
`lm_head(hidden)` keep the plain computation."""

from __future__ import annotations

import weakref

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

import kftune.train.linear_cross_entropy as chunked
from conftest import STORIES, gradients, vocabulary_projections
from kftune.methods import METHODS, apply_method, calibrate_method
from kftune.models import load_base_model
from kftune.train.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_sum
from kftune.train.losses import next_token_losses, plain_output_head, summed_loss
from test_methods_matrix import CASES

STORY_CASES = {name: case for name, case in CASES.items() if case[2]["stories"] is not None}


def plain_summed_loss(model, batch) -> torch.Tensor:
    """The reference: every position's fp32 logits, then cross-entropy over the labelled ones."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logits = logits[:, -batch["labels"].shape[1] :]
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], ignore_index=-100, reduction="sum"
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_loss_and_gradients_match_full_logits(monkeypatch, dtype, with_bias):
    for size in (
        "CHUNK_LOGITS",
        "SCORING_CHUNK_LOGITS",
    ):  # 8 rows a chunk: 37 rows take five chunks, the last one short
        monkeypatch.setattr(chunked, size, 50 * 8)
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=with_bias, dtype=dtype)
    hidden = torch.randn(37, 16, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    reference = torch.nn.functional.cross_entropy(head(hidden).float(), targets, reduction="none")
    expected = torch.autograd.grad(3 * reference.sum(), [hidden, *head.parameters()])
    total = linear_cross_entropy_sum(hidden, head, targets)
    got = torch.autograd.grad(3 * total, [hidden, *head.parameters()])

    tolerance = 1e-5 if dtype == torch.float32 else 1e-2  # relative to the largest entry
    assert abs(total.item() - reference.sum().item()) <= tolerance * reference.sum().item()
    with torch.no_grad():  # scoring
        assert torch.allclose(
            linear_cross_entropy(hidden, head, targets), reference.detach(), rtol=tolerance, atol=tolerance
        )
    for want, have in zip(expected, got, strict=True):
        assert have.dtype == want.dtype
        assert (have - want).abs().max() <= tolerance * want.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_row_losses_are_differentiable_in_the_hidden_states_of_a_frozen_head(monkeypatch, dtype):
    """Online RL weighs each token's loss by its own advantage: under per-row weights, the gradient for the
    hidden states is that of the full logits. A head that trains is refused (its gradient would be lost)."""
    monkeypatch.setattr(chunked, "CHUNK_LOGITS", 50 * 8)
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, dtype=dtype).requires_grad_(False)
    hidden = torch.randn(37, 16, dtype=dtype, requires_grad=True)
    targets, weights = torch.randint(0, 50, (37,)), torch.randn(37)
    reference = torch.nn.functional.cross_entropy(head(hidden).float(), targets, reduction="none")
    (expected,) = torch.autograd.grad((weights * reference).sum(), hidden)
    losses = linear_cross_entropy(hidden, head, targets)
    (got,) = torch.autograd.grad((weights * losses).sum(), hidden)

    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    assert torch.allclose(losses, reference.detach(), rtol=tolerance, atol=tolerance)
    assert got.dtype == dtype and (got - expected).abs().max() <= tolerance * expected.abs().max()
    head.bias.requires_grad_(True)
    with pytest.raises(ValueError, match="frozen"):
        linear_cross_entropy(hidden, head, targets)


def test_online_rl_token_losses_match_full_logits_a_chunk_of_positions_at_a_time(monkeypatch, families):
    """GRPO's and PPO's per-token log-probabilities under LoRA (the head frozen): weighted by per-token
    advantages, the losses and the adapter's gradients are the full-logits computation's, and no more than
    a chunk of positions is ever projected onto the vocabulary."""
    batch = families["stories"][3]
    options = METHODS["lora"].options.model_validate({"name": "lora", "r": 4, "target_modules": "all-linear"})
    model = apply_method(load_base_model(STORIES, "causal_lm", None, seed=0), options, "causal_lm").eval()
    with torch.no_grad():  # B = 0 would leave the adapter out of the gradients' values
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    labels = batch["labels"]
    weights = torch.randn(labels[:, 1:].shape, generator=torch.Generator().manual_seed(0))
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    reference = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none"
    )
    expected = gradients(model, (weights * reference).sum())

    vocab = model.config.vocab_size
    monkeypatch.setattr(chunked, "CHUNK_LOGITS", vocab * 4)
    projected = vocabulary_projections(monkeypatch, vocab)
    losses = next_token_losses(model, batch)
    got = gradients(model, (weights * losses).sum())

    assert max(projected) == 4 and sum(projected) == int((labels[:, 1:] != -100).sum())
    assert torch.allclose(losses, reference.detach(), atol=1e-5)
    assert got.keys() == expected.keys() and all("lora_" in name for name in got)
    for name, want in expected.items():
        assert (got[name] - want).abs().max() <= 1e-4 * want.abs().max(), name


def test_scoring_holds_smaller_chunks_of_logits_than_training(monkeypatch):
    """No backward to feed: scoring (evaluation, the reload probe) keeps a quarter of training's logits at once."""
    sizes = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(
        torch.nn.functional, "linear", lambda *args: sizes.append(linear(*args).numel()) or linear(*args)
    )
    monkeypatch.setattr(chunked, "CHUNK_LOGITS", 50 * 8)
    monkeypatch.setattr(chunked, "SCORING_CHUNK_LOGITS", 50 * 2)
    head = torch.nn.Linear(16, 50)
    hidden, targets = torch.randn(37, 16, requires_grad=True), torch.randint(0, 50, (37,))
    linear_cross_entropy_sum(hidden, head, targets)
    assert max(sizes) == 50 * 8
    sizes.clear()
    with torch.no_grad():
        linear_cross_entropy(hidden, head, targets)
    assert max(sizes) == 50 * 2 and len(sizes) == 19


def test_no_gradient_work_outside_autograd(monkeypatch):
    """Scoring (no_grad) must not pay for the gradients the training path computes in its forward pass."""

    def gradients_computed(*_):
        raise AssertionError("the autograd function ran under no_grad")

    head = torch.nn.Linear(8, 20)
    hidden, targets = torch.randn(5, 8, requires_grad=True), torch.randint(0, 20, (5,))
    monkeypatch.setattr(chunked._LinearCrossEntropySum, "apply", gradients_computed)
    with torch.no_grad():
        total = linear_cross_entropy_sum(hidden, head, targets)
        assert total.item() == pytest.approx(linear_cross_entropy(hidden, head, targets).sum().item())


@pytest.mark.parametrize("response_only", [False, True])
@pytest.mark.parametrize("case", sorted(STORY_CASES))
def test_every_method_gets_the_plain_loss_and_gradients(case, response_only, families):
    raw = STORY_CASES[case][0]
    options = METHODS[raw["name"]].options.model_validate(raw)
    batch = dict(families["stories"][3])
    if response_only:  # the first five tokens are the prompt
        batch["labels"] = batch["labels"].clone()
        batch["labels"][:, :5] = -100
    model = apply_method(load_base_model(STORIES, "causal_lm", None, seed=0), options, "causal_lm")
    calibrate_method(
        model, options, lambda rows: summed_loss(model, {k: v[:rows] for k, v in batch.items()}, "causal_lm")
    )
    model.eval()  # no dropout: the two computations must see the same network
    assert plain_output_head(model) is not None, "stories260K is a Llama: its loss must skip the full logits"

    expected_loss = plain_summed_loss(model, batch)
    expected = gradients(model, expected_loss)
    loss = summed_loss(model, batch, "causal_lm")
    got = gradients(model, loss)

    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-5)
    assert got.keys() == expected.keys() and got
    for name, want in expected.items():  # fp32 sums in another order: relative to the largest entry
        assert (got[name] - want).abs().max() <= 1e-4 * want.abs().max(), name
    with torch.no_grad():
        per_position = next_token_losses(model, batch)
    assert per_position.sum().item() == pytest.approx(expected_loss.item(), rel=1e-5)
    assert torch.all(per_position[batch["labels"][:, 1:] == -100] == 0)


def test_scoring_frees_each_layers_states_as_the_forward_goes(families):
    """Without gradients the loss keeps only the states the output layer gets: when the final norm runs, no
    earlier decoder layer's output is alive (`output_hidden_states` would keep them all until the end)."""
    model = load_base_model(STORIES, "causal_lm", None, seed=0).eval()
    outputs, alive_at_the_end = [], []
    for layer in model.model.layers:
        layer.register_forward_hook(
            lambda _layer, _args, out: outputs.append(weakref.ref(out[0] if isinstance(out, tuple) else out))
        )
    model.model.norm.register_forward_hook(
        lambda *_: alive_at_the_end.append(sum(ref() is not None for ref in outputs[:-1]))
    )
    with torch.no_grad():
        losses = next_token_losses(model, families["stories"][3])
    assert len(outputs) == model.config.num_hidden_layers > 1
    assert alive_at_the_end == [0]
    assert losses.sum().item() == pytest.approx(plain_summed_loss(model, families["stories"][3]).item(), rel=1e-5)


def test_a_soft_capped_family_keeps_its_own_logits():
    """Gemma 2 soft-caps its logits after the head: going through the head alone would change the loss."""
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(
        Gemma2Config(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            final_logit_softcapping=2.0,
        )
    ).eval()
    ids = torch.randint(0, 64, (2, 6))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    assert plain_output_head(model) is None
    assert summed_loss(model, batch, "causal_lm").item() == pytest.approx(
        plain_summed_loss(model, batch).item(), rel=1e-6
    )
