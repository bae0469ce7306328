"""The method registry: a name, an options schema and an `apply(model, options, task)` that leaves
exactly the intended parameters trainable. Method modules register themselves on import.

Besides `apply`, a method may declare:
- `artifact`: how the tuned model is saved and reloaded (whole model, PEFT adapter, or only the
  trained parameters of a hand-written method); see `kftune.methods.artifacts`.
- `check(model_config, options)`: why this model's architecture cannot take the method (or None);
  run before any pipeline step starts, with the model's `config.json` only.
- `check_config(config)`: a (field, message) problem with the rest of the run config, or None.
- `may_train(model, options)`: every parameter that may ever train, when that is more than the
  ones trainable after `apply` (gradual unfreezing); the optimizer is built over these.
- `calibrate(model, options, loss_on_first)`: called once after `apply`, before training, for methods
  that pick their parameters from the task's gradients; `loss_on_first(n)` is the summed loss on
  the first n training rows, the same rows in every worker.
- `on_step(model, options, step)`: called after every optimizer step; returns the names of the
  layers it just unfroze (logged by the training loop) or None.
- `layer_lr_decay`: whether `train.layer_lr_decay` applies (methods that train whole layers).
- `zero_stages`: the DeepSpeed ZeRO stages the method works under, and `zero_note` saying why not the others.
- `trains_all`: every parameter trains from the first step (full fine-tuning), so none is a frozen
  weight that may load in 16 bits (see `kftune.models.weights_dtype`).
- `reads_base_weights`: `apply` or `calibrate` reads the base weights or their gradients (to choose
  entries), so under ZeRO-3 the model is built whole and partitioned after, not under `zero.Init`.
- `packs`: whether packed rows (`prompt.packing`) work; not for methods that prepend virtual tokens,
  which every packed example would then attend to.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from kftune.methods.artifacts import Artifact

TASKS = ("sequence_classification", "causal_lm")
WITH_MASKED_LM = (*TASKS, "masked_lm")  # methods that work on any module tree (PET through an MLM head)


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
    artifact: Artifact
    check: Callable | None = None
    check_config: Callable | None = None
    may_train: Callable | None = None
    calibrate: Callable | None = None
    on_step: Callable | None = None
    layer_lr_decay: bool = False
    zero_stages: tuple[int, ...] = (0, 1, 2, 3)
    zero_note: str = ""
    packs: bool = True
    trains_all: bool = False
    reads_base_weights: bool = False


METHODS: dict[str, MethodSpec] = {}


def register(
    options: type[MethodOptions],
    description: str,
    tasks: tuple[str, ...] = TASKS,
    artifact: Artifact | None = None,
    **hooks,
):
    """Register the decorated `apply` under `options`' name; `hooks` are the optional MethodSpec fields."""
    from kftune.methods.artifacts import WHOLE_MODEL

    name = options.model_fields["name"].default

    def decorator(apply: Callable) -> Callable:
        METHODS[name] = MethodSpec(name, options, apply, description, tasks, artifact or WHOLE_MODEL, **hooks)
        return apply

    return decorator


def task_head_names(model) -> set[str]:
    """Parameters outside the pretrained body (`classifier`, `score`, `lm_head`): the task head."""
    body = model.base_model_prefix + "."
    return {name for name, _ in model.named_parameters() if not name.startswith(body)}


def with_task_head(model, names: set[str], task: str) -> set[str]:
    """`names` plus the classification head, which is new and always trains; an LM head is pretrained and does not."""
    return names | task_head_names(model) if task == "sequence_classification" else names


def train_only(model, names: set[str]):
    """Make exactly `names` trainable."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in names)
    return model


def peft_task_type(task: str):
    import peft

    # masked LMs have no PEFT task type: the plain PeftModel passes inputs and labels through
    return {"sequence_classification": peft.TaskType.SEQ_CLS, "causal_lm": peft.TaskType.CAUSAL_LM}.get(task)
