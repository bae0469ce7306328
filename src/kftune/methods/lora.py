"""LoRA (Hu et al. 2021) and its DoRA / rsLoRA variants, through `peft`."""

from typing import Literal

from pydantic import Field

from kftune.methods.base import MethodOptions, register


class LoraOptions(MethodOptions):
    name: Literal["lora"] = "lora"
    r: int = Field(default=8, ge=1)
    alpha: float = Field(default=16, gt=0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] | None = None
    """None: peft's default for the architecture (query/value on BERT, q_proj/v_proj on Llama)."""
    use_dora: bool = False
    use_rslora: bool = False


@register(LoraOptions, "Low-rank updates on chosen linear layers; the task head trains too.", saves_adapter=True)
def apply(model, options: LoraOptions, task: str):
    import peft

    task_type = peft.TaskType.SEQ_CLS if task == "sequence_classification" else peft.TaskType.CAUSAL_LM
    config = peft.LoraConfig(
        task_type=task_type,
        r=options.r,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=options.target_modules,
        use_dora=options.use_dora,
        use_rslora=options.use_rslora,
    )
    return peft.get_peft_model(model, config)
