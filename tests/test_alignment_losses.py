"""Each alignment loss against its paper's formula, computed independently on the same batch: log-probabilities
from the model's full logits in float64 (not the chunked loss path training uses), the reference model as a
separately loaded base, the formulas in plain Python floats."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import PREFERENCE_DATA, STORIES, preference_run
from kftune.alignment.collate import FeedbackCollator, PairCollator
from kftune.alignment.config import PreferenceSection
from kftune.alignment.objective import Preference, Reference, RewardModel, precompute_reference
from kftune.config import parse_config
from kftune.models import load_tokenizer
from kftune.prompts.build import IGNORE_INDEX
from kftune.train.loop import build_model

PAIRS = [
    ("One day, Tom went to", " the park with his dog.", " a big red ball."),
    ("Lily saw a cat.", " She gave it some milk and it was happy.", " The cat was sad."),
    ("The sun was", " warm and bright.", " blue."),
]

pytestmark = pytest.mark.usefixtures("one_thread")


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(STORIES)


def encoded(tokenizer, prompt: str, response: str) -> dict[str, list[int]]:
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = prompt_ids + tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return {
        "input_ids": ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + ids[len(prompt_ids) :],
        "prompt_length": len(prompt_ids),
    }


@pytest.fixture(scope="module")
def pair_rows(tokenizer):
    rows = []
    for prompt, chosen, rejected in PAIRS:
        c, r = encoded(tokenizer, prompt, chosen), encoded(tokenizer, prompt, rejected)
        rows.append(
            {
                "chosen_input_ids": c["input_ids"],
                "chosen_labels": c["labels"],
                "rejected_input_ids": r["input_ids"],
                "rejected_labels": r["labels"],
            }
        )
    return rows


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    """stories260K under LoRA with its adapter moved off zero, so the policy differs from the reference."""
    config = parse_config(preference_run(tmp_path_factory.mktemp("run"), "dpo", PREFERENCE_DATA["hh_rlhf"]))
    model = build_model(config, None, for_training=False)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def base():
    return AutoModelForCausalLM.from_pretrained(str(STORIES), dtype=torch.float32).eval()


def independent_logp(model, ids: list[int], labels: list[int]) -> float:
    """log p(response | prompt) from the full logits, in float64."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logprobs = torch.log_softmax(logits[:-1], dim=-1)
    return sum(logprobs[i, label].item() for i, label in enumerate(labels[1:]) if label != IGNORE_INDEX)


def pair_logps(model, rows, side):
    return [independent_logp(model, r[f"{side}_input_ids"], r[f"{side}_labels"]) for r in rows]


def response_tokens(rows, side):
    return [sum(label != IGNORE_INDEX for label in r[f"{side}_labels"][1:]) for r in rows]


def expected_pair_losses(stage, settings, policy, base, rows):
    pc, pr = pair_logps(policy, rows, "chosen"), pair_logps(policy, rows, "rejected")
    rc, rr = pair_logps(base, rows, "chosen"), pair_logps(base, rows, "rejected")
    nc, nr = response_tokens(rows, "chosen"), response_tokens(rows, "rejected")
    beta, out = settings.beta_for(stage), []
    for i in range(len(rows)):
        h = (pc[i] - rc[i]) - (pr[i] - rr[i])
        if stage == "dpo" and settings.loss == "ipo":
            out.append((h - 1 / (2 * beta)) ** 2)
        elif stage == "dpo":
            eps = settings.label_smoothing
            out.append(-(1 - eps) * math.log(sigmoid(beta * h)) - eps * math.log(sigmoid(-beta * h)))
        elif stage == "simpo":
            out.append(-math.log(sigmoid(beta * (pc[i] / nc[i] - pr[i] / nr[i]) - settings.simpo_gamma)))
        else:  # orpo
            mc, mr = pc[i] / nc[i], pr[i] / nr[i]
            odds = (mc - math.log(1 - math.exp(mc))) - (mr - math.log(1 - math.exp(mr)))
            out.append(-mc - beta * math.log(sigmoid(odds)))
    return out


@pytest.mark.parametrize(
    ("stage", "settings"),
    [
        ("dpo", PreferenceSection()),
        ("dpo", PreferenceSection(loss="ipo", beta=0.5)),
        ("dpo", PreferenceSection(label_smoothing=0.2)),
        ("orpo", PreferenceSection()),
        ("simpo", PreferenceSection()),
    ],
    ids=["sigmoid", "ipo", "cdpo", "orpo", "simpo"],
)
def test_pair_losses_match_the_papers(stage, settings, policy, base, pair_rows):
    reference = Reference("adapter") if stage == "dpo" else None
    objective = Preference(stage, settings, reference, PairCollator(0))
    with torch.no_grad():
        losses = objective.example_losses(policy, objective.collate(pair_rows))
    expected = expected_pair_losses(stage, settings, policy, base, pair_rows)
    assert losses.tolist() == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert max(expected) > 1e-3  # not a trivially zero loss


