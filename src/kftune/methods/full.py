"""Full fine-tuning: every parameter trains."""

from typing import Literal

from kftune.methods.base import WITH_MASKED_LM, MethodOptions, register


class FullOptions(MethodOptions):
    name: Literal["full"] = "full"


@register(
    FullOptions,
    "All parameters train (the baseline every other method is measured against).",
    WITH_MASKED_LM,
    layer_lr_decay=True,
    trains_all=True,
)
def apply(model, options: FullOptions, task: str):
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return model
