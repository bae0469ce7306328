"""Selective methods: train a chosen subset of the existing weights, nothing added.

- `attention_only` (attention-head fine-tuning): the attention projections;
  `heads` narrows updates to chosen heads with gradient masks.
- `bitfit` (Ben Zaken et al. 2021): bias terms only.
- `subnetwork` (a sparse subnetwork, cf. Xu et al. 2021, Child-Tuning): a mask picks a fraction of each block weight matrix, by weight
  magnitude or by the task's squared gradients (Fisher information) on a few training rows; the
  other entries get zero gradient.

Hand-written: peft has no head-level or entry-level masking. Masked entries stay bit-identical
under AdamW because their gradient is exactly zero and weight decay is required to be 0.
The classification head always trains in full.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from kftune.methods.artifacts import TRAINED_PARAMETERS
from kftune.methods.base import MethodOptions, register, train_only, with_task_head
from kftune.methods.layers import block_modules, check_known_layout, layout, transformer_blocks


def mask_gradient(parameter: torch.nn.Parameter, mask: torch.Tensor) -> None:
    """Zero the gradient wherever `mask` is False; `parameter.gradient_mask` lets counts see it."""
    mask = mask.expand_as(parameter).to(parameter.device).clone()
    parameter.gradient_mask = mask
    parameter.register_hook(lambda grad: grad * mask)


def head_mask(heads: list[int], group: int, head_dim: int, features: int) -> torch.Tensor:
    """Which of `features` (rows of a q/k/v projection, columns of the output one) belong to `heads`;
    under grouped-query attention `group` query heads share one key/value head."""
    mask = torch.zeros(features, dtype=torch.bool)
    for head in heads:
        start = head // group * head_dim
        mask[start : start + head_dim] = True
    return mask


def check_no_weight_decay(config) -> tuple[str, str] | None:
    masked = config.method.name == "subnetwork" or getattr(config.method, "heads", None) is not None
    if masked and config.train.weight_decay:
        return (
            "train.weight_decay",
            f"{config.method.name} masks gradients, and weight decay would still move the masked entries; use 0",
        )
    return None


class AttentionOnlyOptions(MethodOptions):
    name: Literal["attention_only"] = "attention_only"
    heads: list[int] | None = Field(default=None, min_length=1)
    """Head indices (in every layer) whose slices of the projections train; None: all heads."""


def check_attention_only(model_config, options: AttentionOnlyOptions) -> str | None:
    wrong = [h for h in options.heads or [] if not 0 <= h < model_config.num_attention_heads]
    if wrong:
        return f"method.heads: {wrong} out of range; the model has {model_config.num_attention_heads} heads"
    return check_known_layout(model_config, options)


@register(
    AttentionOnlyOptions,
    "Train only the attention projections (query, key, value, output), optionally only chosen heads.",
    artifact=TRAINED_PARAMETERS,
    check=check_attention_only,
    check_config=check_no_weight_decay,
)
def apply_attention_only(model, options: AttentionOnlyOptions, task: str):
    blocks = layout(model)
    projections = {
        relative: block_modules(model, relative)
        for relative in (blocks.query, blocks.key, blocks.value, blocks.attention_output)
    }
    names = {
        f"{full}.{p}"
        for modules in projections.values()
        for full, module in modules
        for p, _ in module.named_parameters()
    }
    train_only(model, with_task_head(model, names, task))
    if options.heads is None:
        return model
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for relative in (blocks.query, blocks.key, blocks.value):
        for _, module in projections[relative]:
            rows = head_mask(
                options.heads,
                config.num_attention_heads * head_dim // module.out_features,
                head_dim,
                module.out_features,
            )
            mask_gradient(module.weight, rows[:, None])
            if module.bias is not None:
                mask_gradient(module.bias, rows)
    for _, module in projections[blocks.attention_output]:
        mask_gradient(module.weight, head_mask(options.heads, 1, head_dim, module.in_features)[None, :])
        if module.bias is not None:  # shared by all heads
            module.bias.requires_grad_(False)
    return model


class BitFitOptions(MethodOptions):
    name: Literal["bitfit"] = "bitfit"


def check_has_biases(model_config, options) -> str | None:
    if not (getattr(model_config, "attention_bias", True) or getattr(model_config, "mlp_bias", True)):
        return f"method.name: bitfit trains bias terms and this {model_config.model_type} model has none (attention_bias and mlp_bias are false)"
    return None


@register(
    BitFitOptions,
    "Train only the bias terms (and the classification head).",
    artifact=TRAINED_PARAMETERS,
    check=check_has_biases,
)
def apply_bitfit(model, options: BitFitOptions, task: str):
    return train_only(
        model, with_task_head(model, {name for name, _ in model.named_parameters() if name.endswith(".bias")}, task)
    )


class SubnetworkOptions(MethodOptions):
    name: Literal["subnetwork"] = "subnetwork"
    fraction: float = Field(default=0.05, gt=0.0, le=1.0)
    """Share of each block weight matrix that trains."""
    score: Literal["magnitude", "gradient"] = "magnitude"
    """Which entries: the largest weights, or those with the largest squared gradient on the task's
    first `score_rows` training rows (a Fisher-information mask, Sung et al. 2021)."""
    score_rows: int = Field(default=64, ge=1)


def block_matrices(model) -> dict[str, torch.nn.Parameter]:
    prefix, _ = transformer_blocks(model)
    return {name: p for name, p in model.named_parameters() if name.startswith(prefix + ".") and p.dim() == 2}


def keep_top(parameter: torch.nn.Parameter, scores: torch.Tensor, fraction: float) -> None:
    flat = scores.flatten()
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[flat.topk(max(1, round(fraction * flat.numel()))).indices] = True
    mask_gradient(parameter, mask.view_as(parameter))


def choose_by_gradient(model, options: SubnetworkOptions, loss_on_first) -> None:
    if options.score != "gradient":
        return
    matrices = block_matrices(model)
    model.zero_grad(set_to_none=True)
    loss_on_first(options.score_rows).backward()
    for parameter in matrices.values():
        keep_top(parameter, parameter.grad.detach().float() ** 2, options.fraction)
    model.zero_grad(set_to_none=True)


@register(
    SubnetworkOptions,
    "Train a fraction of every block weight matrix chosen by weight magnitude or task gradient; other entries get zero gradient.",
    check_config=check_no_weight_decay,
    calibrate=choose_by_gradient,
    reads_base_weights=True,
)
def apply_subnetwork(model, options: SubnetworkOptions, task: str):
    matrices = block_matrices(model)
    train_only(model, with_task_head(model, set(matrices), task))
    if options.score == "magnitude":
        for parameter in matrices.values():
            keep_top(parameter, parameter.detach().abs(), options.fraction)
    return model