def test_copied_reference_is_the_starting_model(tmp_path, base, pair_rows):
    config = parse_config(preference_run(tmp_path, "dpo", PREFERENCE_DATA["hh_rlhf"]))
    reference = Reference("copy", build_model(config, None, for_training=False))
    logps = reference.logps(None, PairCollator(0)(pair_rows))[0].tolist()
    assert logps == pytest.approx(
        pair_logps(base, pair_rows, "chosen") + pair_logps(base, pair_rows, "rejected"), rel=1e-5
    )


def test_kto_matches_the_paper(tokenizer, policy, base):
    rows = [
        {**encoded(tokenizer, p, c if i % 2 == 0 else r), "desirable": int(i % 2 == 0)}
        for i, (p, c, r) in enumerate(PAIRS)
    ]
    settings = PreferenceSection(desirable_weight=1.0, undesirable_weight=1.5)
    objective = Preference("kto", settings, Reference("adapter"), FeedbackCollator(0))
    with torch.no_grad():
        losses = objective.example_losses(policy, objective.collate(rows)).tolist()
    n, beta = len(rows), settings.beta_for("kto")
    ratio = [
        independent_logp(policy, r["input_ids"], r["labels"]) - independent_logp(base, r["input_ids"], r["labels"])
        for r in rows
    ]
    kl_terms = []
    for i in range(n):
        prompt, other = rows[i], rows[(i + 1) % n]
        ids = prompt["input_ids"][: prompt["prompt_length"]] + other["input_ids"][other["prompt_length"] :]
        labels = [IGNORE_INDEX] * prompt["prompt_length"] + ids[prompt["prompt_length"] :]
        kl_terms.append(independent_logp(policy, ids, labels) - independent_logp(base, ids, labels))
    z = max(0.0, sum(kl_terms) / n)
    expected = [
        1.0 * (1 - sigmoid(beta * (ratio[i] - z)))
        if rows[i]["desirable"]
        else 1.5 * (1 - sigmoid(beta * (z - ratio[i])))
        for i in range(n)
    ]
    assert losses == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_reward_model_bradley_terry(tmp_path, pair_rows):
    config = parse_config(preference_run(tmp_path, "reward", PREFERENCE_DATA["hh_rlhf"]))
    model = build_model(config, 1, for_training=False).eval()
    batch = PairCollator(0)(pair_rows)
    with torch.no_grad():
        loss = RewardModel(PairCollator(0)).loss(model, batch).item()
        scores = [
            model(input_ids=torch.tensor([r[f"{side}_input_ids"]])).logits[0, 0].item()
            for side in ("chosen", "rejected")
            for r in pair_rows
        ]
    n = len(pair_rows)
    expected = sum(-math.log(sigmoid(scores[i] - scores[n + i])) for i in range(n))
    assert loss == pytest.approx(expected, rel=1e-4)


def independent_token_logps(model, ids: list[int], labels: list[int]) -> list[float]:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logprobs = torch.log_softmax(logits[:-1], dim=-1)
    return [logprobs[i, label].item() for i, label in enumerate(labels[1:]) if label != IGNORE_INDEX]


