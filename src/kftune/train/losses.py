"""The losses training, evaluation and the reload probe share.

Causal LMs of the plain-head families never materialise their full logits: the loss goes from the
last hidden states through the output layer a chunk at a time (`kftune.train.linear_cross_entropy`),
and only at the positions that predict a labelled token, so response-only data also skips the
prompt's positions. Other families, masked LMs and classifiers take the model's own logits.
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
    a frozen head is gathered for the loss, see `_whole`; a trained one would need its gradient
    partitioned back, so it keeps the model's logits)."""
    inner = getattr(model, "module", model)  # under DDP or a DeepSpeed engine
    head = inner.get_output_embeddings()
    if inner.config.model_type not in PLAIN_HEAD_FAMILIES or type(head) is not torch.nn.Linear:
        return None
    if hasattr(head.weight, "ds_id") and any(p.requires_grad for p in head.parameters()):
        return None
    return head


@contextlib.contextmanager
def _whole(head: torch.nn.Linear):
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


def _predicting_hidden_states(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The last hidden states at the positions whose next token is labelled, and those tokens; the
    model itself projects only its final position onto the vocabulary."""
    labels = batch["labels"]
    hidden = model(**_causal_inputs(batch), output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
    predicting = labels[:, 1:] != IGNORE_INDEX
    return hidden[:, -labels.shape[1] : -1][predicting], labels[:, 1:][
        predicting
    ]  # prompt-learning methods prepend virtual tokens


def next_token_losses(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-position loss of predicting each labelled token from the ones before it (0 where the label
    is -100): the one causal-LM loss that training, evaluation and the reload probe share."""
    labels = batch["labels"]
    if head := plain_output_head(model):
        losses = torch.zeros(labels[:, 1:].shape, dtype=torch.float32, device=labels.device)
        hidden, targets = _predicting_hidden_states(model, batch)
        with _whole(head):
            losses[labels[:, 1:] != IGNORE_INDEX] = linear_cross_entropy(hidden, head, targets)
        return losses
    return logits_token_losses(model, batch)


def logits_token_losses(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """`next_token_losses` from the model's full logits: differentiable per position (online RL weighs each token)."""
    labels = batch["labels"]
    logits = model(**_causal_inputs(batch)).logits.float()[:, -labels.shape[1] :]
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=IGNORE_INDEX, reduction="none"
    )


def row_losses(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per row, the summed causal-LM loss of its labelled tokens (a response's negative log-likelihood),
    differentiable: through the head chunk by chunk, one row at a time, where the family allows."""
    if not (torch.is_grad_enabled() and (head := plain_output_head(model))):
        return next_token_losses(model, batch).sum(dim=1)
    hidden, targets = _predicting_hidden_states(model, batch)
    counts = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1).tolist()
    with _whole(head):
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
        hidden, targets = _predicting_hidden_states(model, batch)
        with _whole(head):
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
