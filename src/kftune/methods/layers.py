"""Where things sit in a transformer: the block stack, each parameter's position relative to it,
and the module names of the attention and feed-forward projections inside a block.

Freezing methods, gradual unfreezing, layer-wise learning-rate decay and the hand-written methods
(attention_only, adapter, layer_prompt) all select by these, so the BERT (`bert.encoder.layer.N`)
and Llama (`model.layers.N`) conventions live here once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from kftune.errors import KftuneError

BLOCK_LIST = re.compile(r"(^|\.)(layer|layers|h|blocks)$")


@dataclass(frozen=True)
class Layout:
    """Module names inside one transformer block."""

    query: str
    key: str
    value: str
    attention_output: str
    feedforward_output: str


LAYOUTS = {
    "bert": Layout(
        "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense", "output.dense"
    ),
    "llama": Layout("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.down_proj"),
}


def check_known_layout(model_config, options) -> str | None:
    """A `check` hook for methods that hook into named projections of BERT- or Llama-style blocks."""
    if model_config.model_type not in LAYOUTS:
        return f"method.name: {options.name!r} knows the block layout of {', '.join(LAYOUTS)} models, not {model_config.model_type!r}"
    return None


def layout(model) -> Layout:
    model_type = model.config.model_type
    if model_type not in LAYOUTS:
        raise KftuneError(f"method.name: no known block layout for {model_type!r} models (known: {', '.join(LAYOUTS)})")
    return LAYOUTS[model_type]


def transformer_blocks(model) -> tuple[str, nn.ModuleList]:
    """The dotted name and the ModuleList of the model's transformer blocks."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and BLOCK_LIST.search(name):
            return name, module
    raise KftuneError(
        f"method.name: cannot find the transformer blocks of {type(model).__name__} (a ModuleList named layer, layers, h or blocks)"
    )


def parameter_positions(model) -> tuple[dict[str, int], int]:
    """({parameter name: position}, number of blocks). Position -1 is below the blocks (embeddings),
    i is block i, and the number of blocks is above them (final norm, pooler, heads): parameters
    are registered in forward order, so "before the first block parameter" means below."""
    prefix, blocks = transformer_blocks(model)
    positions: dict[str, int] = {}
    seen_block = False
    for name, _ in model.named_parameters():
        if name.startswith(prefix + "."):
            positions[name] = int(name[len(prefix) + 1 :].split(".", 1)[0])
            seen_block = True
        else:
            positions[name] = len(blocks) if seen_block else -1
    return positions, len(blocks)


def position_name(model, position: int) -> str:
    """A readable name for a position: the block's module name, `embeddings` or `above blocks`."""
    prefix, blocks = transformer_blocks(model)
    if position < 0:
        return "embeddings"
    return f"{prefix}.{position}" if position < len(blocks) else "above blocks"


def block_modules(model, relative_name: str) -> list[tuple[str, nn.Module]]:
    """(full name, module) of `relative_name` (e.g. `self_attn.q_proj`) in every block."""
    prefix, blocks = transformer_blocks(model)
    return [(f"{prefix}.{i}.{relative_name}", block.get_submodule(relative_name)) for i, block in enumerate(blocks)]
