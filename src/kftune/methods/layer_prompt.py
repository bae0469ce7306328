"""Layer prompts (deep prompts in the spirit of P-Tuning v2, Liu et al. 2022): a trained vector e_l per layer added to the attention's queries,
keys and values, Q' = Q + e_l, K' = K + e_l, V' = V + e_l; everything else stays frozen (the
classification head trains).

Hand-written: no library implements this. e_l is a parameter of the attention module, added by
forward hooks on the q/k/v projections, and starts at zero (the base model's outputs). Under
grouped-query attention (Llama with fewer key/value heads) keys and values are narrower than
queries, so they share a second vector of their own width. Adding e_l to every key shifts all
attention scores of a query equally, which softmax ignores: in effect e_l steers the queries and
shifts the values. The artifact holds the trained parameters only.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from kftune.methods.artifacts import TRAINED_PARAMETERS
from kftune.methods.base import MethodOptions, register, train_only, with_task_head
from kftune.methods.layers import block_modules, check_known_layout, layout


class LayerPromptOptions(MethodOptions):
    name: Literal["layer_prompt"] = "layer_prompt"


def add_vector(attention: nn.Module, vector_name: str):
    def hook(projection, args, output):
        return output + getattr(attention, vector_name)

    return hook


@register(
    LayerPromptOptions,
    "A trained vector per layer added to the attention's queries, keys and values.",
    artifact=TRAINED_PARAMETERS,
    check=check_known_layout,
)
def apply(model, options: LayerPromptOptions, task: str):
    blocks = layout(model)
    attention_name = blocks.query.rsplit(".", 1)[0]
    for (_, attention), (_, query), (_, key), (_, value) in zip(
        *(block_modules(model, name) for name in (attention_name, blocks.query, blocks.key, blocks.value)), strict=False
    ):
        attention.layer_prompt = nn.Parameter(
            torch.zeros(query.out_features, device=query.weight.device, dtype=query.weight.dtype)
        )
        key_value_vector = "layer_prompt"
        if key.out_features != query.out_features:
            key_value_vector = "layer_prompt_kv"
            attention.layer_prompt_kv = nn.Parameter(
                torch.zeros(key.out_features, device=key.weight.device, dtype=key.weight.dtype)
            )
        query.register_forward_hook(add_vector(attention, "layer_prompt"))
        key.register_forward_hook(add_vector(attention, key_value_vector))
        value.register_forward_hook(add_vector(attention, key_value_vector))
    prompts = {name for name, _ in model.named_parameters() if name.rsplit(".", 1)[-1].startswith("layer_prompt")}
    return train_only(model, with_task_head(model, prompts, task))
