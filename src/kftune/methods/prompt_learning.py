"""Prompt-learning methods through `peft`: the model stays frozen and learns virtual tokens.

- `prefix_tuning` (Li & Liang 2021): trained key/value prefixes in every layer.
- `prompt_tuning` (Lester et al. 2021): trained input embeddings of virtual tokens,
  initialised randomly or from the embeddings of a text.
- `p_tuning` (Liu et al. 2021): virtual-token embeddings produced by a small prompt encoder (MLP or LSTM).

On sequence classification peft also trains the classifier (`modules_to_save`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from kftune.methods.artifacts import PEFT_ADAPTER
from kftune.methods.base import MethodOptions, peft_task_type, register


class PromptLearningOptions(MethodOptions):
    virtual_tokens: int = Field(default=20, ge=1)


def get_peft_model(model, config_class, task: str, options: PromptLearningOptions, **settings):
    import peft

    return peft.get_peft_model(
        model, config_class(task_type=peft_task_type(task), num_virtual_tokens=options.virtual_tokens, **settings)
    )


class PrefixTuningOptions(PromptLearningOptions):
    name: Literal["prefix_tuning"] = "prefix_tuning"
    projection: bool = False
    """Produce the prefixes through a two-layer MLP (more stable, more parameters during training)."""
    projection_size: int = Field(default=128, ge=1)


@register(
    PrefixTuningOptions,
    "Trained key/value prefixes in every attention layer (peft prefix tuning).",
    artifact=PEFT_ADAPTER,
    packs=False,
)
def apply_prefix_tuning(model, options: PrefixTuningOptions, task: str):
    import peft

    return get_peft_model(
        model,
        peft.PrefixTuningConfig,
        task,
        options,
        prefix_projection=options.projection,
        encoder_hidden_size=options.projection_size,
    )


class PromptTuningOptions(PromptLearningOptions):
    name: Literal["prompt_tuning"] = "prompt_tuning"
    init: Literal["random", "text"] = "random"
    init_text: str | None = None
    """With init: text, the virtual tokens start as this text's token embeddings (repeated or cut to fit)."""

    @model_validator(mode="after")
    def _text_given(self) -> PromptTuningOptions:
        if (self.init == "text") != (self.init_text is not None):
            raise ValueError("method.init_text is required with init: text and only used with it")
        return self


@register(
    PromptTuningOptions,
    "Trained soft-prompt embeddings prepended to the input (peft prompt tuning).",
    artifact=PEFT_ADAPTER,
    packs=False,
)
def apply_prompt_tuning(model, options: PromptTuningOptions, task: str):
    import peft

    if options.init == "random":
        return get_peft_model(model, peft.PromptTuningConfig, task, options)
    return get_peft_model(
        model,
        peft.PromptTuningConfig,
        task,
        options,
        prompt_tuning_init=peft.PromptTuningInit.TEXT,
        prompt_tuning_init_text=options.init_text,
        tokenizer_name_or_path=model.config._name_or_path,
    )


class PTuningOptions(PromptLearningOptions):
    name: Literal["p_tuning"] = "p_tuning"
    encoder: Literal["MLP", "LSTM"] = "MLP"
    encoder_size: int = Field(default=128, ge=1)


@register(
    PTuningOptions,
    "Virtual-token embeddings produced by a trained prompt encoder (peft P-tuning).",
    artifact=PEFT_ADAPTER,
    packs=False,
)
def apply_p_tuning(model, options: PTuningOptions, task: str):
    import peft

    return get_peft_model(
        model,
        peft.PromptEncoderConfig,
        task,
        options,
        encoder_reparameterization_type=options.encoder,
        encoder_hidden_size=options.encoder_size,
    )
