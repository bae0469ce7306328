"""Penalties that keep the pretrained weights a method changes close to their pretrained values.

    penalty = 1/2 * sum_w (alpha + lambda * F_w) * (theta_w - theta_0,w)^2

alpha is L2-SP's (Li et al. 2018), lambda and the diagonal Fisher F are EWC's (Kirkpatrick et al.
2017); either may be absent. A weight's change is `theta - theta_0` for a weight the method trains
in place (full fine-tuning, freezing, selective methods: theta_0 is copied once, in fp32, when training
starts) and the low-rank update `B A * scaling` for a LoRA layer, which needs no copy at all: its
change from the pretrained weight is exactly the update. New parameters (a classification head,
virtual tokens) have no pretrained value and are not anchored.

Each worker computes the penalty on its own replica (DDP, ZeRO 0-2 keep whole parameters on every
worker), so the loop hands the engine 1/world of it per worker; ZeRO-3 is refused by the config.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kftune.errors import KftuneError

PEFT_PREFIX = "base_model.model."


@dataclass
class AnchoredWeight:
    name: str
    """The base model's name for the weight (the key of its Fisher)."""
    parameter: torch.nn.Parameter | None = None
    reference: torch.Tensor | None = None
    """theta_0 of a weight trained in place (fp32, on the parameter's device)."""
    lora_layer: torch.nn.Module | None = None

    def change(self) -> torch.Tensor:
        """theta - theta_0, differentiable with respect to what the method trains."""
        if self.lora_layer is not None:
            return sum(self.lora_layer.get_delta_weight(a).float() for a in self.lora_layer.active_adapters)
        return self.parameter.float() - self.reference


def anchored_weights(model, trainable: list[torch.nn.Parameter], new_names: set[str]) -> list[AnchoredWeight]:
    """The pretrained weights `trainable` (every parameter the method may ever train) change; `new_names`
    are parameters without a pretrained value (the classification head)."""
    from peft.tuners.lora import LoraLayer

    chosen = {id(p) for p in trainable}
    weights = []
    lora_parameters = set()
    for module_name, module in model.named_modules():
        if isinstance(module, LoraLayer) and hasattr(module, "get_delta_weight"):
            weights.append(AnchoredWeight(_base_name(module_name) + ".weight", lora_layer=module))
            lora_parameters |= {id(p) for p in module.parameters() if p.requires_grad}
    for name, parameter in model.named_parameters():
        if id(parameter) in chosen and id(parameter) not in lora_parameters and _base_name(name) not in new_names:
            if "modules_to_save" in name:  # peft's trained copy of a new head
                continue
            weights.append(
                AnchoredWeight(_base_name(name), parameter=parameter, reference=parameter.detach().float().clone())
            )
    return weights


def _base_name(name: str) -> str:
    return name.removeprefix(PEFT_PREFIX).replace(".base_layer", "")


class Anchor:
    """The L2-SP / EWC penalty over a model's anchored weights."""

    def __init__(
        self,
        weights: list[AnchoredWeight],
        alpha: float,
        strength: float,
        fisher: dict[str, torch.Tensor] | None,
        field: str,
    ):
        if not weights:
            raise KftuneError(
                f"{field}: the method trains no pretrained weight of this model, so there is nothing to anchor"
            )
        missing = [w.name for w in weights if strength and (fisher is None or w.name not in fisher)]
        if missing:
            raise KftuneError(
                f"retention.ewc: the Fisher has no entry for {missing[:3]} (made for another architecture?)"
            )
        self.weights = weights
        device = weights[0].change().device
        self.strengths = [
            alpha + strength * fisher[w.name].to(device) if strength else torch.tensor(alpha, device=device)
            for w in weights
        ]

    def penalty(self) -> torch.Tensor:
        return 0.5 * sum((s * w.change().pow(2)).sum() for w, s in zip(self.weights, self.strengths, strict=True))
