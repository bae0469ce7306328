"""Cross-entropy through the LM head a chunk of tokens at a time, so the full (tokens x vocabulary)
fp32 logits never exist.

At Llama-3's vocabulary (128,256) a micro-batch of 8 x 2048 tokens has 2.1 G logits: 8 GiB in fp32,
and as much again for their gradient, more than the rest of a 1B model's training state. Here each
chunk's logits become its loss and, in the same pass, its gradients for the hidden states and (when
it trains) the head; then they are dropped. The backward pass only scales what the forward kept.
The idea of Liger's fused linear cross-entropy, in plain PyTorch.

Online RL weighs each token's log-probability by its own advantage, so it needs the loss per token,
differentiable: `linear_cross_entropy` gives that for a frozen head (LoRA and the other PEFT methods),
each row's gradient for its hidden state computed in the forward pass and scaled by the row's weight in
the backward pass.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

CHUNK_LOGITS = 2**26
"""Logits alive at once in training: 256 MiB in fp32, whatever the vocabulary."""
SCORING_CHUNK_LOGITS = 2**24
"""...and when only scoring (evaluation, the reload probe): 64 MiB. Without a backward pass to feed, a smaller
chunk costs only a few more matmul calls; 16 probe rows of 32 tokens at Llama-3's vocabulary are 254 MB of
fp32 logits in one chunk of the training size (and their 16-bit originals next to them)."""


def _chunks(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, size: int
) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """Each chunk's rows, fp32 logits and log-partition (logsumexp), `size` logits at a time at most."""
    rows = max(1, size // weight.shape[0])
    for start in range(0, len(targets), rows):
        part = slice(start, start + rows)
        logits = torch.nn.functional.linear(hidden[part], weight, bias).float()
        yield part, logits, logits.logsumexp(dim=-1)


def _softmax_minus_one_hot(logits: torch.Tensor, log_partition: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """d loss / d logits of each row's cross-entropy: softmax - one-hot, built in place over the logits."""
    return (
        logits.sub_(log_partition[:, None])
        .exp_()
        .scatter_add_(1, chosen, torch.full_like(chosen, -1.0, dtype=logits.dtype))
    )


def linear_cross_entropy(hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor) -> torch.Tensor:
    """Per-row loss of `targets` under the logits `head(hidden)`: for scoring, or differentiable in the
    hidden states when they need a gradient (the head must be frozen then: a trained one takes
    `linear_cross_entropy_sum`, or the model's own logits)."""
    if torch.is_grad_enabled() and hidden.requires_grad:
        if any(p.requires_grad for p in head.parameters()):
            raise ValueError("per-row linear_cross_entropy does not differentiate the head; it must be frozen")
        return _LinearCrossEntropyRows.apply(hidden, head.weight, head.bias, targets)
    losses = torch.empty(len(targets), dtype=torch.float32, device=targets.device)
    with torch.no_grad():
        for part, logits, log_partition in _chunks(hidden, head.weight, head.bias, targets, SCORING_CHUNK_LOGITS):
            losses[part] = log_partition - logits.gather(1, targets[part, None]).squeeze(1)
    return losses


class _LinearCrossEntropyRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets):
        losses = torch.empty(len(targets), dtype=torch.float32, device=targets.device)
        grad_hidden = torch.empty_like(hidden)  # each row's d loss / d hidden, for a weight of 1
        for part, logits, log_partition in _chunks(hidden, weight, bias, targets, CHUNK_LOGITS):
            chosen = targets[part, None]
            losses[part] = log_partition - logits.gather(1, chosen).squeeze(1)
            grad_hidden[part] = _softmax_minus_one_hot(logits, log_partition, chosen).to(weight.dtype) @ weight
        ctx.save_for_backward(grad_hidden)
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_losses[:, None].to(grad_hidden.dtype), None, None, None


class _LinearCrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets):
        want_hidden, want_weight, want_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if want_bias else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for part, logits, log_partition in _chunks(hidden, weight, bias, targets, CHUNK_LOGITS):
            chosen = targets[part, None]
            total += (log_partition - logits.gather(1, chosen).squeeze(1)).sum()
            grad_logits = _softmax_minus_one_hot(logits, log_partition, chosen)
            if want_hidden:
                grad_hidden[part] = grad_logits.to(weight.dtype) @ weight
            if want_weight:
                grad_weight += grad_logits.T.to(hidden.dtype) @ hidden[part]
            if want_bias:
                grad_bias += grad_logits.sum(dim=0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = weight.dtype, None if bias is None else bias.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        return (
            None if grad_hidden is None else grad_hidden * grad_total.to(grad_hidden.dtype),
            None if grad_weight is None else (grad_weight * grad_total).to(weight_dtype),
            None if grad_bias is None else (grad_bias * grad_total).to(bias_dtype),
            None,
        )


def linear_cross_entropy_sum(hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor) -> torch.Tensor:
    """The summed loss of `targets` under the logits `head(hidden)`, differentiable in the hidden
    states and the head; the gradients are computed in the forward pass, chunk by chunk."""
    if not torch.is_grad_enabled():
        return linear_cross_entropy(hidden, head, targets).sum()
    return _LinearCrossEntropySum.apply(hidden, head.weight, head.bias, targets)
