"""Knowledge distillation from the base model (Hinton et al. 2015; LwF, Li & Hoiem 2016).

    loss = T^2 * KL(softmax(base / T) || softmax(tuned / T)), per position compared

An encoder classifier (whose head is new) keeps the base's sentence embeddings instead
(`kftune.retention.embedding`). Under a PEFT method the teacher is the same model with its adapter
disabled (`disable_adapter()`): no second copy of the weights. Otherwise it is a frozen copy of the base, loaded once.
"""

from __future__ import annotations

import torch

from kftune.retention.embedding import head_size, sentence_embeddings


def output_logits(model, batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
    """The model's logits at the batch's own positions (prompt-learning methods prepend virtual tokens)."""
    keys = ("input_ids", "attention_mask") if task == "masked_lm" else ("input_ids", "attention_mask", "position_ids")
    logits = model(**{k: batch[k] for k in keys if k in batch}).logits
    return logits[:, -batch["input_ids"].shape[1] :]


def distillation_sum(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, temperature: float
) -> torch.Tensor:
    """T^2 * KL(teacher || student) at temperature T, summed over the positions where `mask` is set."""
    teacher_log_probs = torch.log_softmax(teacher.float() / temperature, dim=-1)
    student_log_probs = torch.log_softmax(student.float() / temperature, dim=-1)
    per_position = torch.nn.functional.kl_div(
        student_log_probs, teacher_log_probs, log_target=True, reduction="none"
    ).sum(-1)
    return temperature**2 * per_position[mask.bool()].sum()


class Teacher:
    """The base model's outputs, without gradients: `model` with its adapter disabled, or `frozen` (a copy)."""

    def __init__(self, model, frozen=None):
        self.model, self.frozen = model, frozen

    def logits(self, batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
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
