"""Cross-entropy through the LM head a chunk of tokens at a time, so the full (tokens x vocabulary)
fp32 logits never exist.

At Llama-3's vocabulary (128,256) a micro-batch of 8 x 2048 tokens has 2.1 G logits: 8 GiB in fp32,
and as much again for their gradient, more than the rest of a 1B model's training state. Here each
chunk's logits become its loss and, in the same pass, its gradients for the hidden states and (when
it trains) the head; then they are dropped. The backward pass only scales what the forward kept.
The idea of Liger's fused linear cross-entropy, in plain PyTorch.

Distillation (`linear_kl_sum`) compares two models' distributions the same way: both models' logits
of a chunk of positions, the KL and its gradient, then dropped.

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
KL_CHUNK_LOGITS = 2**24
"""...and for distillation, whose chunk holds about four buffers of this size at once (the two models'
log-probabilities, the teacher's probabilities, the student's gradient): 64 MiB each in fp32."""
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
        gradients = torch.empty_like(hidden), None, None  # each row's d loss / d hidden, for a weight of 1
        for part, logits, log_partition in _chunks(hidden, weight, bias, targets, CHUNK_LOGITS):
            chosen = targets[part, None]
            losses[part] = log_partition - logits.gather(1, chosen).squeeze(1)
            _accumulate(gradients, part, _softmax_minus_one_hot(logits, log_partition, chosen), hidden, weight)
        ctx.save_for_backward(gradients[0])
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_losses[:, None].to(grad_hidden.dtype), None, None, None


class _LinearCrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets):
        gradients = _gradient_buffers(ctx, hidden, weight, bias)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for part, logits, log_partition in _chunks(hidden, weight, bias, targets, CHUNK_LOGITS):
            chosen = targets[part, None]
            total += (log_partition - logits.gather(1, chosen).squeeze(1)).sum()
            _accumulate(gradients, part, _softmax_minus_one_hot(logits, log_partition, chosen), hidden, weight)
        _save_gradients(ctx, gradients, weight, bias)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        return *_scaled_gradients(ctx, grad_total), None


def _gradient_buffers(ctx, hidden, weight, bias) -> tuple[torch.Tensor | None, ...]:
    """What a summed loss's forward pass fills: the gradients of the inputs that need one (fp32 for the head)."""
    want_hidden, want_weight, want_bias = ctx.needs_input_grad[:3]
    return (
        torch.empty_like(hidden) if want_hidden else None,
        torch.zeros_like(weight, dtype=torch.float32) if want_weight else None,
        torch.zeros_like(bias, dtype=torch.float32) if want_bias else None,
    )


def _accumulate(gradients, part: slice, grad_logits: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor) -> None:
    """Adds one chunk's d loss / d logits to the hidden states', the head's weight's and its bias' gradients."""
    grad_hidden, grad_weight, grad_bias = gradients
    if grad_hidden is not None:
        grad_hidden[part] = grad_logits.to(weight.dtype) @ weight
    if grad_weight is not None:
        grad_weight += grad_logits.T.to(hidden.dtype) @ hidden[part]
    if grad_bias is not None:
        grad_bias += grad_logits.sum(dim=0)


def _save_gradients(ctx, gradients, weight, bias) -> None:
    ctx.save_for_backward(*gradients)
    ctx.dtypes = weight.dtype, None if bias is None else bias.dtype


def _scaled_gradients(ctx, grad_total) -> tuple[torch.Tensor | None, ...]:
    """The gradients the forward pass computed, times the summed loss's own gradient, in the inputs' dtypes."""
    grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
    weight_dtype, bias_dtype = ctx.dtypes
    return (
        None if grad_hidden is None else grad_hidden * grad_total.to(grad_hidden.dtype),
        None if grad_weight is None else (grad_weight * grad_total).to(weight_dtype),
        None if grad_bias is None else (grad_bias * grad_total).to(bias_dtype),
    )


def linear_cross_entropy_sum(hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor) -> torch.Tensor:
    """The summed loss of `targets` under the logits `head(hidden)`, differentiable in the hidden
    states and the head; the gradients are computed in the forward pass, chunk by chunk."""
    if not torch.is_grad_enabled():
        return linear_cross_entropy(hidden, head, targets).sum()
    return _LinearCrossEntropySum.apply(hidden, head.weight, head.bias, targets)


class _LinearKLSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, temperature):
        gradients = _gradient_buffers(ctx, hidden, weight, bias)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        rows = max(1, KL_CHUNK_LOGITS // weight.shape[0])
        for start in range(0, len(hidden), rows):
            part = slice(start, start + rows)
            student = torch.nn.functional.linear(hidden[part], weight, bias).float().div_(temperature).log_softmax(-1)
            teacher = (
                torch.nn.functional.linear(teacher_hidden[part], teacher_weight, teacher_bias)
                .float()
                .div_(temperature)
                .log_softmax(-1)
            )
            teacher_probs = teacher.exp()
            total += teacher.sub_(student).mul_(teacher_probs).sum()  # KL(teacher || student) of each row, summed
            # d (T^2 KL) / d student logits = T^2 * (student probabilities - teacher probabilities) / T
            grad_logits = student.exp_().sub_(teacher_probs).mul_(temperature)
            _accumulate(gradients, part, grad_logits, hidden, weight)
        _save_gradients(ctx, gradients, weight, bias)
        return total * temperature**2

    @staticmethod
    def backward(ctx, grad_total):
        return *_scaled_gradients(ctx, grad_total), None, None, None, None


def linear_kl_sum(
    hidden: torch.Tensor,
    head: torch.nn.Linear,
    teacher_hidden: torch.Tensor,
    teacher_head: torch.nn.Linear,
    temperature: float,
) -> torch.Tensor:
    """T^2 * KL(softmax(teacher_head(teacher_hidden) / T) || softmax(head(hidden) / T)), summed over the
    rows (Hinton et al. 2015), differentiable in the student's hidden states and head; the teacher's side
    takes no gradient. The gradients are computed in the forward pass, chunk by chunk."""
    teacher = [p.detach() if p is not None else None for p in (teacher_head.weight, teacher_head.bias)]
    return _LinearKLSum.apply(hidden, head.weight, head.bias, teacher_hidden.detach(), *teacher, temperature)
