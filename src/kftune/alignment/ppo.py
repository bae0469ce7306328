"""PPO against a reward (InstructGPT, Ouyang et al. 2022; Ziegler et al. 2019), inside the training worker.

A rollout: `online.group_size` sampled completions of each prompt of the micro-batch, scored by the
reward function or reward model; the policy's (pi_old) and the reference's per-token log-probabilities
and the value head's predictions, all without gradient. Each completion token's reward is the KL
penalty -kl_beta * (log pi_old - log pi_ref), and its last token also gets the score. Advantages
are GAE (Schulman et al. 2016) over the response's tokens, whitened over the rollout; the value
head's targets are advantage + value. The loss of each completion is the mean over its tokens of the
clipped surrogate objective (Schulman et al. 2017) plus `value_coef` times the clipped value loss.

The value head is a linear layer on the policy's last hidden states, registered on the model (as
`value_head`) so that the optimizer steps it with the method's parameters (under PEFT: alongside the
adapter) and DDP averages its gradients; it is removed before the model is saved. `online.ppo_epochs`
optimizer steps use each rollout: the loader hands each step's micro-batches that many times in a
row (`repeat_for_updates`), tagged so the objective samples once and reuses the rollout.
"""

from __future__ import annotations

import itertools

import torch

from kftune.alignment.losses import unwrapped
from kftune.alignment.online import Sampler, completions
from kftune.prompts.build import IGNORE_INDEX
from kftune.train.losses import next_token_losses_and_states

VALUE_HEAD = "value_head"
ROLLOUT_TAG = "rollout"


def attach_value_head(model) -> torch.nn.Linear:
    """A zero-initialised scalar head on the model's hidden states (it starts by predicting 0)."""
    module = unwrapped(model)
    head = torch.nn.Linear(module.config.hidden_size, 1)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    module.add_module(VALUE_HEAD, head)
    return head


def remove_training_heads(module) -> None:
    """Drop what training added that the tuned model does not hold (PPO's value head), before it is saved."""
    if VALUE_HEAD in module._modules:
        del module._modules[VALUE_HEAD]


def policy_and_values(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi of each labelled token given the ones before it (0 elsewhere), and the value head's
    prediction at the position that samples it; one forward pass, differentiable."""
    losses, hidden = next_token_losses_and_states(model, batch)
    head = getattr(unwrapped(model), VALUE_HEAD)
    return -losses, head(hidden.to(head.weight.dtype)).squeeze(-1).float()


def token_rewards(
    scores: torch.Tensor, policy: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor, kl_beta: float
) -> torch.Tensor:
    """Per completion token: -kl_beta * (log pi_old - log pi_ref), plus the completion's score at its last token."""
    rewards = -kl_beta * (policy - reference) * mask
    last = mask.shape[1] - 1 - mask.flip(1).argmax(dim=1)
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages A_t = sum_l (gamma lam)^l delta_{t+l}, delta_t = r_t + gamma V_{t+1} - V_t, the value after
    a completion's last token 0; and the returns A + V the value head learns. 0 outside the completion."""
    advantages = torch.zeros_like(rewards)
    next_advantage = next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        next_value = values[:, t] * mask[:, t]
        advantages[:, t] = next_advantage
    return advantages, (advantages + values) * mask


def whitened(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance over the masked entries (0 elsewhere)."""
    count = mask.sum()
    mean = (values * mask).sum() / count
    variance = (((values - mean) * mask) ** 2).sum() / count
    return (values - mean) * torch.rsqrt(variance + 1e-8) * mask


def ppo_losses(
    policy: torch.Tensor,
    values: torch.Tensor,
    rollout: dict[str, torch.Tensor],
    mask: torch.Tensor,
    settings,
) -> torch.Tensor:
    """Per completion, the mean over its tokens of the clipped surrogate loss
    max(-A r, -A clip(r, 1 - eps, 1 + eps)), r = pi / pi_old, plus value_coef times the clipped value loss
    1/2 max((V - R)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - R)^2)."""
    advantages, returns, old_values = rollout["advantages"], rollout["returns"], rollout["values"]
    ratio = torch.exp(policy - rollout["logps"])
    eps = settings.clip_range
    policy_loss = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - eps, 1 + eps))
    clipped = old_values + (values - old_values).clamp(-settings.value_clip_range, settings.value_clip_range)
    value_loss = 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    per_token = policy_loss + settings.value_coef * value_loss
    return (per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


class ProximalPolicy:
    """The ppo stage's objective: samples a rollout the first time a micro-batch comes, reuses it after."""

    def __init__(self, settings, reference, collate, tokenizer, reward, model):
        self.settings, self.reference, self.collate = settings, reference, collate
        self.sample = Sampler(settings, tokenizer, reward)
        self.updates_per_rollout = settings.ppo_epochs
        self.rollouts: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        attach_value_head(model)

    def items(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return completions(batch, self.settings.group_size)

    def loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        rollout = self.cached_rollout(model, batch)
        policy, values = policy_and_values(model, rollout)
        mask = (rollout["labels"][:, 1:] != IGNORE_INDEX).float()
        return ppo_losses(policy, values, rollout, mask, self.settings).sum()

    def cached_rollout(self, model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if ROLLOUT_TAG not in batch:
            return self.rollout(model, batch)
        key = tuple(batch[ROLLOUT_TAG].tolist())
        if key not in self.rollouts:
            if any(step != key[0] for step, _ in self.rollouts):  # the previous step's rollouts are spent
                self.rollouts.clear()
            self.rollouts[key] = self.rollout(model, batch)
        return self.rollouts[key]

    @torch.no_grad()
    def rollout(self, model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Sampled completions with pi_old's log-probabilities and values, the advantages and returns."""
        settings = self.settings
        sequences, scores = self.sample(model, batch)
        mask = (sequences["labels"][:, 1:] != IGNORE_INDEX).float()
        logps, values = policy_and_values(unwrapped(model), sequences)
        reference = self.reference.token_logps(model, sequences)
        rewards = token_rewards(scores, logps, reference, mask, settings.kl_beta)
        advantages, returns = gae(rewards, values * mask, mask, settings.gamma, settings.lam)
        return {
            **sequences,
            "logps": logps,
            "values": values * mask,
            "advantages": whitened(advantages, mask),
            "returns": returns,
        }


class RepeatedBatches:
    """A loader whose every `group` micro-batches (one optimizer step) come `times` times in a row, each
    tagged (step, position) under `ROLLOUT_TAG`; a last incomplete group is left out, as the loop does."""

    def __init__(self, loader, times: int, group: int):
        self.loader, self.times, self.group = loader, times, group
        self.steps = itertools.count()  # across epochs: a tag names one rollout

    def __len__(self) -> int:
        return len(self.loader) // self.group * self.group * self.times

    def __iter__(self):
        batches = iter(self.loader)
        while micro_batches := list(itertools.islice(batches, self.group)):
            if len(micro_batches) < self.group:
                return
            step = next(self.steps)
            tagged = [{**b, ROLLOUT_TAG: torch.tensor([step, i])} for i, b in enumerate(micro_batches)]
            for _ in range(self.times):
                yield from tagged


def repeat_for_updates(loader, objective, group: int):
    """The loader the training loop reads: PPO's repeats each step's micro-batches once per update."""
    times = getattr(objective, "updates_per_rollout", 1)
    return loader if times == 1 else RepeatedBatches(loader, times, group)
