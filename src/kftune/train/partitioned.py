"""ZeRO-3 from checkpoint to artifact without a whole model in any process.

Loading, as litgpt and torchtune load big models (build empty, then fill from the files): the model
is constructed under `deepspeed.zero.Init` with weight initialisation off, so every parameter is an
empty partition from its construction, and each worker reads only its own partition's bytes of each
tensor from the safetensors files. Parameters the checkpoint lacks (a new classification head) get
the model's own initialisation, on one worker, seeded.

Saving: the trained parameters (an adapter, a few tensors) are gathered alone and written by rank 0;
a whole model is gathered one parameter at a time and streamed into safetensors shards, so rank 0
holds one shard's worth of tensors at most. The probe runs on the partitioned model itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kftune.checkpoint_files import INDEX_FILE, SafetensorsCheckpoint
from kftune.errors import KftuneError

SHARD_BYTES = 2 * 2**30  # bytes of tensors per written shard, as save_pretrained's max_shard_size
READ_ELEMENTS = 2**24  # elements of a partition read from the checkpoint at a time (64 MB in fp32)


def load_partitioned(model_class, folder: Path, config, dtype: torch.dtype):
    """`model_class` (an Auto class) built partitioned under the active transformers DeepSpeed config
    (`kftune.train.engines.partitioned_construction`), each worker holding its part of `folder`'s weights."""
    import deepspeed
    from transformers import initialization
    from transformers.integrations.deepspeed import deepspeed_config, prevent_arange_dtype_change
    from transformers.modeling_utils import set_zero3_state

    with (
        initialization.no_init_weights(),  # every tensor is read from the checkpoint below
        prevent_arange_dtype_change(),  # RoPE frequencies stay fp32 under zero.Init's 16-bit default
        deepspeed.zero.Init(config_dict_or_path=deepspeed_config()),
        set_zero3_state(),  # tells transformers zero.Init is already active: no nested one, no random init
    ):
        model = model_class.from_config(config, dtype=dtype)
    # Tied now, not after filling: a tied output layer (Llama-3.2-1B's: 0.26B parameters) was built with a partition of
    # its own; tying frees it, and the layer is not initialised as "missing" from the checkpoint (a whole gathered copy).
    model.tie_weights()
    checkpoint = SafetensorsCheckpoint(folder)
    missing = fill_partitions(model, checkpoint)
    body = model.base_model_prefix + "."
    lacking = [name for name in missing if name.startswith(body)]
    if lacking:
        raise KftuneError(
            f"model.name_or_path: {folder} has no tensor for {lacking[:3]} ({len(lacking)} parameters of the "
            f"{type(model).__name__} body); its safetensors files belong to another architecture"
        )
    initialize_missing(model, missing)
    return model


def fill_partitions(model, checkpoint: SafetensorsCheckpoint) -> list[str]:
    """Copy each parameter's partition on this worker from `checkpoint` (its flat element range, as
    ZeRO-3 splits it: equal contiguous pieces in rank order, the last one padded); returns the names
    of the parameters the checkpoint does not hold."""
    prefix = model.base_model_prefix + "."
    missing = []
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            key = next(
                (k for k in (name, name.removeprefix(prefix), prefix + name) if k in checkpoint), None
            )  # checkpoints of the bare body lack the prefix; some heads' add it
            if key is None:
                missing.append(name)
                continue
            if tuple(checkpoint.shape(key)) != tuple(parameter.ds_shape):
                raise KftuneError(
                    f"model.name_or_path: tensor {key} has shape {list(checkpoint.shape(key))} in the checkpoint but "
                    f"{list(parameter.ds_shape)} in the model built from its config.json"
                )
            size = parameter.ds_tensor.ds_numel
            start = size * torch.distributed.get_rank(parameter.ds_process_group)
            end = min(start + size, parameter.ds_numel)
            for piece in range(start, end, READ_ELEMENTS):  # in pieces: a checkpoint dtype wider than the
                stop = min(piece + READ_ELEMENTS, end)  # partition's (fp32 into bf16) never doubles it whole
                parameter.ds_tensor[piece - start : stop - start].copy_(checkpoint.read_flat(key, piece, stop))
    return missing


def initialize_missing(model, names: list[str]) -> None:
    """The model's own initialisation (`_init_weights`) of the modules owning `names`, run on rank 0
    with their parameters gathered and handed back partitioned to every worker."""
    import deepspeed

    owners = {name.rpartition(".")[0] for name in names}
    for module_name, module in model.named_modules():
        if module_name in owners:
            with deepspeed.zero.GatheredParameters(list(module.parameters(recurse=False)), modifier_rank=0):
                if torch.distributed.get_rank() == 0:
                    with torch.no_grad():
                        model._init_weights(module)


