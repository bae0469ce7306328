"""GRPO (Shao et al. 2024): online RL without a critic. For each prompt of the micro-batch the policy
samples `online.group_size` completions inside the training worker; each completion's advantage is
its reward standardised within its group; the loss is the policy-gradient term plus a KL penalty to
the reference model (the k3 estimator, exp(ref - pi) - (ref - pi) - 1), averaged over each
completion's tokens. One optimizer step per rollout, so the importance ratio pi / pi_old is 1 in
value and only its gradient (that of log pi) remains, as in the paper's on-policy case.

Rewards come from a Python function given by path (`online.reward_function`) or a registered kftune
reward model (`online.reward_model`), which re-tokenizes the texts with its own tokenizer.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import torch

from kftune.alignment.losses import unwrapped
from kftune.errors import KftuneError
from kftune.prompts.build import IGNORE_INDEX
from kftune.prompts.collate import Collator
from kftune.train.losses import next_token_losses

RewardFunction = Callable[[list[str], list[str]], list[float]]


def load_reward_function(spec: str) -> RewardFunction:
    """`path/to/file.py:function`, imported from the file."""
    path, _, name = spec.rpartition(":")
    if not Path(path).is_file():
        raise KftuneError(f"online.reward_function: {path} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"kftune_reward_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    function = getattr(module, name, None)
    if not callable(function):
        raise KftuneError(f"online.reward_function: {path} has no function {name!r}")
    return function


def load_rewards(config) -> RewardFunction:
    """The run's source of rewards: `online.reward_function` or `online.reward_model`."""
    if config.online.reward_function:
        return load_reward_function(config.online.reward_function)
    return load_reward_model(config.online.reward_model, config.registry.tracking_uri)


def check_reward_model(uri: str, tracking_uri: str | None, field: str = "online.reward_model") -> None:
    """Fail unless `uri` (the config's `field`) names a registered version trained with stage: reward."""
    import mlflow
    from mlflow import MlflowClient

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    name, _, selector = uri.removeprefix("models:/").replace("@", "/@").partition("/")
    client = MlflowClient()
    try:
        version = (
            client.get_model_version_by_alias(name, selector[1:])
            if selector.startswith("@")
            else client.get_model_version(name, selector)
        )
        stage = client.get_run(version.run_id).data.params.get("stage", "sft")
    except mlflow.exceptions.MlflowException as exc:
        raise KftuneError(f"{field}: {uri} is not in MLflow at {mlflow.get_tracking_uri()} ({exc})") from None
    if stage != "reward":
        raise KftuneError(f"{field}: {uri} was trained with stage {stage}, not as a reward model (stage: reward)")


def load_reward_model(uri: str, tracking_uri: str | None, field: str = "online.reward_model") -> RewardFunction:
    """A registered reward model's pyfunc as a reward function: a policy prompt rendered as
    Human/Assistant text is passed on as a transcript, its completion as the response."""
    import mlflow
    import pandas as pd

    check_reward_model(uri, tracking_uri, field)
    served = mlflow.pyfunc.load_model(uri)

    def rewards(prompts: list[str], completions: list[str]) -> list[float]:
        frame = pd.DataFrame({"prompt": prompts, "response": completions})
        return served.predict(frame)["reward"].tolist()

    return rewards


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Each reward standardised within its prompt's group of completions."""
    groups = rewards.view(-1, group_size)
    return ((groups - groups.mean(dim=1, keepdim=True)) / (groups.std(dim=1, keepdim=True) + 1e-4)).flatten()


def token_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """log p of each labelled token given the ones before it (0 elsewhere), differentiable."""
    return -next_token_losses(model, batch)


def grpo_losses(
    policy: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor, kl_beta: float
) -> torch.Tensor:
    """Per completion: the mean over its tokens of -A * pi/pi_old + kl_beta * k3(pi, ref)."""
    ratio = torch.exp(policy - policy.detach())
    log_ratio = reference - policy
    per_token = -ratio * advantages[:, None] + kl_beta * (torch.exp(log_ratio) - log_ratio - 1)
    return (per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


class GroupRelative:
    def __init__(self, settings, reference, collate, tokenizer, reward: RewardFunction):
        self.settings, self.reference, self.collate = settings, reference, collate
        self.sample = Sampler(settings, tokenizer, reward)

    def items(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return completions(batch, self.settings.group_size)

    def loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        rollout = self.rollout(model, batch)
        policy = token_logps(model, rollout)
        mask = (rollout["labels"][:, 1:] != IGNORE_INDEX).float()
        return grpo_losses(policy, rollout["reference"], mask, rollout["advantages"], self.settings.kl_beta).sum()

    @torch.no_grad()
    def rollout(self, model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Sampled completions as labelled sequences, with their advantages and reference log-probabilities."""
        sequences, rewards = self.sample(model, batch)
        return {
            **sequences,
            "advantages": group_advantages(rewards, self.settings.group_size),
            "reference": self.reference.token_logps(model, sequences),
        }


def completions(batch: dict[str, torch.Tensor], group_size: int) -> torch.Tensor:
    """The completions a prompt batch's rollout holds: `group_size` per prompt."""
    return torch.tensor(batch["input_ids"].shape[0] * group_size, device=batch["input_ids"].device)


class Sampler:
    """`online.group_size` sampled completions of each prompt of a (left-padded) batch, as labelled
    sequences (the completion labelled), and their rewards."""

    def __init__(self, settings, tokenizer, reward: RewardFunction):
        self.settings, self.tokenizer, self.reward = settings, tokenizer, reward
        self.pad = Collator(tokenizer.pad_token_id, "causal_lm")

    @torch.no_grad()
    def __call__(self, model, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        settings, tokenizer, module = self.settings, self.tokenizer, unwrapped(model)
        width = batch["input_ids"].shape[1]
        output = module.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            do_sample=True,
            temperature=settings.temperature,
            max_new_tokens=settings.max_new_tokens,
            num_return_sequences=settings.group_size,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            use_cache=True,
        )
        prompts = [
            ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)
        ]
        rows, prompt_texts, completion_texts = [], [], []
        for i, generated in enumerate(output[:, width:].tolist()):
            prompt = prompts[i // settings.group_size]
            completion = until_eos(generated, tokenizer.eos_token_id)
            rows.append({"input_ids": prompt + completion, "labels": [IGNORE_INDEX] * len(prompt) + completion})
            prompt_texts.append(tokenizer.decode(prompt, skip_special_tokens=True))
            completion_texts.append(tokenizer.decode(completion, skip_special_tokens=True))
        device = batch["input_ids"].device
        rewards = torch.tensor(self.reward(prompt_texts, completion_texts), dtype=torch.float32, device=device)
        return {key: value.to(device) for key, value in self.pad(rows).items()}, rewards


def until_eos(ids: list[int], eos: int) -> list[int]:
    """A sampled completion up to and including its end-of-sequence token (at least one token)."""
    return ids[: ids.index(eos) + 1] if eos in ids else ids
