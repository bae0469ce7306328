"""What the training loop asks of a run's stage: its collator, its loss summed over the items of a
micro-batch, and how many items (rows, tokens or pairs) the micro-batch holds. The loop divides the
summed loss by the items of the whole global batch, so every stage is averaged the same way.

The reference model of dpo and kto (`preference.reference`): under PEFT the policy itself with its
adapter switched off (no second copy of the weights), otherwise a frozen copy of the starting model
(under ZeRO-3 loaded again partitioned), or (dpo; its default under ZeRO-3, holding no second model) the
starting policy's log-probabilities of every training sequence, computed once before the first optimizer step.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
from typing import Any

import torch

from kftune.alignment import losses
from kftune.alignment.collate import FeedbackCollator, PairCollator, PromptCollator
from kftune.alignment.config import ONLINE_STAGES, REFERENCE_STAGES, resolved_reference
from kftune.alignment.losses import unwrapped
from kftune.prompts.build import IGNORE_INDEX
from kftune.prompts.collate import make_collator
from kftune.train.losses import loss_items, next_token_losses, summed_loss


def training_objective(config, meta: dict[str, Any], model, varlen: bool = False, rows=()):
    """The objective of `config.stage`, for `model` as built (before training: a frozen reference copies it);
    `rows`: the training rows, whose reference log-probabilities a precomputed reference takes."""
    if config.stage == "sft":
        return Supervised(config.model.task, make_collator(meta, config.model.task, varlen=varlen))
    if config.stage == "reward":
        return RewardModel(PairCollator(meta["pad_token_id"]))
    reference = (
        Reference(
            resolved_reference(config),
            frozen_reference(config, model),
            rows,
            PairCollator(meta["pad_token_id"]),
            config.train.batch_size,
        )
        if config.stage in REFERENCE_STAGES
        else None
    )
    if config.stage in ONLINE_STAGES:
        from kftune.alignment.online import GroupRelative, load_rewards
        from kftune.alignment.ppo import ProximalPolicy
        from kftune.models import load_tokenizer, resolve_model_path

        tokenizer = load_tokenizer(resolve_model_path(config.model.name_or_path))
        reward, collate = load_rewards(config), PromptCollator(meta["pad_token_id"])
        if config.stage == "ppo":
            return ProximalPolicy(config.online, reference, collate, tokenizer, reward, model)
        return GroupRelative(config.online, reference, collate, tokenizer, reward)
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


def frozen_reference(config, model):
    """`preference.reference: copy`'s model: the policy's starting weights, frozen. Deep-copied; under ZeRO-3,
    where no worker holds them whole, loaded again partitioned (`kftune.train.partitioned`). None otherwise."""
    if resolved_reference(config) != "copy":
        return None
    if config.train.partitions_weights:
        from kftune.train.partitioned import frozen_partitioned_copy

        return frozen_partitioned_copy(config, None)
    return copy.deepcopy(model)


class Reference:
    """The frozen reference model's sequence log-probabilities: the policy with its adapter disabled, a frozen
    copy (`frozen`), or a table precomputed from the starting weights."""

    def __init__(self, kind: str, frozen=None, rows=(), collate=None, batch_size: int = 8):
        self.kind = kind
        self.copy = frozen.eval().requires_grad_(False) if frozen is not None else None
        self.rows, self.collate, self.batch_size = rows, collate, batch_size
        self.table: dict[bytes, float] | None = None  # precomputed: log-probability by sequence

    @torch.no_grad()
    def logps(self, policy, batch: dict[str, torch.Tensor], prefix: str = "") -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's summed response log-probability and its token count."""
        if self.kind == "precomputed":
            return self.precomputed(policy, batch)
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
            partitioned = hasattr(next(self.copy.parameters()), "ds_id")  # DeepSpeed placed it with its engine
            yield self.copy if partitioned else self.copy.to(device)
            return
        module = unwrapped(policy)
        with module.disable_adapter():
            yield module

    def precomputed(self, policy, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Looked up by sequence; the table is filled by `precompute_reference` before training (else on the
        first call)."""
        if self.table is None:
            self.table = self.score_rows(unwrapped(policy), batch["input_ids"].device)
        counts = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1)
        rows = zip(batch["input_ids"], batch["attention_mask"], strict=True)
        values = [self.table[sequence_key(ids, mask)] for ids, mask in rows]
        return torch.tensor(values, dtype=torch.float32, device=counts.device), counts

    @torch.no_grad()
    def score_rows(self, model, device: torch.device) -> dict[bytes, float]:
        """Every training row's log-probabilities under `model`: each worker scores its share in the same number
        of passes (ZeRO-3 gathers layers in each), then the workers exchange their tables."""
        import torch.distributed as dist

        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        indices = list(range(len(self.rows)))
        share = indices[rank::world] or indices[:1]
        share += share[-1:] * (-(-len(indices) // world) - len(share))  # equal counts on every worker
        table = {}
        for start in range(0, len(share), self.batch_size):
            chunk = [self.rows[i] for i in share[start : start + self.batch_size]]
            batch = {k: v.to(device) for k, v in self.collate(chunk).items()}
            values, _ = losses.sequence_logps(model, batch)
            for ids, mask, value in zip(batch["input_ids"], batch["attention_mask"], values.tolist(), strict=True):
                table[sequence_key(ids, mask)] = value
        if world > 1:
            tables = [None] * world
            dist.all_gather_object(tables, table)
            table = {key: value for part in tables for key, value in part.items()}
        return table


def precompute_reference(objective, model, device: torch.device) -> None:
    """A precomputed reference's table, from the starting weights: called before a checkpoint's weights load."""
    reference = getattr(objective, "reference", None)
    if reference is not None and reference.kind == "precomputed" and reference.table is None:
        reference.table = reference.score_rows(unwrapped(model), device)


def sequence_key(ids: torch.Tensor, mask: torch.Tensor) -> bytes:
    """A padded row's identity: a digest of its real tokens."""
    return hashlib.blake2b(ids[mask.bool()].cpu().numpy().tobytes(), digest_size=16).digest()


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
