"""The `stage` of a run and its `preference` settings, and the combinations with the rest of the
config that cannot work (checked when the config is validated, before any step runs)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kftune.section import Section

Stage = Literal["sft", "reward", "dpo", "kto", "orpo", "simpo", "grpo", "ppo"]
ONLINE_STAGES = ("grpo", "ppo")
"""Stages that sample completions of prompts during training and learn from their rewards."""
REFERENCE_STAGES = ("dpo", "kto", *ONLINE_STAGES)
"""Stages whose loss compares the policy with a frozen reference model; ORPO and SimPO need none."""
ALIGNMENT_METRICS = {"preference_accuracy", "reward_margin"}
ONLINE_METRICS = {"mean_reward", "win_rate", "kl"}
"""What the evaluate step measures of a policy trained online (grpo, ppo), on greedy generations."""
DEFAULT_BETA = {"dpo": 0.1, "kto": 0.1, "orpo": 0.1, "simpo": 2.0}
"""The defaults of the papers (and TRL): DPO, KTO beta; ORPO's lambda; SimPO's beta."""
PPO_FIELDS = ("ppo_epochs", "clip_range", "value_clip_range", "value_coef", "gamma", "lam")
"""`online` settings only PPO reads."""
RESPONSE_FIELDS = {"prompt", "response"}
"""The slots a non-chat template fills for preference data: the rendered dialogue and one response."""


class PreferenceSection(Section):
    """How preference data is read and the alignment loss weighted (stages other than sft)."""

    format: Literal["auto", "pairs", "hh_rlhf", "conversations", "unpaired", "prompts"] = "auto"
    """pairs: prompt / chosen / rejected columns. hh_rlhf: chosen and rejected are whole
    "Human: ... Assistant: ..." dialogues, split at the last assistant turn. conversations: LLaMA-Factory's
    ShareGPT turns + chosen + rejected turns. unpaired: prompt / completion / label (KTO). prompts:
    prompt only (online RL). auto: unpaired for kto, else told apart by the data's columns."""
    beta: float | None = Field(default=None, gt=0)
    """DPO/IPO/cDPO and KTO's beta (0.1), ORPO's lambda (0.1), SimPO's beta (2.0); empty: those defaults."""
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    """dpo stage: sigmoid (Rafailov et al. 2023) or IPO's squared loss (Azar et al. 2023)."""
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=0.5)
    """Conservative DPO (cDPO): the probability that a pair's preference label is flipped; sigmoid loss only."""
    simpo_gamma: float = Field(default=0.5, ge=0.0)
    """SimPO's target reward margin (Meng et al. 2024)."""
    desirable_weight: float = Field(default=1.0, gt=0)
    """KTO: weight of desirable examples (Ethayarajh et al. 2024 balance the two by their counts)."""
    undesirable_weight: float = Field(default=1.0, gt=0)
    reference: Literal["auto", "adapter", "copy", "precomputed"] = "auto"
    """dpo, kto, grpo and ppo: the frozen reference model. adapter: the policy with its PEFT adapter disabled
    (no second copy); copy: a frozen copy of the starting model (under ZeRO-3 loaded again, partitioned like
    the policy); precomputed (dpo): the starting policy's log-probability of every training sequence,
    computed once before the first step, so no second model is held. auto: adapter under a PEFT method,
    else precomputed for dpo under ZeRO-3, else copy."""

    def beta_for(self, stage: str) -> float:
        return self.beta if self.beta is not None else DEFAULT_BETA[stage]


