"""The evaluate step for alignment stages, on the held-out test pairs (or KTO feedback):

- reward model: pairwise accuracy (the chosen response scored above the rejected one) and the mean
  score margin, of the trained head and of the base model with its fresh, untrained head (chance);
- DPO family: preference accuracy of the implicit reward (Rafailov et al. 2023): r = beta (log pi -
  log pi_ref) for dpo and kto, with the base model as the reference (the base itself scores r = 0,
  a tie: 0.5); r = beta * mean token log-probability for the reference-free orpo and simpo. Also
  `likelihood_accuracy`: how often the model gives the chosen response the higher log-probability,
  before (base) and after (tuned). KTO's accuracy: the reward's sign agrees with the label.
  With `eval.reward_model`, also what online RL reports (below), judged by that reward model;
- grpo and ppo: greedy generations of the held-out prompts, judged by the run's reward: mean reward
  of tuned and base, the tuned model's win rate over the base, and its KL to the base.
Ties count half. Greedy generations of tuned and base on a few held-out prompts go to the report.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from kftune.alignment.config import ONLINE_STAGES
from kftune.alignment.losses import sequence_logps
from kftune.evaluate.evaluate import batched, class_logits, generate, on_device, place, placement, progress
from kftune.models import load_base_model, load_tokenizer, load_tuned_model, resolve_model_path
from kftune.prompts.build import IGNORE_INDEX, read_meta, read_prompts
from kftune.prompts.collate import Collator

SAMPLE_PROMPTS = 4


def evaluate_alignment(config, prompts_dir: str | Path, model_dir: str | Path) -> dict[str, Any]:
    meta = read_meta(prompts_dir)
    rows = read_prompts(prompts_dir, "test")
    device, dtype = placement(config.eval)
    base_path = resolve_model_path(config.model.name_or_path)
    tokenizer = load_tokenizer(base_path)
    num_labels = len(meta["label_names"]) or None
    models = {
        "tuned": place(load_tuned_model(model_dir), config.eval),
        "base": place(
            load_base_model(
                base_path, config.model.task, num_labels, config.train.seed, config.model.attn_implementation
            ),
            config.eval,
        ),
    }
    result: dict[str, Any] = {
        "split": "test",
        "rows": len(rows),
        "split_sha256": hashlib.sha256((Path(prompts_dir) / "test.jsonl").read_bytes()).hexdigest(),
        "label_names": [],
        "stage": config.stage,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
    }
    size, pad = config.eval.batch_size, meta["pad_token_id"]
    if config.stage == "reward":
        for name, model in models.items():
            with progress(f"evaluate {name}: rewards"):
                result[name] = preference_metrics(*pair_rewards(model, rows, pad, size))
        return result
    if config.stage in ONLINE_STAGES:
        from kftune.alignment.online import load_rewards

        prompts = [row["input_ids"] for row in rows]
        result.update(judged_generations(config, models, prompts, tokenizer, load_rewards(config)))
        return result
    with progress("evaluate: log-probabilities"):
        logps = {name: response_logps(model, rows, pad, size) for name, model in models.items()}
    beta = config.preference.beta_for(config.stage)
    for name in models:
        total, counts = logps[name]
        reference = logps["base"][0] if config.stage in ("dpo", "kto") else None  # the base model
        rewards = beta * (total - reference) if reference is not None else beta * total / counts
        if config.stage == "kto":
            desirable = torch.tensor([row["desirable"] for row in rows], dtype=torch.bool)
            result[name] = preference_metrics(torch.where(desirable, rewards, -rewards), torch.zeros_like(rewards))
        else:
            result[name] = preference_metrics(*rewards.chunk(2))
            result[name]["likelihood_accuracy"] = preference_metrics(*total.chunk(2))["preference_accuracy"]
    if config.eval.reward_model:  # judged generations, with their samples
        from kftune.alignment.online import load_reward_model

        reward = load_reward_model(config.eval.reward_model, config.registry.tracking_uri, "eval.reward_model")
        prompts = [prompt_only(row)["input_ids"] for row in rows]
        for name, judged in judged_generations(config, models, prompts, tokenizer, reward).items():
            result[name].update(judged)
        return result
    with progress("evaluate: generations"):
        result["tuned"]["samples"] = side_by_side(models, rows[:SAMPLE_PROMPTS], tokenizer, config.eval.max_new_tokens)
    return result


def preference_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """How often the chosen response is rewarded above the rejected one (ties half), and the mean margin."""
    margin = (chosen - rejected).double()
    accuracy = ((margin > 0).double() + 0.5 * (margin == 0).double()).mean()
    return {"preference_accuracy": round(accuracy.item(), 4), "reward_margin": round(margin.mean().item(), 4)}


def pair_rewards(model, rows: list[dict], pad_token_id: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A reward model's scores of each pair's chosen and rejected sequences."""
    chosen = class_logits(model, [{"input_ids": r["chosen_input_ids"]} for r in rows], pad_token_id, size)[:, 0]
    rejected = class_logits(model, [{"input_ids": r["rejected_input_ids"]} for r in rows], pad_token_id, size)[:, 0]
    return chosen, rejected


