"""Freezing methods: the pretrained body stays fixed and only chosen layers train (layer-wise
fine-tuning; gradual unfreezing as in ULMFiT, Howard & Ruder 2018).

Layers are the transformer blocks (`bert.encoder.layer.N`, `model.layers.N`); what sits above them
(pooler or final norm, and the task or LM head) trains with the top block, the embeddings below
them train only when gradual unfreezing reaches them. `layer_range` trains its blocks plus the
classification head. The artifact is the whole model.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from kftune.methods.base import MethodOptions, register, task_head_names, train_only, with_task_head
from kftune.methods.layers import parameter_positions, position_name

LAYER_WISE = {"layer_lr_decay": True}


class HeadOnlyOptions(MethodOptions):
    name: Literal["head_only"] = "head_only"


@register(
    HeadOnlyOptions,
    "Linear probe: the encoder is a frozen feature extractor, only the new task head trains.",
    tasks=("sequence_classification",),
)
def apply_head_only(model, options: HeadOnlyOptions, task: str):
    return train_only(model, task_head_names(model))


def train_from(model, lowest: int):
    """Train every parameter at position `lowest` or above (see `parameter_positions`)."""
    positions, _ = parameter_positions(model)
    return train_only(model, {name for name, position in positions.items() if position >= lowest})


def check_layer_count(count: int, field: str, model_config) -> str | None:
    if count > model_config.num_hidden_layers:
        return f"{field}: {count} but the model has {model_config.num_hidden_layers} layers"
    return None


class FreezeBottomOptions(MethodOptions):
    name: Literal["freeze_bottom"] = "freeze_bottom"
    layers: int = Field(ge=0)
    """How many of the lowest blocks stay frozen (with the embeddings)."""

    def lowest_trained(self, blocks: int) -> int:
        return self.layers


class TrainTopOptions(MethodOptions):
    name: Literal["train_top"] = "train_top"
    layers: int = Field(ge=0)
    """How many of the highest blocks train (with the head); 0 trains what sits above the blocks."""

    def lowest_trained(self, blocks: int) -> int:
        return blocks - self.layers


def apply_train_above(model, options: FreezeBottomOptions | TrainTopOptions, task: str):
    _, blocks = parameter_positions(model)
    return train_from(model, options.lowest_trained(blocks))


for options_class, description in (
    (FreezeBottomOptions, "Freeze the embeddings and the lowest `layers` blocks; everything above trains."),
    (TrainTopOptions, "Train only the top `layers` blocks and what sits above them (pooler or final norm, head)."),
):
    register(
        options_class,
        description,
        check=lambda model_config, options: check_layer_count(options.layers, "method.layers", model_config),
        **LAYER_WISE,
    )(apply_train_above)


class LayerRangeOptions(MethodOptions):
    name: Literal["layer_range"] = "layer_range"
    start: int = Field(ge=0)
    end: int = Field(ge=1)
    """Blocks start..end-1 train (Python range)."""

    @model_validator(mode="after")
    def _ordered(self) -> LayerRangeOptions:
        if self.end <= self.start:
            raise ValueError(f"method.end ({self.end}) must be greater than method.start ({self.start})")
        return self


@register(
    LayerRangeOptions,
    "Train only blocks start..end-1 (any contiguous range) and the classification head.",
    check=lambda model_config, options: check_layer_count(options.end, "method.end", model_config),
    **LAYER_WISE,
)
def apply_layer_range(model, options: LayerRangeOptions, task: str):
    positions, _ = parameter_positions(model)
    names = {name for name, position in positions.items() if options.start <= position < options.end}
    return train_only(model, with_task_head(model, names, task))


class GradualUnfreezeOptions(MethodOptions):
    name: Literal["gradual_unfreeze"] = "gradual_unfreeze"
    start_layers: int = Field(default=1, ge=0)
    """Blocks trainable from the first step (the top ones, with everything above them)."""
    every_steps: int = Field(ge=1)
    """One more block, top down, unfreezes every this many optimizer steps; the embeddings last."""


def unfrozen_from(options: GradualUnfreezeOptions, blocks: int, step: int) -> int:
    """The lowest trainable position after `step` optimizer steps (never below -1, the embeddings)."""
    return max(-1, blocks - options.start_layers - step // options.every_steps)


def unfreeze_on_step(model, options: GradualUnfreezeOptions, step: int) -> list[str] | None:
    _, blocks = parameter_positions(model)
    lowest = unfrozen_from(options, blocks, step)
    if lowest == unfrozen_from(options, blocks, step - 1):
        return None
    train_from(model, lowest)
    return [position_name(model, lowest)]


@register(
    GradualUnfreezeOptions,
    "Start with the top blocks, unfreeze one more block every `every_steps` steps (ULMFiT-style).",
    check=lambda model_config, options: check_layer_count(options.start_layers, "method.start_layers", model_config),
    may_train=lambda model, options: list(model.parameters()),
    on_step=unfreeze_on_step,
    zero_stages=(),
    zero_note="DeepSpeed fixes the trained parameter set when it builds its optimizer; train without train.deepspeed",
    **LAYER_WISE,
)
def apply_gradual_unfreeze(model, options: GradualUnfreezeOptions, task: str):
    _, blocks = parameter_positions(model)
    return train_from(model, unfrozen_from(options, blocks, 0))
