"""The method registry: a name, an options schema and an `apply(model, options, task)` that leaves
exactly the intended parameters trainable. Method modules register themselves on import."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from pydantic import BaseModel, ConfigDict

TASKS = ("sequence_classification", "causal_lm")


class MethodOptions(BaseModel):
    """Options of one method; `name` is the registry key (a Literal in each subclass)."""

    model_config = ConfigDict(extra="forbid")
    name: str


@dataclass(frozen=True)
class MethodSpec:
    name: str
    options: type[MethodOptions]
    apply: Callable
    description: str
    tasks: tuple[str, ...]
    saves_adapter: bool
    """True when the artifact is a PEFT adapter (only the trained weights) rather than a whole model."""


METHODS: dict[str, MethodSpec] = {}


def register(options: type[MethodOptions], description: str, tasks: tuple[str, ...] = TASKS, saves_adapter: bool = False):
    name = options.model_fields["name"].default

    def decorator(apply: Callable) -> Callable:
        METHODS[name] = MethodSpec(name, options, apply, description, tasks, saves_adapter)
        return apply

    return decorator


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