@torch.no_grad()
def response_logps(model, rows: list[dict], pad_token_id: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each response and its token count: every pair's chosen response,
    then every rejected one; or each feedback row's completion."""
    sides = ("chosen_", "rejected_") if "chosen_input_ids" in rows[0] else ("",)
    sequences = [{"input_ids": r[f"{side}input_ids"], "labels": r[f"{side}labels"]} for side in sides for r in rows]
    collate = Collator(pad_token_id, "causal_lm")
    parts = [sequence_logps(model, on_device(model, collate(chunk))) for chunk in batched(sequences, size)]
    return torch.cat([t.cpu() for t, _ in parts]), torch.cat([c.cpu() for _, c in parts])


def side_by_side(models: dict, rows: list[dict], tokenizer, max_new_tokens: int) -> list[dict[str, str]]:
    """Greedy continuations of held-out prompts by the tuned and the base model (the report shows them
    as generated / reference)."""
    prompts = [prompt_only(row) for row in rows]
    tuned, _ = generate(models["tuned"], prompts, tokenizer, max_new_tokens)
    base, _ = generate(models["base"], prompts, tokenizer, max_new_tokens)
    return [{"generated": t, "reference": f"(base model) {b}"} for t, b in zip(tuned, base, strict=True)]


def prompt_only(row: dict) -> dict[str, list[int]]:
    ids, labels = (
        (row["chosen_input_ids"], row["chosen_labels"])
        if "chosen_input_ids" in row
        else (row["input_ids"], row["labels"])
    )
    prompt = ids[: next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)]
    return {"input_ids": prompt, "labels": [IGNORE_INDEX] * len(prompt)}


def judged_generations(config, models: dict, prompts: list[list[int]], tokenizer, reward) -> dict[str, Any]:
    """Greedy completions of the held-out prompts judged by `reward` (a reward function or model): mean
    reward of tuned and base; the tuned model's win rate over the base (ties half); KL to the base (the
    reference): the mean over prompts of log pi(y|x) - log pi_ref(y|x) on the tuned model's own completions."""
    prompt_texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in prompts]
    completions, rewards = {}, {}
    for name, model in models.items():
        with progress(f"evaluate {name}: generations"):
            completions[name] = greedy(model, prompts, tokenizer, config.eval.max_new_tokens, config.eval.batch_size)
        texts = [tokenizer.decode(c, skip_special_tokens=True) for c in completions[name]]
        rewards[name] = torch.tensor(reward(prompt_texts, texts), dtype=torch.float64)
    sequences = [
        {"input_ids": p + c, "labels": [IGNORE_INDEX] * len(p) + c}
        for p, c in zip(prompts, completions["tuned"], strict=True)
    ]
    collate = Collator(tokenizer.pad_token_id, "causal_lm")
    with torch.no_grad():
        log_ratio = torch.cat(
            [
                sequence_logps(models["tuned"], on_device(models["tuned"], collate(chunk)))[0].cpu()
                - sequence_logps(models["base"], on_device(models["base"], collate(chunk)))[0].cpu()
                for chunk in batched(sequences, config.eval.batch_size)
            ]
        )
    win = preference_metrics(rewards["tuned"], rewards["base"])["preference_accuracy"]
    samples = [
        {
            "generated": tokenizer.decode(t, skip_special_tokens=True),
            "reference": f"(base model) {tokenizer.decode(b, skip_special_tokens=True)}",
        }
        for t, b in list(zip(completions["tuned"], completions["base"], strict=True))[:SAMPLE_PROMPTS]
    ]
    return {
        "tuned": {
            "mean_reward": round(rewards["tuned"].mean().item(), 4),
            "win_rate": win,
            "kl": round(log_ratio.mean().item(), 4),
            "samples": samples,
        },
        "base": {"mean_reward": round(rewards["base"].mean().item(), 4), "win_rate": 0.5, "kl": 0.0},
    }


@torch.no_grad()
def greedy(model, prompts: list[list[int]], tokenizer, max_new_tokens: int, size: int) -> list[list[int]]:
    """Greedy completion ids of each prompt, up to and including the end-of-sequence token."""
    from kftune.alignment.collate import PromptCollator
    from kftune.alignment.online import until_eos

    collate, completions = PromptCollator(tokenizer.pad_token_id), []
    for chunk in batched(prompts, size):
        batch = on_device(model, collate([{"input_ids": ids} for ids in chunk]))
        output = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        completions += [
            until_eos(ids, tokenizer.eos_token_id) for ids in output[:, batch["input_ids"].shape[1] :].tolist()
        ]
    return completions
