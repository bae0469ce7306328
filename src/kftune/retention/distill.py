"""Knowledge distillation from the base model (Hinton et al. 2015; LwF, Li & Hoiem 2016).

    loss = T^2 * KL(softmax(base / T) || softmax(tuned / T)), per position compared

A causal LM of a plain-head family hands over its last hidden states and output layer (`Projected`)
instead of its logits, and the KL goes through both models' output layers a chunk of positions at a
time (`kftune.train.linear_cross_entropy.linear_kl_sum`): two models' full fp32 logits at Llama-3's
vocabulary would be 8 GiB for 8 rows of 1024 tokens, before their log-probabilities and gradient.

An encoder classifier (whose head is new) keeps the base's sentence embeddings instead
(`kftune.retention.embedding`). Under a PEFT method the teacher is the same model with its adapter
disabled (`disable_adapter()`): no second copy of the weights. Otherwise it is a frozen copy of the base, loaded once.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from kftune.prompts.packing import IGNORE_INDEX
from kftune.retention.embedding import head_size, sentence_embeddings
from kftune.train.linear_cross_entropy import linear_cross_entropy_sum, linear_kl_sum
from kftune.train.losses import gathered, last_hidden_states, plain_output_head


@dataclass(frozen=True)
class Projected:
    """A causal LM's logits, not computed: its last hidden states at the batch's positions and the output
    layer that maps them onto the vocabulary."""

    hidden: torch.Tensor
    head: torch.nn.Linear

    def logits(self) -> torch.Tensor:
        with gathered(self.head):
            return torch.nn.functional.linear(self.hidden, self.head.weight, self.head.bias)


def output_logits(model, batch: dict[str, torch.Tensor], task: str) -> torch.Tensor | Projected:
    """The model's logits at the batch's own positions (prompt-learning methods prepend virtual tokens), or
    a causal LM's `Projected` ones where its output layer is plain (`plain_output_head`)."""
    length = batch["input_ids"].shape[1]
    if task == "causal_lm" and (head := plain_output_head(model)):
        return Projected(last_hidden_states(model, head, batch)[:, -length:], head)
    keys = ("input_ids", "attention_mask") if task == "masked_lm" else ("input_ids", "attention_mask", "position_ids")
    return model(**{k: batch[k] for k in keys if k in batch}).logits[:, -length:]


def distillation_sum(
    student: torch.Tensor | Projected, teacher: torch.Tensor | Projected, mask: torch.Tensor, temperature: float
) -> torch.Tensor:
    """T^2 * KL(teacher || student) at temperature T, summed over the positions where `mask` is set."""
    rows = mask.bool()
    if isinstance(student, Projected) and isinstance(teacher, Projected):
        shared = teacher.head is student.head  # a PEFT model's teacher: its adapter disabled
        with gathered(student.head), contextlib.nullcontext() if shared else gathered(teacher.head):
            return linear_kl_sum(student.hidden[rows], student.head, teacher.hidden[rows], teacher.head, temperature)
    student, teacher = (x.logits() if isinstance(x, Projected) else x for x in (student, teacher))
    teacher_log_probs = torch.log_softmax(teacher.float() / temperature, dim=-1)
    student_log_probs = torch.log_softmax(student.float() / temperature, dim=-1)
    per_position = torch.nn.functional.kl_div(
        student_log_probs, teacher_log_probs, log_target=True, reduction="none"
    ).sum(-1)
    return temperature**2 * per_position[rows].sum()


def language_model_loss(outputs: torch.Tensor | Projected, labels: torch.Tensor, task: str) -> torch.Tensor:
    """The pre-training objective's mean token loss: next token (causal LM) or the masked token (masked LM)."""
    if isinstance(outputs, Projected):
        predicting = labels[:, 1:] != IGNORE_INDEX
        with gathered(outputs.head):
            total = linear_cross_entropy_sum(
                outputs.hidden[:, :-1][predicting], outputs.head, labels[:, 1:][predicting]
            )
        return total / predicting.sum()
    logits = outputs
    if task != "masked_lm":
        logits, labels = logits[:, :-1], labels[:, 1:]
    return torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX)


class Teacher:
    """The base model's outputs, without gradients: `model` with its adapter disabled, or `frozen` (a copy)."""

    def __init__(self, model, frozen=None):
        self.model, self.frozen = model, frozen

    def logits(self, batch: dict[str, torch.Tensor], task: str) -> torch.Tensor | Projected:
        return self._base(lambda model: output_logits(model, batch, task))

    def embeddings(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._base(lambda model: sentence_embeddings(model, batch))

    @torch.no_grad()
    def _base(self, compute):
        if self.frozen is not None:
            return compute(self.frozen)
        was_training = self.model.training
        self.model.eval()  # the base as it predicts: no dropout
        try:
            with self.model.disable_adapter():
                return compute(self.model)
        finally:
            self.model.train(was_training)


def frozen_copy(config, device: torch.device):
    """The base model for a method that trains it in place: loaded again, frozen, in the run's weights dtype;
    under ZeRO-3 partitioned like the model it teaches (`kftune.train.partitioned`)."""
    from kftune.models import load_run_base_model, weights_dtype

    if config.train.partitions_weights:
        from kftune.train.partitioned import frozen_partitioned_copy

        return frozen_partitioned_copy(config, head_size(config.model.task))
    frozen = weights_dtype(config.train.precision, "lora", bool(config.train.deepspeed))  # 16 bits when training is
    base = load_run_base_model(config, head_size(config.model.task), frozen)
    return base.to(device).eval().requires_grad_(False)


def is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")
