"""Penalties that keep the pretrained weights a method changes close to their pretrained values.

    penalty = 1/2 * sum_w (alpha + lambda * F_w) * (theta_w - theta_0,w)^2

alpha is L2-SP's (Li et al. 2018), lambda and the diagonal Fisher F are EWC's (Kirkpatrick et al.
2017); either may be absent. A weight's change is `theta - theta_0` for a weight the method trains
in place (full fine-tuning, freezing, selective methods: theta_0 is copied once, in fp32, when training
starts) and the low-rank update `B A * scaling` for a LoRA layer, which needs no copy at all: its
change from the pretrained weight is exactly the update. New parameters (a classification head,
virtual tokens) have no pretrained value and are not anchored.

Under DDP every worker holds theta_0 and the strengths of every anchored weight and computes the whole
penalty, so the loop hands the engine 1/world of it per worker. DeepSpeed shards what it keeps in fp32,
and so does the anchor: each worker keeps theta_0 and the strengths (the Fisher's part sent by rank 0)
of its own part of each weight trained in place, never another's:

- ZeRO-1/2 (and DeepSpeed's bf16 optimizer) keep whole weights on every worker but give each worker's
  optimizer one fragment of them (`param._hp_mapping`); the worker's penalty on its fragments goes into
  the loss world times over, as it is on this worker alone.
- ZeRO-3 partitions the weights themselves: the worker adds the penalty's gradient s * (theta - theta_0)
  to its partition of the fp32 gradients before the optimizer step (theta from DeepSpeed's fp32 master
  partition), so the penalty never gathers a weight. LoRA's factors stay whole under ZeRO-3's default
  persistence threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kftune.errors import KftuneError
from kftune.train.collectives import all_gather, all_reduce_sum, from_rank_zero

PEFT_PREFIX = "base_model.model."


@dataclass
class AnchoredWeight:
    name: str
    """The base model's name for the weight (the key of its Fisher)."""
    parameter: torch.nn.Parameter | None = None
    reference: torch.Tensor | None = None
    """theta_0 (fp32, on the parameter's device) of what this worker anchors of a weight trained in place."""
    lora_layer: torch.nn.Module | None = None
    fragment: tuple[int, int] | None = None
    """ZeRO-1/2: (start, count) of this worker's fragment in the flattened weight (count 0 when it has none)."""

    @property
    def partitioned(self) -> bool:
        """A ZeRO-3 partition trained in place: `reference` is this worker's part of theta_0."""
        return self.lora_layer is None and hasattr(self.parameter, "ds_id")

    def change(self) -> torch.Tensor:
        """theta - theta_0, differentiable with respect to what the method trains (this worker's part of
        it, from DeepSpeed's fp32 master partition and without a gradient, for a ZeRO-3 partition)."""
        if self.lora_layer is not None:
            return sum(self.lora_layer.get_delta_weight(a).float() for a in self.lora_layer.active_adapters)
        if self.partitioned:
            from deepspeed.utils import safe_get_local_fp32_param

            return safe_get_local_fp32_param(self.parameter) - self.reference
        return _held(self.parameter, self.fragment).float() - self.reference

    def part(self) -> tuple[int, int] | None:
        """(start, count) in the flattened weight of what this worker anchors; None for all of it."""
        if self.partitioned:
            size = self.parameter.ds_tensor.ds_numel  # equal pieces in rank order, the last one padded
            return torch.distributed.get_rank() * size, size
        return self.fragment


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
            factors = [p for p in module.parameters() if p.requires_grad]
            lora_parameters |= {id(p) for p in factors}
            if any(hasattr(p, "ds_id") and not p.ds_persist for p in factors):
                raise KftuneError(
                    "retention: ZeRO-3 partitions this run's LoRA factors (their size is over the DeepSpeed config's "
                    "stage3_param_persistence_threshold), and the penalty on B A needs them whole; raise the "
                    "threshold in train.deepspeed.config_file or use ZeRO stage 0-2"
                )
    for name, parameter in model.named_parameters():
        if id(parameter) in chosen and id(parameter) not in lora_parameters and _base_name(name) not in new_names:
            if "modules_to_save" in name:  # peft's trained copy of a new head
                continue
            fragment = _fragment(parameter)
            reference = _pretrained(parameter, fragment)
            weights.append(AnchoredWeight(_base_name(name), parameter, reference, fragment=fragment))
    return weights


def _fragment(parameter: torch.nn.Parameter) -> tuple[int, int] | None:
    """Under ZeRO-1/2 (a whole weight linked to its fp32 master copy's partitions), the fragment of it this
    worker's optimizer holds; None under DDP and ZeRO-3."""
    if hasattr(parameter, "ds_id") or not hasattr(parameter, "_hp_mapping"):
        return None
    if parameter._hp_mapping is None:  # this worker's partition holds none of it
        return 0, 0
    address = parameter._hp_mapping.lp_fragment_address
    return address.start, address.numel