def save_partitioned(module, options, out: Path, rank: int, state: dict[str, torch.Tensor] | None) -> None:
    """The method's artifact (see kftune.methods.artifacts) written from a ZeRO-3 model, holding `state`
    (this worker's `kept_state`, taken earlier) when given. A whole model (full and freezing methods, merged
    LoRA) streams one parameter at a time; any other artifact is the trained parameters, gathered alone.
    Collective; afterwards `module` is the tuned model (merged, for merged LoRA), still partitioned."""
    import deepspeed

    from kftune.methods import METHODS
    from kftune.methods.artifacts import WHOLE_MODEL

    if state is not None:
        load_into_partitions(module, state)
    if getattr(options, "merge", False):
        merge_lora_in_partitions(module)
    if METHODS[options.name].artifact is WHOLE_MODEL or getattr(options, "merge", False):
        stream_whole_model(module, out, rank)
        return
    trained = [p for p in module.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(trained, modifier_rank=None):
        if rank == 0:
            METHODS[options.name].artifact.save(module, options, out)


def load_into_partitions(module, state: dict[str, torch.Tensor]) -> None:
    """This worker's partitions from `state` (a `kept_state`) written back into `module`'s parameters.
    Collective: a persistent (small, always whole) parameter is gathered again from the partitions."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if name in state:
                parameter.ds_tensor.copy_(state[name])
                if parameter.ds_status == ZeroParamStatus.AVAILABLE:
                    parameter.partition()
                    parameter.all_gather()


def merge_lora_in_partitions(module) -> None:
    """peft's LoRA merge (base weight += scaled B @ A) in each LoRA layer, its parameters gathered on
    every worker in turn and handed back partitioned: the merged model, one layer at a time."""
    import deepspeed
    from peft.tuners.lora import LoraLayer

    for layer in module.modules():
        if isinstance(layer, LoraLayer):
            with deepspeed.zero.GatheredParameters(list(layer.parameters()), modifier_rank=0):
                layer.merge()  # every worker merges the same gathered weights, so its flags agree


def stream_whole_model(module, out: Path, rank: int) -> None:
    """`save_pretrained`'s folder of a partitioned model (config, generation config, safetensors shards
    and their index), gathered one parameter at a time: rank 0 holds at most one shard of tensors. A
    merged peft model is written as `merge_and_unload` would leave it (no LoRA tensors, base names).
    Tied parameters are written once, under their first name, as `save_pretrained` does. Collective."""
    import deepspeed
    from safetensors.torch import save_file

    model = module.get_base_model() if hasattr(module, "get_base_model") else module
    shard: dict[str, torch.Tensor] = {}
    written: list[list[str]] = []

    def write() -> None:
        save_file(shard, str(out / f"part-{len(written)}.safetensors"), metadata={"format": "pt"})
        written.append(sorted(shard))
        shard.clear()

    for name, parameter in model.named_parameters():
        if "lora_" in name:
            continue
        with deepspeed.zero.GatheredParameters([parameter], modifier_rank=None):
            if rank == 0:
                shard[name.replace(".base_layer.", ".")] = parameter.detach().to("cpu", copy=True).contiguous()
        if rank == 0 and sum(t.nbytes for t in shard.values()) >= SHARD_BYTES:
            write()
    if rank != 0:
        return
    persistent = model.state_dict(keep_vars=True)
    for name, buffer in model.named_buffers():
        if name in persistent:
            shard[name.replace(".base_layer.", ".")] = buffer.detach().to("cpu", copy=True).contiguous()
    if shard or not written:
        write()
    names = (
        ["model.safetensors"]
        if len(written) == 1
        else [f"model-{i + 1:05d}-of-{len(written):05d}.safetensors" for i in range(len(written))]
    )
    for i, name in enumerate(names):
        (out / f"part-{i}.safetensors").rename(out / name)
    if len(names) > 1:
        weight_map = {tensor: name for name, tensors in zip(names, written, strict=True) for tensor in tensors}
        (out / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    model.config.save_pretrained(str(out))
    if model.can_generate():
        model.generation_config.save_pretrained(str(out))


def frozen_partitioned_copy(config, num_labels: int | None):
    """The base model, frozen and partitioned under ZeRO-3 (every worker reads its share of the checkpoint),
    in a DeepSpeed engine without an optimizer, whose hooks gather each layer as its forward runs: the
    reference or teacher of a method that trains the whole model, as TRL builds its reference under ZeRO-3.
    Every worker must run its forward passes together, as the policy's."""
    import deepspeed

    from kftune.models import load_run_base_model, weights_dtype
    from kftune.train.deepspeed_config import deepspeed_config
    from kftune.train.engines import partitioned_construction

    train = config.train
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    with partitioned_construction(train, world, "full"):
        base = load_run_base_model(config, num_labels, weights_dtype(train.precision, "full", True))
    base.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=base, config=deepspeed_config(train, world), dist_init_required=False)
    return engine.module.eval()
