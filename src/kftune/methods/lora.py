"""LoRA (Hu et al. 2021) and its DoRA / rsLoRA variants, through `peft`.

With `merge: true` the artifact is the base model with the low-rank updates folded into its
weights (`merge_and_unload`): a plain Hugging Face model, no peft needed to serve it."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from kftune.methods.artifacts import PEFT_ADAPTER, WHOLE_MODEL, Artifact
from kftune.methods.base import WITH_MASKED_LM, MethodOptions, peft_task_type, register


class LoraOptions(MethodOptions):
    name: Literal["lora"] = "lora"
    r: int = Field(default=8, ge=1)
    alpha: float = Field(default=16, gt=0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] | None = None
    """None: peft's default for the architecture (query/value on BERT, q_proj/v_proj on Llama)."""
    use_dora: bool = False
    use_rslora: bool = False
    merge: bool = False
    """Save the merged model (base weights + updates) instead of the adapter."""


def save_lora(model, options: LoraOptions, out: Path) -> None:
    """With `merge`, the updates are folded into the trained model's own weights (no second copy of a
    model that may be billions of parameters); the PeftModel then computes what the saved folder does."""
    if options.merge:
        WHOLE_MODEL.save(model.merge_and_unload(), options, out)
    else:
        PEFT_ADAPTER.save(model, options, out)


def load_lora(model_dir: Path, options: LoraOptions, task: str, load_base):
    return (WHOLE_MODEL if options.merge else PEFT_ADAPTER).load(model_dir, options, task, load_base)


@register(
    LoraOptions,
    "Low-rank updates on chosen linear layers; the task head trains too.",
    WITH_MASKED_LM,
    artifact=Artifact(save_lora, load_lora),
)
def apply(model, options: LoraOptions, task: str):
    import peft

    config = peft.LoraConfig(
        task_type=peft_task_type(task),
        r=options.r,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=options.target_modules,
        use_dora=options.use_dora,
        use_rslora=options.use_rslora,
    )
    return peft.get_peft_model(model, config)