def _held(parameter: torch.nn.Parameter, fragment: tuple[int, int] | None) -> torch.Tensor:
    return parameter if fragment is None else parameter.flatten().narrow(0, *fragment)


def _pretrained(parameter: torch.nn.Parameter, fragment: tuple[int, int] | None) -> torch.Tensor:
    """theta_0 in fp32 of what this worker anchors: the whole weight, its ZeRO-1/2 fragment, or its partition
    of DeepSpeed's fp32 master copy under ZeRO-3 (the engine is built by then; the base's values, before
    any step or checkpoint)."""
    if hasattr(parameter, "ds_id"):
        from deepspeed.utils import safe_get_local_fp32_param

        return safe_get_local_fp32_param(parameter).detach().clone()
    return _held(parameter, fragment).detach().float().clone()


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
        """`fisher` (EWC's, by base weight name) is needed on rank 0 only: every worker gets the whole entries
        of the weights it anchors whole, and its part of the others."""
        if not weights:
            raise KftuneError(
                f"{field}: the method trains no pretrained weight of this model, so there is nothing to anchor"
            )
        on_rank_zero = strength and fisher is not None
        missing = from_rank_zero([w.name for w in weights if w.name not in fisher] if on_rank_zero else [])
        if missing:
            raise KftuneError(
                f"retention.ewc: the Fisher has no entry for {missing[:3]} (made for another architecture?)"
            )
        first = weights[0]
        device = self.device = (first.reference if first.reference is not None else first.change()).device
        self.weights = [w for w in weights if w.part() is None]
        self.fragments = [w for w in weights if w.fragment is not None]
        self.partitions = [w for w in weights if w.partitioned]
        self.world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        whole = from_rank_zero({w.name: fisher[w.name] for w in self.weights} if on_rank_zero else None)
        self.strengths = [alpha + strength * whole[w.name].to(device) if strength else alpha for w in self.weights]
        self.fragment_strengths, self.partition_strengths = (
            [
                alpha + strength * _part_of(fisher[w.name] if on_rank_zero else None, w.part(), device)
                if strength
                else alpha
                for w in part
            ]
            for part in (self.fragments, self.partitions)
        )

    @property
    def in_graph(self) -> bool:
        """Whether the penalty has terms in the autograd graph (all but ZeRO-3's partitions)."""
        return bool(self.weights or self.fragments)

    def penalty(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(this worker's penalty term, in the autograd graph; the penalty's value over all workers). A weight
        held whole counts on every worker; a ZeRO-1/2 fragment on its own worker only, so it counts world times
        there: either way the workers' terms average to the whole penalty, as the loop's other terms do."""
        whole = _sum_penalty(self.weights, self.strengths, self.device)
        fragments = _sum_penalty(self.fragments, self.fragment_strengths, self.device)
        total = whole.detach() + (all_reduce_sum(fragments.detach().clone()) if self.fragments else 0.0)
        return whole + self.world * fragments, total

    def add_partition_gradients(self, loss_scale: float) -> torch.Tensor:
        """ZeRO-3, at an accumulation boundary before the optimizer step: each partition's penalty gradient
        s * (theta - theta_0) added to this worker's fp32 gradient partition (times the loss scale its
        gradients carry); returns the penalty on all partitions, summed over the workers."""
        from deepspeed.utils import safe_get_local_grad, safe_set_local_grad

        total = torch.zeros((), device=self.device)
        for weight, strength in zip(self.partitions, self.partition_strengths, strict=True):
            change = weight.change()
            safe_set_local_grad(
                weight.parameter, safe_get_local_grad(weight.parameter) + loss_scale * strength * change
            )
            total += 0.5 * (strength * change.pow(2)).sum()
        torch.distributed.all_reduce(total)
        return total


def _sum_penalty(weights: list[AnchoredWeight], strengths: list, device: torch.device) -> torch.Tensor:
    zero = torch.zeros((), device=device)
    return 0.5 * sum(((s * w.change().pow(2)).sum() for w, s in zip(weights, strengths, strict=True)), zero)


def _part_of(whole: torch.Tensor | None, part: tuple[int, int], device: torch.device) -> torch.Tensor:
    """This worker's `part` (start, count) of the flattened `whole`, which rank 0 alone has and sends each
    worker (zeros past its end: ZeRO-3 pads the last partition)."""
    parts = all_gather(part)
    size = max(count for _, count in parts)
    received = torch.empty(size, dtype=torch.float32, device=device)
    pieces = None
    if torch.distributed.get_rank() == 0:
        flat = whole.flatten().float().to(device)
        flat = torch.nn.functional.pad(flat, (0, max(0, max(s + c for s, c in parts) - flat.numel())))
        pieces = [torch.nn.functional.pad(flat[s : s + c], (0, size - c)) for s, c in parts]
    torch.distributed.scatter(received, pieces, src=0)
    return received[: part[1]]
