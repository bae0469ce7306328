"""What the training loop asks of a run's stage: its collator, its loss summed over the items of a
micro-batch, and how many items (rows, tokens or pairs) the micro-batch holds. The loop divides the
summed loss by the items of the whole global batch, so every stage is averaged the same way.

The reference model of dpo and kto (`preference.reference`): under PEFT the policy itself with its
adapter switched off (no second copy of the weights), otherwise a frozen copy of the starting model.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch

from kftune.alignment import losses
from kftune.alignment.collate import FeedbackCollator, PairCollator, PromptCollator
from kftune.alignment.config import REFERENCE_STAGES, resolved_reference
from kftune.alignment.losses import unwrapped
from kftune.prompts.collate import make_collator
from kftune.train.losses import loss_items, next_token_losses, summed_loss


def training_objective(config, meta: dict[str, Any], model, varlen: bool = False):
    """The objective of `config.stage`, for `model` as built (before training: a frozen reference copies it)."""
    if config.stage == "sft":
        return Supervised(config.model.task, make_collator(meta, config.model.task, varlen=varlen))
    if config.stage == "reward":
        return RewardModel(PairCollator(meta["pad_token_id"]))
    reference = Reference(resolved_reference(config), model) if config.stage in REFERENCE_STAGES else None
    if config.stage == "grpo":
        from kftune.alignment.online import GroupRelative, load_rewards
        from kftune.models import load_tokenizer, resolve_model_path

        tokenizer = load_tokenizer(resolve_model_path(config.model.name_or_path))
        reward = load_rewards(config)
        return GroupRelative(config.online, reference, PromptCollator(meta["pad_token_id"]), tokenizer, reward)
    collate = FeedbackCollator if config.stage == "kto" else PairCollator
    return Preference(config.stage, config.preference, reference, collate(meta["pad_token_id"]))


class Supervised:
    """Token cross-entropy (classification: per row), as `kftune.train.losses` computes it."""

    def __init__(self, task: str, collate):
        self.task, self.collate = task, collate

    def loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return summed_loss(model, batch, self.task)

    def items(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return loss_items(batch, self.task)


def pairs(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A pair batch's pairs: half its rows."""
    return torch.tensor(batch["input_ids"].shape[0] // 2, device=batch["input_ids"].device)


def chosen_rejected(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    half = values.shape[0] // 2
    return values[:half], values[half:]


class RewardModel:
    """A scalar head trained with the Bradley-Terry loss on (chosen, rejected) pairs."""

    def __init__(self, collate: PairCollator):
        self.collate = collate

    def loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0].float()
        return losses.bradley_terry_losses(*chosen_rejected(scores)).sum()

    items = staticmethod(pairs)


class Reference:
    """The frozen reference model's sequence log-probabilities."""

    def __init__(self, kind: str, model):
        self.kind = kind
        self.copy = None
        if kind == "copy":
            self.copy = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def logps(self, policy, batch: dict[str, torch.Tensor], prefix: str = "") -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's summed response log-probability and its token count."""
        with self.model(policy, batch["input_ids"].device) as model:
            return losses.sequence_logps(model, batch, prefix)

    @torch.no_grad()
    def token_logps(self, policy, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The log-probability of each labelled token (0 elsewhere)."""
        with self.model(policy, batch["input_ids"].device) as model:
            return -next_token_losses(model, batch)

    @contextlib.contextmanager
    def model(self, policy, device: torch.device):
        if self.copy is not None:
            yield self.copy.to(device)
            return
        module = unwrapped(policy)
        with module.disable_adapter():
            yield module


class Preference:
    """The DPO family: dpo (sigmoid, IPO, cDPO), kto, orpo and simpo, per `preference` settings."""

    def __init__(self, stage: str, settings, reference: Reference | None, collate):
        self.stage, self.settings, self.reference, self.collate = stage, settings, reference, collate
        self.beta = settings.beta_for(stage)

    def loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.example_losses(model, batch).sum()

    def items(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return (
            torch.tensor(len(batch["desirable"]), device=batch["desirable"].device)
            if self.stage == "kto"
            else pairs(batch)
        )

    def example_losses(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        settings = self.settings
        policy, counts = losses.sequence_logps(model, batch)
        if self.stage == "kto":
            reference, _ = self.reference.logps(model, batch)
            with torch.no_grad():
                kl = (
                    losses.sequence_logps(unwrapped(model), batch, "kl_")[0]
                    - self.reference.logps(model, batch, "kl_")[0]
                )
            return losses.kto_losses(
                policy,
                reference,
                batch["desirable"],
                kl.mean(),
                self.beta,
                settings.desirable_weight,
                settings.undesirable_weight,
            )
        if self.stage in ("orpo", "simpo"):
            mean = policy / counts
            if self.stage == "orpo":
                return losses.orpo_losses(*chosen_rejected(mean), self.beta)
            return losses.simpo_losses(*chosen_rejected(mean), self.beta, settings.simpo_gamma)
        reference, _ = self.reference.logps(model, batch)
        if settings.loss == "ipo":
            return losses.ipo_losses(*chosen_rejected(policy), *chosen_rejected(reference), self.beta)
        return losses.dpo_losses(
            *chosen_rejected(policy), *chosen_rejected(reference), self.beta, settings.label_smoothing
        )
