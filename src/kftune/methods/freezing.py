"""Freezing methods: the pretrained body stays fixed and only chosen parts train (seed 003 §1.2)."""

from typing import Literal

from kftune.methods.base import MethodOptions, register


class HeadOnlyOptions(MethodOptions):
    name: Literal["head_only"] = "head_only"


@register(
    HeadOnlyOptions,
    "Linear probe: the encoder is a frozen feature extractor, only the new task head trains.",
    tasks=("sequence_classification",),
)
def apply_head_only(model, options: HeadOnlyOptions, task: str):
    body = model.base_model_prefix + "."
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(not name.startswith(body))
    return model
