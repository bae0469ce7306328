"""The run config's `retention` section: what a run does against catastrophic forgetting.

Plain data, validated without reading any file (the general data and a Fisher file are checked by
`kftune.preflight`). Each remedy is off unless its subsection is given; they combine.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kftune.section import Section


class L2SPSection(Section):
    """L2-SP (Li et al. 2018, "Explicit inductive bias for transfer learning with convolutional
    networks"): alpha/2 * ||theta - theta_0||^2 over the pretrained weights the method changes."""

    alpha: float = Field(gt=0)


class EWCSection(Section):
    """Elastic weight consolidation (Kirkpatrick et al. 2017): lambda/2 * sum F (theta - theta_0)^2,
    F the base model's diagonal Fisher information on general data."""

    strength: float = Field(gt=0)
    """lambda."""
    fisher_rows: int = Field(default=64, ge=1)
    """General-data rows the Fisher is estimated on (one gradient per row)."""
    fisher_file: str | None = None
    """A Fisher file written by an earlier run to reuse; refused when it was made for another base model or
    other general data. Empty: looked up in (and written to) the run's storage by content hash."""


class DistillSection(Section):
    """Knowledge distillation from the base model (Hinton et al. 2015; LwF, Li & Hoiem 2016): weight *
    T^2 * KL(base || tuned) of the next-token distributions at temperature T."""

    weight: float = Field(gt=0)
    temperature: float = Field(default=2.0, gt=0)
    inputs: list[Literal["task", "general"]] = Field(default_factory=lambda: ["task"], min_length=1)
    """Where the distributions are compared: the training batch, and/or general-data rows drawn alongside it."""


class ReplaySection(Section):
    """Replay / multi-task learning with the pre-training objective (as in ULMFiT and "Don't stop
    pretraining", Gururangan et al. 2020): general rows mixed into every micro-batch, their language-model
    loss a second term with its own weight."""

    ratio: float = Field(default=0.25, gt=0, le=4)
    """General rows per task row in each micro-batch (at least one)."""
    weight: float = Field(default=1.0, gt=0)
    generated: bool = False
    """Generative replay: the rows are the base model's own greedy continuations of general-data prompts,
    generated once before training (and cached with the Fisher), instead of the general text itself."""


class RetentionSection(Section):
    general_data: str | None = None
    """A text file, one passage per line, that stands for what the base model knew (Fisher, distillation on
    general inputs, replay). Empty: the packaged general text's training half (evaluation scores forgetting
    on the other half)."""
    general_rows: int = Field(default=256, ge=1)
    """At most this many general-data lines are used."""
    l2_sp: L2SPSection | None = None
    ewc: EWCSection | None = None
    distill: DistillSection | None = None
    replay: ReplaySection | None = None

    def with_paths(self, resolve) -> RetentionSection:
        """This section with its file paths passed through `resolve` (made absolute by the config loader)."""
        update = {"general_data": resolve(self.general_data)} if self.general_data else {}
        if self.ewc and self.ewc.fisher_file:
            update["ewc"] = self.ewc.model_copy(update={"fisher_file": resolve(self.ewc.fisher_file)})
        return self.model_copy(update=update)

    @property
    def anchored(self) -> bool:
        """A penalty toward the pretrained weights is asked for (L2-SP or EWC)."""
        return bool(self.l2_sp or self.ewc)

    @property
    def uses_general_data(self) -> bool:
        return bool(self.ewc or self.replay or (self.distill and "general" in self.distill.inputs))

    @property
    def enabled(self) -> bool:
        return bool(self.anchored or self.distill or self.replay)


NEW_PARAMETERS = {
    "prompt_tuning": "virtual-token embeddings",
    "prefix_tuning": "key/value prefixes",
    "p_tuning": "the prompt encoder",
    "layer_prompt": "per-layer prompt vectors",
    "adapter": "bottleneck adapter layers",
    "ia3": "scaling vectors",
}
"""Methods that train only parameters the base model does not have: no pretrained value to anchor to."""


def retention_problem(config) -> tuple[str, str] | None:
    """A (field, message) for retention asked for where it cannot apply, or None."""
    retention, task, method = config.retention, config.model.task, config.method.name
    if retention != RetentionSection() and config.stage != "sft":
        return "retention", f"applies to supervised fine-tuning (stage: sft), not stage {config.stage}"
    anchor = "retention.l2_sp" if retention.l2_sp else "retention.ewc"
    if retention.anchored and method in NEW_PARAMETERS:
        return (
            anchor,
            f"method {method} trains only new parameters ({NEW_PARAMETERS[method]}) that have no pretrained value "
            "to stay close to; use retention.distill or retention.replay, or a method that changes pretrained weights "
            "(full, lora, freezing, selective)",
        )
    if retention.anchored and method == "head_only":
        return anchor, "method head_only trains only the new classification head, which has no pretrained value"
    if retention.ewc and config.model.quantization:
        return "retention.ewc", "the Fisher needs gradients of the base weights, which a quantized base has none of"
    if task == "sequence_classification" and retention.replay:
        return (
            "retention.replay",
            "a classification model has no language-model head to train general text with (the pre-training "
            "objective needs one); use retention.distill, which keeps the base's sentence embeddings, or "
            "retention.l2_sp / retention.ewc",
        )
    if retention.replay and retention.replay.generated and task != "causal_lm":
        return "retention.replay.generated", f"generates the base's own answers, which needs a causal LM, not {task}"
    return None
