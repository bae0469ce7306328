"""The losses training, evaluation and the reload probe share.

Causal LMs of the plain-head families never materialise their full logits: the loss goes from the
last hidden states through the output layer a chunk at a time (`kftune.train.linear_cross_entropy`),
and only at the positions that predict a labelled token, so response-only data also skips the
prompt's positions. That holds for the summed loss training steps on, and for the per-token losses
that scoring and online RL take (differentiable there while the output layer is frozen). Other
families, masked LMs and classifiers take the model's own logits.
"""

from __future__ import annotations

import contextlib

import torch

from kftune.prompts.build import IGNORE_INDEX
from kftune.train.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_sum

PLAIN_HEAD_FAMILIES = {"llama", "mistral", "qwen2", "qwen3"}
"""Model families whose logits are exactly `lm_head(last hidden state)`, with no soft-capping or
scaling after it, so their loss may go through the head chunk by chunk."""


def plain_output_head(model) -> torch.nn.Linear | None:
    """The output layer when the causal-LM loss can skip the full logits: a plain Linear of a plain-head
    family that the method did not wrap, and either whole on this worker or frozen (a ZeRO-3 shard of
    a frozen head is gathered for the loss, see `gathered`; a trained one would need its gradient
    partitioned back, so it keeps the model's logits)."""
    inner = getattr(model, "module", model)  # under DDP or a DeepSpeed engine
    head = inner.get_output_embeddings()
    if inner.config.model_type not in PLAIN_HEAD_FAMILIES or type(head) is not torch.nn.Linear:
        return None
    if hasattr(head.weight, "ds_id") and any(p.requires_grad for p in head.parameters()):
        return None
    return head


@contextlib.contextmanager
def gathered(head: torch.nn.Linear):
    """The head's full weights for the duration of the loss: a ZeRO-3 shard is gathered and partitioned
    again after. The loss keeps no reference to them: its gradients are computed in the forward pass."""
    if not hasattr(head.weight, "ds_id"):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(head.parameters())):
        yield


def _causal_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Packed rows bring position ids that restart per example, and a block-diagonal mask or (varlen path) none."""
    return {key: batch[key] for key in ("input_ids", "attention_mask", "position_ids") if key in batch}


class _HiddenStatesOut:
    """Kept on a plain output layer, as a forward pre-hook and a forward hook: while `taking`, the layer
    projects nothing and hands back its input, the last hidden states, as the model's `logits`, so they
    leave the model through every wrapper's hooks (DDP's, ZeRO-3's backward bookkeeping) and the loss
    projects them itself, a chunk at a time. Asking the model for `output_hidden_states` instead keeps
    every layer's states alive until the forward ends, which without gradients nothing else does (an 8B
    model, 16 x 2048 tokens: 8.6 GB)."""

    def __init__(self):
        self.taking, self.hidden = False, None

    def before(self, _head, args: tuple) -> tuple | None:
        if not self.taking:
            return None
        self.hidden = args[0]
        return (args[0][..., :0, :], *args[1:])

    def after(self, _head, _args: tuple, _output) -> torch.Tensor | None:
        if not self.taking:
            return None
        hidden, self.hidden = self.hidden, None
        return hidden


def last_hidden_states(model, head: torch.nn.Linear, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Every position's hidden states as the model hands them to its output layer (`_HiddenStatesOut`, attached once)."""
    taker = head.__dict__.get("kftune_hidden_states_out")
    if taker is None:
        taker = head.kftune_hidden_states_out = _HiddenStatesOut()
        head.register_forward_pre_hook(taker.before)
        head.register_forward_hook(taker.after)
    taker.taking = True
    try:
        return model(**_causal_inputs(batch)).logits
    finally:
        taker.taking = False


def _predicting_hidden_states(
    model, head: torch.nn.Linear, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The last hidden states at the positions whose next token is labelled, and those tokens."""
    labels = batch["labels"]
    hidden = last_hidden_states(model, head, batch)
    predicting = labels[:, 1:] != IGNORE_INDEX
    return hidden[:, -labels.shape[1] : -1][predicting], labels[:, 1:][
        predicting
    ]  # prompt-learning methods prepend virtual tokens


def next_token_losses(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-position loss of predicting each labelled token from the ones before it (0 where the label
    is -100), differentiable per position (online RL weighs each token by its advantage): the one
    causal-LM loss that evaluation, the reload probe, the reference model and online RL share."""
    return next_token_losses_and_states(model, batch, states=False)[0]


def next_token_losses_and_states(
    model, batch: dict[str, torch.Tensor], states: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`next_token_losses`, and the last hidden states at the positions that predict the label positions
    (rows x labels - 1 x hidden: what PPO's value head reads), or None when `states` is False.

    Through the output layer a chunk at a time when it is plain and no gradient must reach it; else
    from the model's logits (and, for the states, its `output_hidden_states`)."""
    labels = batch["labels"]
    head = plain_output_head(model)
    if head is not None and not (torch.is_grad_enabled() and any(p.requires_grad for p in head.parameters())):
        hidden = last_hidden_states(model, head, batch)[:, -labels.shape[1] : -1]
        predicting = labels[:, 1:] != IGNORE_INDEX
        with gathered(head):
            losses = linear_cross_entropy(hidden[predicting], head, labels[:, 1:][predicting])
        zeros = torch.zeros(predicting.shape, dtype=torch.float32, device=labels.device)
        return zeros.masked_scatter(predicting, losses), hidden if states else None
    output = model(**_causal_inputs(batch), output_hidden_states=states)
    logits = output.logits.float()[:, -labels.shape[1] : -1]
    losses = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), labels[:, 1:], ignore_index=IGNORE_INDEX, reduction="none"
    )
    return losses, output.hidden_states[-1][:, -labels.shape[1] : -1] if states else None


def row_losses(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per row, the summed causal-LM loss of its labelled tokens (a response's negative log-likelihood),
    differentiable: through the head chunk by chunk, one row at a time, where the family allows."""
    if not (torch.is_grad_enabled() and (head := plain_output_head(model))):
        return next_token_losses(model, batch).sum(dim=1)
    hidden, targets = _predicting_hidden_states(model, head, batch)
    counts = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1).tolist()
    with gathered(head):
        return torch.stack(
            [
                linear_cross_entropy_sum(h, head, t)
                for h, t in zip(hidden.split(counts), targets.split(counts), strict=True)
            ]
        )


def token_losses(model, batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
    """Per-position loss at the labelled positions (0 elsewhere): the next token for a causal LM, the
    word at the [MASK] slot itself for a masked LM."""
    if task != "masked_lm":
        return next_token_losses(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    return torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), batch["labels"], ignore_index=IGNORE_INDEX, reduction="none"
    )


def summed_loss(model, batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
    """The batch's loss summed over its items: rows for classification, labelled tokens for a language model."""
    if task == "sequence_classification":
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return torch.nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="sum")
    if task == "causal_lm" and (head := plain_output_head(model)):
        hidden, targets = _predicting_hidden_states(model, head, batch)
        with gathered(head):
            return linear_cross_entropy_sum(hidden, head, targets)
    return token_losses(model, batch, task).sum()


def loss_items(batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
    """How many items `summed_loss` adds up: the batch's rows or labelled tokens."""
    if task == "sequence_classification":
        return torch.tensor(len(batch["labels"]), device=batch["labels"].device)
    predicted = (
        batch["labels"] if task == "masked_lm" else batch["labels"][:, 1:]
    )  # nothing predicts a causal LM's first token
    return (predicted != IGNORE_INDEX).sum()
