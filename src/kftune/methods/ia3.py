"""(IA)^3 (Liu et al. 2022), through `peft`: learned vectors rescale keys, values and the
feed-forward activations; fewer trained parameters than LoRA and nothing to merge at serving time."""

from typing import Literal

from kftune.methods.artifacts import PEFT_ADAPTER
from kftune.methods.base import MethodOptions, peft_task_type, register


class IA3Options(MethodOptions):
    name: Literal["ia3"] = "ia3"
    target_modules: list[str] | None = None
    """None: peft's default (key, value, output.dense on BERT; k_proj, v_proj, down_proj on Llama)."""
    feedforward_modules: list[str] | None = None
    """Which of target_modules are feed-forward layers (scaled on their input); None: peft's default."""


@register(
    IA3Options,
    "Learned rescaling vectors on keys, values and feed-forward activations (peft IA3).",
    artifact=PEFT_ADAPTER,
)
def apply(model, options: IA3Options, task: str):
    import peft

    config = peft.IA3Config(
        task_type=peft_task_type(task),
        target_modules=options.target_modules,
        feedforward_modules=options.feedforward_modules,
    )
    return peft.get_peft_model(model, config)
