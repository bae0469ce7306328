"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020).

A small down-project / ReLU / up-project module with a residual connection follows the attention
output projection and the feed-forward output projection of every block (`houlsby`), or the
feed-forward one only (`pfeiffer`). The up-projection starts at zero, so the adapted model starts
out computing exactly the base model. Adapters, layer norms and the classification head train.

Hand-written: the maintained adapter library (`adapters`) does not support transformers 5, and
peft has no bottleneck adapter. Each adapter is a child module of the projection it follows, run
by a forward hook, so the base weights keep their names; the artifact holds the trained
parameters only.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from kftune.methods.artifacts import TRAINED_PARAMETERS
from kftune.methods.base import MethodOptions, register, train_only, with_task_head
from kftune.methods.layers import block_modules, check_known_layout, layout


class Bottleneck(nn.Module):
    def __init__(self, size: int, bottleneck: int):
        super().__init__()
        self.down = nn.Linear(size, bottleneck)
        self.up = nn.Linear(bottleneck, size)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden):
        return hidden + self.up(nn.functional.relu(self.down(hidden)))


def run_adapter(projection: nn.Module, args, output):
    return projection.adapter(output)


class AdapterOptions(MethodOptions):
    name: Literal["adapter"] = "adapter"
    placement: Literal["houlsby", "pfeiffer"] = "houlsby"
    """houlsby: after attention and feed-forward; pfeiffer: after feed-forward only."""
    reduction_factor: int = Field(default=16, ge=1)
    """Bottleneck width = hidden size / reduction_factor."""


@register(
    AdapterOptions,
    "Bottleneck adapters after attention and/or feed-forward; adapters and norms train.",
    artifact=TRAINED_PARAMETERS,
    check=check_known_layout,
)
def apply(model, options: AdapterOptions, task: str):
    blocks = layout(model)
    places = (
        [blocks.feedforward_output]
        if options.placement == "pfeiffer"
        else [blocks.attention_output, blocks.feedforward_output]
    )
    for relative in places:
        for _, projection in block_modules(model, relative):
            size = projection.out_features
            projection.adapter = Bottleneck(size, max(1, size // options.reduction_factor)).to(
                projection.weight.device, projection.weight.dtype
            )
            projection.register_forward_hook(run_adapter)
    norms = {
        f"{module_name}.{name}"
        for module_name, module in model.named_modules()
        if "Norm" in type(module).__name__
        for name, _ in module.named_parameters()
    }
    adapters = {name for name, _ in model.named_parameters() if ".adapter." in name}
    return train_only(model, with_task_head(model, adapters | norms, task))