class OnlineSection(Section):
    """grpo and ppo: the policy samples completions of the training prompts during training and learns from
    their rewards."""

    reward_function: str | None = None
    """`path/to/file.py:function`: called with the prompts (rendered text) and completions (lists of str),
    returns one float per completion. A relative path is taken from the run config's folder."""
    reward_model: str | None = None
    """A registered kftune reward model (stage: reward), `models:/NAME@ALIAS` or `models:/NAME/VERSION`,
    in this run's MLflow (`registry.tracking_uri`); it scores the decoded prompt and completion texts,
    so the policy's tokenizer need not be its own."""
    group_size: int = Field(default=4, ge=2)
    """Completions sampled per prompt; GRPO's advantage is a completion's reward standardised within its group
    (ppo: more rollouts per prompt)."""
    max_new_tokens: int = Field(default=32, ge=1)
    temperature: float = Field(default=1.0, gt=0)
    kl_beta: float = Field(default=0.04, ge=0)
    """Weight of the KL penalty to the reference model (Shao et al. 2024 use 0.04; ppo: the per-token
    penalty added to the reward, InstructGPT's beta, 0.02 there)."""
    ppo_epochs: int = Field(default=4, ge=1)
    """ppo: optimizer steps taken on each rollout batch (TRL's default 4)."""
    clip_range: float = Field(default=0.2, gt=0)
    """ppo: the surrogate objective's clipping of the ratio pi / pi_old to 1 +- epsilon (Schulman et al. 2017)."""
    value_clip_range: float = Field(default=0.2, gt=0)
    """ppo: how far the value head's prediction may move from the rollout's before its loss stops counting the move."""
    value_coef: float = Field(default=0.1, gt=0)
    """ppo: weight of the value loss next to the policy loss (TRL's 0.1)."""
    gamma: float = Field(default=1.0, ge=0, le=1)
    """ppo: discount of GAE (Schulman et al. 2016) over the response's tokens."""
    lam: float = Field(default=0.95, ge=0, le=1)
    """ppo: GAE's lambda, trading the bias of the value head against the variance of sampled returns."""


def resolved_reference(config) -> str:
    """The reference model a dpo or kto run uses (`preference.reference`, auto resolved)."""
    chosen = config.preference.reference
    if chosen != "auto":
        return chosen
    if is_peft_method(config.method.name):
        return "adapter"
    return "precomputed" if config.train.partitions_weights and config.stage == "dpo" else "copy"


def is_peft_method(name: str) -> bool:
    """Methods whose model is a PEFT wrapper, whose adapter can be switched off for the reference."""
    from kftune.methods import METHODS
    from kftune.methods.artifacts import PEFT_ADAPTER

    return name == "lora" or METHODS[name].artifact is PEFT_ADAPTER