def test_grpo_matches_the_paper(tokenizer, policy, base):
    from kftune.alignment.collate import PromptCollator
    from kftune.alignment.config import OnlineSection
    from kftune.alignment.online import GroupRelative, grpo_losses, token_logps

    settings = OnlineSection(reward_function="unused.py:f", group_size=3, max_new_tokens=6, kl_beta=0.1)
    length = lambda prompts, completions: [float(len(c)) for c in completions]  # noqa: E731
    objective = GroupRelative(settings, Reference("adapter"), PromptCollator(0), tokenizer, length)
    prompts = [tokenizer(p)["input_ids"] for p, _, _ in PAIRS[:2]]
    torch.manual_seed(0)
    rollout = objective.rollout(policy, objective.collate([{"input_ids": ids} for ids in prompts]))
    assert (
        rollout["input_ids"].shape[0] == 6
        and objective.items(objective.collate([{"input_ids": p} for p in prompts])) == 6
    )
    mask = (rollout["labels"][:, 1:] != IGNORE_INDEX).float()
    with torch.no_grad():
        losses = grpo_losses(token_logps(policy, rollout), rollout["reference"], mask, rollout["advantages"], 0.1)
    expected = []
    for i in range(6):
        n = int(rollout["attention_mask"][i].sum())
        ids, labels = rollout["input_ids"][i, :n].tolist(), rollout["labels"][i, :n].tolist()
        assert ids[: len(prompts[i // 3])] == prompts[i // 3]  # each completion continues its own prompt
        completion = tokenizer.decode([t for t in labels if t != IGNORE_INDEX], skip_special_tokens=True)
        group = [
            float(
                len(
                    tokenizer.decode(
                        [t for t in rollout["labels"][j].tolist() if t != IGNORE_INDEX], skip_special_tokens=True
                    )
                )
            )
            for j in range(i // 3 * 3, i // 3 * 3 + 3)
        ]
        mean = sum(group) / 3
        std = math.sqrt(sum((g - mean) ** 2 for g in group) / 2)
        advantage = (len(completion) - mean) / (std + 1e-4)
        pi, ref = independent_token_logps(policy, ids, labels), independent_token_logps(base, ids, labels)
        terms = [-advantage + 0.1 * (math.exp(r - p) - (r - p) - 1) for p, r in zip(pi, ref, strict=True)]
        expected.append(sum(terms) / len(terms))
    assert losses.tolist() == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_dpo_gradients_match_the_formula(policy, base, pair_rows):
    """Training differentiates the chunked per-row head loss; its gradients equal those of the formula on full logits."""
    parameters = [p for n, p in policy.named_parameters() if "lora_" in n]
    objective = Preference("dpo", PreferenceSection(), Reference("adapter"), PairCollator(0))
    ours = torch.autograd.grad(objective.loss(policy, objective.collate(pair_rows)), parameters)

    def logp(model, ids, labels):
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].double(), dim=-1)
        return sum(logprobs[i, label] for i, label in enumerate(labels[1:]) if label != IGNORE_INDEX)

    total = 0
    for row in pair_rows:
        c, r = (row["chosen_input_ids"], row["chosen_labels"]), (row["rejected_input_ids"], row["rejected_labels"])
        with torch.no_grad():
            reference = logp(base, *c) - logp(base, *r)
        total = total - torch.nn.functional.logsigmoid(0.1 * (logp(policy, *c) - logp(policy, *r) - reference))
    expected = torch.autograd.grad(total, parameters)
    assert any(g.abs().max() > 0 for g in ours)
    for got, want in zip(ours, expected, strict=True):
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-3, atol=1e-3 * want.abs().max().item())


def test_ppo_matches_the_paper(tokenizer, policy, base):
    """The rollout's per-token rewards, GAE advantages (whitened) and returns against a plain-Python backward
    recursion; the clipped policy and value losses of a moved policy against Schulman et al.'s formulas."""
    from kftune.alignment.collate import PromptCollator
    from kftune.alignment.config import OnlineSection
    from kftune.alignment.ppo import VALUE_HEAD, ProximalPolicy, RepeatedBatches, policy_and_values, ppo_losses

    settings = OnlineSection(
        reward_function="unused.py:f", group_size=2, max_new_tokens=6, kl_beta=0.1, gamma=0.9, lam=0.8
    )
    calls = []

    def length(prompts, completions):
        calls.append(len(completions))
        return [float(len(c)) for c in completions]

    saved = {n: p.detach().clone() for n, p in policy.named_parameters()}
    objective = ProximalPolicy(settings, Reference("adapter"), PromptCollator(0), tokenizer, length, policy)
    head = getattr(policy, VALUE_HEAD)
    try:
        torch.manual_seed(0)
        with torch.no_grad():
            head.weight.normal_(0, 0.3)
            head.bias.fill_(0.2)
        prompts = [tokenizer(p)["input_ids"] for p, _, _ in PAIRS[:2]]
        batch = objective.collate([{"input_ids": ids} for ids in prompts])
        (tagged,) = list(RepeatedBatches([batch], times=1, group=1))
        rollout = objective.cached_rollout(policy, tagged)
        assert objective.cached_rollout(policy, tagged) is rollout and calls == [4]  # sampled once, reused
        assert objective.items(batch) == 4 and rollout["input_ids"].shape[0] == 4

        def values(ids: list[int], labels: list[int]) -> list[float]:
            with torch.no_grad():
                hidden = policy(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
            v = hidden.double() @ head.weight[0].double() + head.bias.double()
            return [v[i].item() for i, label in enumerate(labels[1:]) if label != IGNORE_INDEX]

        rows, all_advantages = [], []
        for i in range(4):
            n = int(rollout["attention_mask"][i].sum())
            ids, labels = rollout["input_ids"][i, :n].tolist(), rollout["labels"][i, :n].tolist()
            completion = tokenizer.decode([t for t in labels if t != IGNORE_INDEX], skip_special_tokens=True)
            pi, ref = independent_token_logps(policy, ids, labels), independent_token_logps(base, ids, labels)
            v = values(ids, labels)
            rewards = [-0.1 * (p - r) for p, r in zip(pi, ref, strict=True)]
            rewards[-1] += len(completion)
            advantages, running = [0.0] * len(v), 0.0
            for t in reversed(range(len(v))):
                next_value = v[t + 1] if t + 1 < len(v) else 0.0
                running = rewards[t] + 0.9 * next_value - v[t] + 0.9 * 0.8 * running
                advantages[t] = running
            rows.append((ids, labels, pi, v, advantages))
            all_advantages += advantages
        mean = sum(all_advantages) / len(all_advantages)
        std = math.sqrt(sum((a - mean) ** 2 for a in all_advantages) / len(all_advantages))
        mask = rollout["labels"][:, 1:] != IGNORE_INDEX
        for i, (_, _, pi, v, advantages) in enumerate(rows):
            assert rollout["logps"][i][mask[i]].tolist() == pytest.approx(pi, rel=1e-4, abs=1e-5)
            assert rollout["returns"][i][mask[i]].tolist() == pytest.approx(
                [a + x for a, x in zip(advantages, v, strict=True)], rel=1e-4, abs=1e-4
            )
            assert rollout["advantages"][i][mask[i]].tolist() == pytest.approx(
                [(a - mean) / std for a in advantages], rel=1e-3, abs=1e-4
            )

        with torch.no_grad():  # a policy (and value head) some steps later: ratios and values beyond the clip ranges
            for name, parameter in policy.named_parameters():
                if "lora_A" in name or VALUE_HEAD in name:
                    parameter.add_(torch.randn_like(parameter) * 0.3)
            new_logps, new_values = policy_and_values(policy, rollout)
            losses = ppo_losses(new_logps, new_values, rollout, mask.float(), settings)
        expected, clipped = [], 0
        for i, (ids, labels, pi_old, v_old, _) in enumerate(rows):
            pi_new, v_new = independent_token_logps(policy, ids, labels), values(ids, labels)
            a = [(x - mean) / std for x in rows[i][4]]
            returns = [x + y for x, y in zip(rows[i][4], v_old, strict=True)]
            terms = []
            for t in range(len(pi_new)):
                ratio = math.exp(pi_new[t] - pi_old[t])
                clipped += not 0.8 <= ratio <= 1.2
                surrogate = min(ratio * a[t], min(max(ratio, 0.8), 1.2) * a[t])
                v_clip = v_old[t] + min(max(v_new[t] - v_old[t], -0.2), 0.2)
                value_loss = 0.5 * max((v_new[t] - returns[t]) ** 2, (v_clip - returns[t]) ** 2)
                terms.append(-surrogate + 0.1 * value_loss)
            expected.append(sum(terms) / len(terms))
        assert clipped > 0
        assert losses.tolist() == pytest.approx(expected, rel=1e-3, abs=1e-4)
    finally:
        with torch.no_grad():
            for name, parameter in policy.named_parameters():
                if name in saved:
                    parameter.copy_(saved[name])
        from kftune.alignment.ppo import remove_training_heads

        remove_training_heads(policy)
    assert VALUE_HEAD not in dict(policy.named_children())


def test_precomputed_reference_equals_the_live_one(tmp_path, pair_rows):
    """Full fine-tuning: the starting policy's log-probabilities, taken once before the first step, give the
    losses a frozen copy gives, also after the policy has moved."""
    config = parse_config(preference_run(tmp_path, "dpo", PREFERENCE_DATA["hh_rlhf"], method={"name": "full"}))
    model = build_model(config, None, for_training=False).eval()
    collate = PairCollator(0)
    live, precomputed = (
        Reference("copy", copy.deepcopy(model)),
        Reference("precomputed", None, pair_rows, collate, batch_size=2),
    )
    batch = collate(pair_rows[1:])  # grouped unlike the pass that fills the table

    def losses(reference):
        return Preference("dpo", PreferenceSection(), reference, collate).example_losses(model, batch)

    precompute_reference(Preference("dpo", PreferenceSection(), precomputed, collate), model, torch.device("cpu"))
    assert len(precomputed.table) == 2 * len(pair_rows)
    torch.testing.assert_close(losses(precomputed), torch.full((2,), math.log(2)))  # policy == reference
    with torch.no_grad():  # the policy some steps later
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    moved = losses(live)
    assert (moved - math.log(2)).abs().min() > 1e-3
    torch.testing.assert_close(losses(precomputed), moved, rtol=1e-5, atol=1e-6)
