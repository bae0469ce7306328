"""The alignment losses, per pair or per example, from sequence log-probabilities (or reward-model
scores). Each is the paper's formula; `sequence_logps` is the one place a model is run.

- Bradley-Terry (reward model, InstructGPT, Ouyang et al. 2022): -log sigmoid(r_chosen - r_rejected).
- DPO (Rafailov et al. 2023): -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))); with label
  smoothing eps, conservative DPO (cDPO): the labels are flipped with probability eps.
- IPO (Azar et al. 2023): ((pi_c - ref_c) - (pi_r - ref_r) - 1 / (2 beta))^2, on sequence log-probabilities.
- KTO (Ethayarajh et al. 2024): w_d (1 - sigmoid(beta (r - z))) for desirable examples,
  w_u (1 - sigmoid(beta (z - r))) for undesirable ones, r = pi - ref, z the batch's KL estimate.
- ORPO (Hong et al. 2024): NLL of the chosen response + lambda * -log sigmoid(log odds ratio), on
  length-normalised log-probabilities, no reference.
- SimPO (Meng et al. 2024): -log sigmoid(beta (avg_c - avg_r) - gamma), no reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kftune.prompts.build import IGNORE_INDEX
from kftune.train.losses import row_losses


def unwrapped(model):
    """The module under a DDP wrapper or DeepSpeed engine (no-grad passes bypass the wrapper)."""
    return getattr(model, "module", model)


def sequence_logps(model, batch: dict[str, torch.Tensor], prefix: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-probability of its labelled (response) tokens, and how many there are.
    `prefix` selects another sequence set of the batch (KTO's mismatched `kl_` rows)."""
    inputs = {key: batch[prefix + key] for key in ("input_ids", "attention_mask", "labels")}
    counts = (inputs["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1)
    return -row_losses(model, inputs), counts


def bradley_terry_losses(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    return -F.logsigmoid(chosen_scores - rejected_scores)


def dpo_losses(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    logits = beta * ((policy_chosen - reference_chosen) - (policy_rejected - reference_rejected))
    return -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing


def ipo_losses(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    margin = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    return (margin - 1 / (2 * beta)) ** 2


def kto_losses(
    policy: torch.Tensor,
    reference: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> torch.Tensor:
    """`kl`: the estimate of KL(policy || reference) the rewards are measured against; no gradient flows through it."""
    reward, z = policy - reference, kl.detach().clamp(min=0)
    return torch.where(
        desirable.bool(),
        desirable_weight * (1 - torch.sigmoid(beta * (reward - z))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z - reward))),
    )


def orpo_losses(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, lam: float) -> torch.Tensor:
    """On mean per-token log-probabilities; log(1 - p) as log(-expm1(log p)), exact near p = 1."""
    log_odds = (chosen_mean - rejected_mean) - (
        torch.log(-torch.expm1(chosen_mean)) - torch.log(-torch.expm1(rejected_mean))
    )
    return -chosen_mean - lam * F.logsigmoid(log_odds)


def simpo_losses(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    return -F.logsigmoid(beta * (chosen_mean - rejected_mean) - gamma)
