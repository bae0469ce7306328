"""Fine-tuning methods selectable by name (`method.name` in the run config)."""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from kftune.errors import KftuneError
from kftune.methods import adapters, freezing, full, ia3, layer_prompt, lora, prompt_learning, selective  # noqa: F401  (each module registers its methods)
from kftune.methods.base import METHODS, MethodOptions, MethodSpec
from kftune.methods.layers import parameter_positions

# A union built at run time from the registry: `X | Y` has no form for that, so typing.Union it is.
MethodConfig = Annotated[Union[tuple(spec.options for spec in METHODS.values())], Field(discriminator="name")]  # noqa: UP007


def method_supports_task(options: MethodOptions, task: str) -> bool:
    return task in METHODS[options.name].tasks


def architecture_problem(options: MethodOptions, model_config) -> str | None:
    """Why a model with this `config.json` cannot take the method (a message naming the field), or None."""
    check = METHODS[options.name].check
    return check(model_config, options) if check else None


def check_method_fits_model(options: MethodOptions, model_path) -> None:
    """Fail before training when the model's architecture cannot take the method."""
    from transformers import AutoConfig

    from kftune.models import pretrained_args

    folder, gguf = pretrained_args(model_path)
    problem = architecture_problem(options, AutoConfig.from_pretrained(folder, **gguf))
    if problem:
        raise KftuneError(problem)


def apply_method(model, options: MethodOptions, task: str):
    """Apply a registered method; returns the model to train (possibly a PEFT wrapper)."""
    problem = architecture_problem(options, model.config)
    if problem:
        raise KftuneError(problem)
    return METHODS[options.name].apply(model, options, task)


def may_train(model, options: MethodOptions) -> list:
    """Every parameter the method may ever train: the trainable ones, and those gradual unfreezing turns on later."""
    hook = METHODS[options.name].may_train
    return hook(model, options) if hook else [p for p in model.parameters() if p.requires_grad]


def optimizer_parameter_groups(
    model, options: MethodOptions, lr: float, layer_lr_decay: float | None = None
) -> list[dict]:
    """AdamW parameter groups over every parameter the method may train. With `layer_lr_decay` d,
    a parameter `k` blocks below the top block gets lr * d**k (discriminative fine-tuning,
    ULMFiT, Howard & Ruder 2018): the top block and what sits above it get lr, the embeddings lr * d**blocks."""
    parameters = may_train(model, options)
    if layer_lr_decay is None:
        return [{"params": parameters, "lr": lr}]
    chosen = {id(p) for p in parameters}
    positions, blocks = parameter_positions(model)
    groups: dict[int, list] = {}
    for name, parameter in model.named_parameters():
        if id(parameter) in chosen:
            groups.setdefault(max(0, blocks - 1 - positions[name]), []).append(parameter)
    return [{"params": group, "lr": lr * layer_lr_decay**depth} for depth, group in sorted(groups.items())]


def calibrate_method(model, options: MethodOptions, loss_on_first) -> None:
    """Let a method that chooses parameters from the task's gradients see them (see MethodSpec.calibrate)."""
    hook = METHODS[options.name].calibrate
    if hook:
        hook(model, options, loss_on_first)


def on_step(model, options: MethodOptions, step: int) -> list[str] | None:
    """Let the method act after optimizer step `step`; returns the layers it unfroze, if any."""
    hook = METHODS[options.name].on_step
    return hook(model, options, step) if hook else None


def save_tuned_model(model, options: MethodOptions, out) -> None:
    METHODS[options.name].artifact.save(model, options, out)


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; a gradient-masked parameter counts its unmasked entries."""
    trainable = sum(
        int(p.gradient_mask.sum()) if hasattr(p, "gradient_mask") else full_numel(p)
        for p in model.parameters()
        if p.requires_grad
    )
    return trainable, sum(full_numel(p) for p in model.parameters())


def full_numel(parameter) -> int:
    """Entries of the whole parameter, also when ZeRO-3 holds only this worker's part of it."""
    return getattr(parameter, "ds_numel", parameter.numel())


__all__ = [
    "METHODS",
    "MethodConfig",
    "MethodOptions",
    "MethodSpec",
    "apply_method",
    "architecture_problem",
    "calibrate_method",
    "check_method_fits_model",
    "full_numel",
    "may_train",
    "method_supports_task",
    "on_step",
    "optimizer_parameter_groups",
    "save_tuned_model",
    "trainable_parameters",
]
