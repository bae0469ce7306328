"""Fine-tuning methods selectable by name (`method.name` in the run config)."""

from typing import Annotated, Union

from pydantic import Field

from kftune.methods import freezing, full, lora  # noqa: F401  (each module registers its methods)
from kftune.methods.base import METHODS, MethodOptions, MethodSpec, trainable_parameters

MethodConfig = Annotated[Union[tuple(spec.options for spec in METHODS.values())], Field(discriminator="name")]


def method_supports_task(options: MethodOptions, task: str) -> bool:
    return task in METHODS[options.name].tasks


def apply_method(model, options: MethodOptions, task: str):
    """Apply a registered method; returns the model to train (possibly a PEFT wrapper)."""
    return METHODS[options.name].apply(model, options, task)


__all__ = ["METHODS", "MethodConfig", "MethodOptions", "MethodSpec", "apply_method", "method_supports_task", "trainable_parameters"]