def alignment_problem(config, template) -> tuple[str, str] | None:
    """A (field, message) for a stage that cannot work with the rest of the config, or None. `template`: the
    run's, or None for a file validation does not read (preflight checks it once read)."""
    stage, preference = config.stage, config.preference
    if stage == "sft":
        if preference != PreferenceSection():
            return (
                "preference",
                "applies to alignment stages (stage: reward, dpo, kto, orpo, simpo, grpo, ppo), not sft",
            )
        if config.eval.reward_model:
            return "eval.reward_model", "judges dpo, kto, orpo and simpo policies, not sft"
        return None
    task = config.model.task
    wanted = "sequence_classification" if stage == "reward" else "causal_lm"
    if task != wanted:
        what = "a scalar head on the model" if stage == "reward" else "a causal LM (the policy)"
        return "model.task", f"stage {stage} trains {what}: set model.task: {wanted}, not {task}"
    if config.model.num_labels not in (None, 1):
        return "model.num_labels", "a reward model has one output (the scalar reward); leave it empty"
    renders_one_response = template is None or (
        not template.labelled
        and not template.conversation
        and (template.chat or set(template.fields) <= RESPONSE_FIELDS)
    )
    if not renders_one_response:
        return (
            "prompt.template",
            f"stage {stage} renders the preference data's dialogue and one response: use a chat template "
            f"(e.g. preference_chat) or one whose slots are only {{prompt}} and {{response}} (e.g. preference), "
            f"not {template.name!r}",
        )
    if config.prompt.packing or config.prompt.few_shot:
        field = "prompt.packing" if config.prompt.packing else "prompt.few_shot"
        return field, f"stage {stage} compares whole responses row by row; remove {field}"
    online, is_online = config.online, stage in ONLINE_STAGES
    if is_online and bool(online.reward_function) == bool(online.reward_model):
        return (
            "online.reward_function",
            f"{stage} needs one source of rewards: a Python function (path/to/file.py:function) or online.reward_model",
        )
    if is_online and online.reward_model and not online.reward_model.startswith("models:/"):
        return "online.reward_model", f"{online.reward_model!r}: name a registered model as models:/NAME@ALIAS"
    if is_online and online.reward_function and ":" not in online.reward_function:
        return "online.reward_function", f"{config.online.reward_function!r}: write it as path/to/file.py:function"
    if not is_online and config.online != OnlineSection():
        return "online", f"applies to online RL (stage: grpo or ppo), not {stage}"
    if stage == "grpo" and (
        ppo_only := [f for f in PPO_FIELDS if getattr(online, f) != OnlineSection.model_fields[f].default]
    ):
        return (
            f"online.{ppo_only[0]}",
            "applies to stage ppo (value head, GAE, clipping); grpo takes one step per rollout and has no critic",
        )
    forms = {"kto": ("unpaired",), "grpo": ("prompts",), "ppo": ("prompts",)}.get(
        stage, ("pairs", "hh_rlhf", "conversations")
    )
    if preference.format not in ("auto", *forms):
        return "preference.format", f"stage {stage} reads {' or '.join(forms)} data, not {preference.format}"
    if preference.label_smoothing and not (stage == "dpo" and preference.loss == "sigmoid"):
        return "preference.label_smoothing", "conservative DPO smooths the sigmoid DPO loss (stage: dpo, loss: sigmoid)"
    if is_online and config.train.partitions_weights:
        return (
            "train.deepspeed.stage",
            f"{stage} samples completions inside each worker; ZeRO-3 would gather every layer per token",
        )
    if preference.loss != "sigmoid" and stage != "dpo":
        return "preference.loss", f"chooses the dpo stage's loss; stage {stage} has its own"
    if stage == "kto" and config.train.micro_batch() < 2:
        return (
            "train.batch_size",
            "KTO estimates its KL term from mismatched prompt/completion pairs within a micro-batch: "
            "each worker needs 2 rows or more per micro-batch",
        )
    if config.train.eval_every_steps:
        return "train.eval_every_steps", f"validation during training measures the SFT loss; not for stage {stage}"
    if stage in REFERENCE_STAGES:
        reference = resolved_reference(config)
        if reference == "adapter" and not is_peft_method(config.method.name):
            return (
                "preference.reference",
                f"adapter: the reference is the policy with its PEFT adapter disabled; method {config.method.name} "
                "has none (use copy or precomputed)",
            )
        if reference == "precomputed" and stage != "dpo":
            return (
                "preference.reference",
                f"precomputed log-probabilities are dpo's: stage {stage} scores sequences made during training "
                "(kto: each prompt with another row's completion of the micro-batch; grpo, ppo: sampled completions)",
            )
    elif preference.reference != "auto":
        return "preference.reference", f"stage {stage} uses no reference model"
    judge = config.eval.reward_model
    if judge and (is_online or stage == "reward"):
        source = "online.reward_model" if is_online else "nothing: it is the reward model"
        return "eval.reward_model", f"judges dpo, kto, orpo and simpo policies; stage {stage} is judged by {source}"
    if judge and not judge.startswith("models:/"):
        return "eval.reward_model", f"{judge!r}: name a registered model as models:/NAME@ALIAS"
    allowed = ONLINE_METRICS if is_online else ALIGNMENT_METRICS | (ONLINE_METRICS if judge else set())
    wrong = [m for m in config.eval.metrics if m not in allowed]
    if wrong:
        hint = "" if is_online or judge or stage == "reward" else " (mean_reward, win_rate, kl: set eval.reward_model)"
        return (
            "eval.metrics",
            f"{', '.join(wrong)} not available for stage {stage}; use {', '.join(sorted(allowed))}{hint}",
        )
    return None
