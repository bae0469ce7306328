"""One training worker, top to bottom: resume, model, method, data, engine, steps, checkpoints, save.

Ray Train runs `train_worker` once per worker. The engine (`kftune.train.engines`) is plain DDP
(gloo on CPU, NCCL on GPU) or DeepSpeed ZeRO. Each optimizer step takes `gradient_accumulation`
micro-batches per worker and minimises the mean loss over the items (rows, or labelled tokens) of
the whole global batch, so the result does not depend on how the batch is split. Workers talk to
Ray Train only at checkpoints and at the end (and, in a sweep's trial, at each validation): every
`ray.train.report` is a synchronisation point that costs seconds.
"""

from __future__ import annotations

import itertools
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler

from kftune.alignment.collate import as_sequences
from kftune.alignment.objective import precompute_reference, training_objective
from kftune.alignment.ppo import remove_training_heads, repeat_for_updates
from kftune.config import RunConfig, TrainSection, config_to_dict
from kftune.errors import KftuneError
from kftune.methods import (
    apply_method,
    calibrate_method,
    may_train,
    on_step,
    optimizer_parameter_groups,
    save_tuned_model,
    trainable_parameters,
)
from kftune.models import (
    LABELS_FILE,
    TUNED_CONFIG_FILE,
    cast_floating_parameters,
    check_quantization_runs,
    load_run_base_model,
    load_tokenizer,
    resolve_model_path,
    weights_dtype,
)
from kftune.prompts.build import open_prompts, read_meta, read_prompts
from kftune.prompts.collate import Collator, batch_tokens, uses_varlen_attention
from kftune.retention.terms import build_retention
from kftune.train import TRAIN_LOG_FILE
from kftune.train.checkpoints import load_trainer_state, save_trainer_state
from kftune.train.collectives import all_gather, all_reduce_sum
from kftune.train.engines import make_engine, mixed_precision, partitioned_construction
from kftune.train.losses import token_losses
from kftune.train.memory import built_peak_gb, check_fits
from kftune.train.partitioned import save_partitioned
from kftune.train.progress import ProgressLine
from kftune.train.validation import best_evaluation, evaluations_since_best, validate

PROBE_FILE = "probe.json"
PROBE_ROWS = 16
BEST_STATE_FILE = "best_weights.rank{}.pt"  # keep_best's weights, one file per worker that keeps some


def train_worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    config = RunConfig.model_validate(loop_config["config"])
    prompts_dir, identity = loop_config["prompts_dir"], loop_config["identity"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    settings, task = config.train, config.model.task
    torch.set_num_threads(settings.cpus_per_worker)

    # A restarted run picks up its latest checkpoint; one that already finished hands its model back.
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            if (Path(directory) / TRAIN_LOG_FILE).is_file():
                if rank == 0:
                    print("train: this run already finished; reusing its model", flush=True)
                ray.train.report({}, checkpoint=ray.train.Checkpoint.from_directory(directory) if rank == 0 else None)
                return

    # Model and method: the same seeded base in every worker, then exactly the method's parameters trainable.
    check_device_runs(config, ray.train.torch.get_device())
    meta = read_meta(prompts_dir)
    num_labels = len(meta["label_names"]) or None
    with partitioned_construction(settings, world, config.method.name):  # ZeRO-3: each worker builds only its part
        model = build_model(config, num_labels, for_training=True)
    rows = open_prompts(prompts_dir, "train")  # memory-mapped: each worker reads only the rows its sampler hands it
    objective = training_objective(
        config, meta, model, varlen=uses_varlen_attention(model), rows=rows
    )  # the stage's loss (kftune.alignment): SFT's token cross-entropy, a reward model's or the DPO family's
    collate = objective.collate  # packed rows when build_prompts packed them
    with mixed_precision(model, settings.precision, torch.device("cpu")):  # the same rows in every worker
        calibrate_method(model, config.method, lambda n: objective.loss(model, collate(rows[:n])))
    trainable, total = trainable_parameters(model)

    # Data: each worker reads its shard; an optimizer step takes `gradient_accumulation` micro-batches from it.
    loader, sampler = worker_loader(rows, collate, settings, rank, world)
    loader = repeat_for_updates(loader, objective, settings.gradient_accumulation)  # PPO: several steps per rollout
    steps_per_epoch = len(loader) // settings.gradient_accumulation
    total_steps = min(settings.epochs * steps_per_epoch, settings.max_steps or steps_per_epoch * settings.epochs)

    # Over every parameter the method may ever train (gradual unfreezing turns more on later; AdamW
    # skips those without a gradient), in layer-wise learning-rate groups when asked for.
    groups = optimizer_parameter_groups(model, config.method, settings.lr, settings.layer_lr_decay)
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        check_fits(
            model,
            settings,
            config.prompt.max_length,
            world,
            task,
            torch.cuda.get_device_properties(device).total_memory,
        )
    engine = make_engine(
        model, groups, settings, total_steps, world, device
    )  # compiles the model when train.compile asks
    retention = build_retention(  # before a checkpoint's weights load: theta_0 is the base's
        config, engine.module, config.method, loop_config.get("storage"), rank, world, device
    )
    built_peaks = all_gather(built_peak_gb(device))  # every worker's memory high-water marks, for the train log
    with mixed_precision(
        engine.module, settings.precision, device
    ):  # also before it: dpo's precomputed reference scores the starting weights
        precompute_reference(objective, engine.model, device)

    # Validation during training: every worker scores its share of the (unpacked) validation rows.
    validation_rows = open_prompts(prompts_dir, "validation") if settings.eval_every_steps else []
    validation_collate = Collator(meta["pad_token_id"], task)

    step, history, seconds_before, resumed_at, best_state = 0, [], 0.0, [], None
    if checkpoint:
        with checkpoint.as_directory() as directory:
            state = load_trainer_state(Path(directory), rank, identity, world)
            engine.load(Path(directory))
            best_state = load_best_state(Path(directory), rank) if settings.keep_best else None
        step, history, seconds_before, resumed_at = (
            state["step"],
            state["history"],
            state["seconds"],
            state["resumed_at"] + [state["step"]],
        )
        if any(on_step(engine.module, config.method, past) for past in range(1, step + 1)):  # gradual unfreezing so far
            engine.trainable_set_changed()
        if rank == 0:
            print(f"train: resumed at step {step}/{total_steps} from {checkpoint.path}", flush=True)

    progress = ProgressLine(total_steps, start_step=step) if rank == 0 else None
    stop_early = False
    interval_loss = torch.zeros((), device=device)
    interval_tokens, interval_started, started = 0, time.perf_counter(), time.perf_counter()
    engine.model.train()
    while step < total_steps:
        epoch, done_in_epoch = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch)
        batches = itertools.islice(iter(loader), done_in_epoch * settings.gradient_accumulation, None)
        for _ in range(done_in_epoch, steps_per_epoch):
            micro_batches = list(itertools.islice(batches, settings.gradient_accumulation))
            interval_tokens += sum(batch_tokens(b) for b in micro_batches)  # counted on the host: no device sync
            micro_batches = [{k: v.to(device) for k, v in b.items()} for b in micro_batches]
            items = all_reduce_sum(sum(objective.items(b) for b in micro_batches).float())
            for batch in micro_batches:
                with engine.micro_step():
                    loss_share = objective.loss(engine.model, batch) / items
                    extra = retention.loss(engine.module, batch, step, items) if retention else 0.0
                    engine.backward(loss_share + extra)
                if retention:
                    retention.before_step(engine)
                engine.step()
                interval_loss += loss_share.detach().float()
            step += 1
            unfrozen = on_step(engine.module, config.method, step)
            if unfrozen:
                engine.trainable_set_changed()
                if rank == 0:
                    print(f"train: step {step}: unfroze {', '.join(unfrozen)}", flush=True)

            every = settings.checkpoint.every_steps
            checkpoint_now = every and step % every == 0 and step < total_steps
            validate_now = settings.eval_every_steps and (step % settings.eval_every_steps == 0 or step == total_steps)
            if (
                step % settings.log_every_steps == 0 or step == total_steps or checkpoint_now or validate_now
            ):  # these close the interval
                mean_loss = all_reduce_sum(interval_loss).item() / (step - (history[-1]["step"] if history else 0))
                elapsed = time.perf_counter() - interval_started
                history.append(_record(step, mean_loss, engine.lr(), interval_tokens * world / elapsed, device))
                if retention:
                    history[-1].update(retention.report())
                interval_loss.zero_()
                interval_tokens, interval_started = 0, time.perf_counter()
            if validate_now:
                history[-1].update(
                    validate(
                        engine.module,
                        validation_rows,
                        validation_collate,
                        task,
                        settings.micro_batch(world),
                        settings.precision,
                        device,
                        rank,
                        world,
                    )
                )
                if settings.keep_best and best_evaluation(history) is history[-1]:
                    best_state = engine.kept_state(rank)  # collective under ZeRO-3
                stop_early = settings.patience is not None and evaluations_since_best(history) >= settings.patience
                if loop_config.get("report_validation"):  # a sweep's trial: its scheduler (ASHA) reads this
                    ray.train.report({**history[-1], "total_steps": total_steps})
            if progress and history:
                progress.update(step, history[-1]["loss"])
            if checkpoint_now:
                _save_checkpoint(
                    engine,
                    rank,
                    {
                        "identity": identity,
                        "workers": world,
                        "step": step,
                        "history": history,
                        "resumed_at": resumed_at,
                        "seconds": seconds_before + time.perf_counter() - started,
                    },
                    best_state,
                )
            if step >= total_steps or stop_early:
                break
        if stop_early:
            if rank == 0:
                print(
                    f"train: stopping early at step {step}: no lower validation loss in {settings.patience} evaluations",
                    flush=True,
                )
            break
    seconds = seconds_before + time.perf_counter() - started
    remove_training_heads(engine.module)  # PPO's value head is not part of the tuned model

    resolved = config_to_dict(config)
    resolved["model"]["num_labels"] = num_labels
    log = {
        "steps": step,
        "seconds": round(seconds, 2),
        "seconds_per_step": round(seconds / max(step, 1), 4),
        "workers": world,
        "engine": f"deepspeed-zero{settings.deepspeed.stage}" if settings.deepspeed else "ddp",
        "trainable_parameters": trainable,
        "total_parameters": total,
        "final_loss": history[-1]["loss"] if history else None,
        "history": history,
        "resumed_at_steps": resumed_at,
        "peak_gb_when_built": built_peaks,
    }
    best = best_evaluation(history)
    if best:
        log["best_evaluation"] = {
            key: value for key, value in best.items() if key == "step" or key.startswith("validation_")
        }
    if stop_early:
        log["stopped_early_at_step"] = step
    chosen = best_state if settings.keep_best and best else None  # the same decision on every worker (the history is)
    log["weights_from_step"] = best["step"] if chosen is not None else step
    with tempfile.TemporaryDirectory() as out:
        if settings.partitions_weights:  # no worker holds the whole model: all write it
            save_partitioned(engine.module, config.method, Path(out), rank, chosen)
            write_run_files(engine.module, config, resolved, log, meta, prompts_dir, Path(out), rank)
        else:
            trained = engine.consolidated(lambda: build_model(config, num_labels, for_training=False), rank, chosen)
            if rank == 0:
                save_artifact(trained, config, resolved, log, meta, prompts_dir, Path(out))
        ray.train.report(
            {"final_loss": log["final_loss"], "steps": step},
            checkpoint=ray.train.Checkpoint.from_directory(out) if rank == 0 else None,
        )


def check_device_runs(config: RunConfig, device: torch.device) -> None:
    """What validation could not know: whether this worker's device runs the precision and quantization asked for."""
    if device.type == "cuda" and config.train.precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise KftuneError(
            f"train.precision: bf16 is not supported by {torch.cuda.get_device_name(device)}; use fp16 on this GPU"
        )
    if config.model.quantization:
        check_quantization_runs(config.model.quantization, device)


def worker_loader(
    rows, collate, settings: TrainSection, rank: int, world: int
) -> tuple[DataLoader, DistributedSampler]:
    """This worker's micro-batches: its share of one seeded permutation of all rows per epoch (disjoint
    from the other workers'), so 1 worker and 2 see the same global batches."""
    sampler = DistributedSampler(rows, num_replicas=world, rank=rank, shuffle=True, seed=settings.seed)
    loader = DataLoader(
        rows, batch_size=settings.micro_batch(world), sampler=sampler, collate_fn=collate, generator=torch.Generator()
    )  # not the global RNG: a resumed run's dropout must draw what the uninterrupted one drew
    return loader, sampler


def build_model(config: RunConfig, num_labels: int | None, for_training: bool):
    """The seeded base model with the method applied; the same in every worker and in every rebuild.
    Its frozen weights are in `weights_dtype`; under DDP what the optimizer steps is fp32."""
    train = config.train
    dtype = weights_dtype(train.precision, config.method.name, bool(train.deepspeed))
    base = load_run_base_model(config, num_labels, dtype, config.model.quantization)
    if for_training:
        checkpoint_activations(base, train)
    if for_training and config.prompt.packing:
        base.config.use_cache = False  # transformers finds packed examples' boundaries only when no KV cache is passed
    torch.manual_seed(
        train.seed
    )  # the method's new weights start the same however the base was built (whole or partitioned)
    model = apply_method(base, config.method, config.model.task)
    if for_training and not train.deepspeed:  # DeepSpeed keeps its own fp32 master copies
        keep_fp32_master_weights(may_train(model, config.method))
    elif for_training:  # the method's new weights too: DeepSpeed casts a model only when not built partitioned
        cast_floating_parameters(model, dtype)
    return model


def keep_fp32_master_weights(parameters) -> None:
    """The parameters AdamW steps in fp32 (in place: the same Parameter objects): 16-bit weights
    would lose small updates to rounding. Autocast runs their matmuls in 16 bits all the same."""
    for parameter in parameters:
        if parameter.is_floating_point() and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()


def checkpoint_activations(model, train: TrainSection) -> None:
    """Recompute activations in the backward pass, in every `gradient_checkpointing_every`-th decoder layer, when the run asks."""
    if train.gradient_checkpointing:
        model.activation_checkpointing_enable(
            {"use_reentrant": False}, every_n_layers=train.gradient_checkpointing_every
        )


def load_best_state(directory: Path, rank: int) -> dict[str, torch.Tensor] | None:
    """`train.keep_best`'s weights saved with a checkpoint, as this worker kept them (`kept_state`: its
    partitions under ZeRO-3, `{}` where it keeps none); None on every worker when no evaluation was best yet."""
    if not any(directory.glob(BEST_STATE_FILE.format("*"))):
        return None
    path = directory / BEST_STATE_FILE.format(rank)
    return torch.load(path, weights_only=True) if path.is_file() else {}


def _record(step: int, loss: float, lr: float, tokens_per_second: float, device: torch.device) -> dict[str, float]:
    record = {"step": step, "loss": round(loss, 5), "lr": lr, "tokens_per_second": round(tokens_per_second, 1)}
    if device.type == "cuda":
        record["gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return record


def _save_checkpoint(engine, rank: int, state: dict[str, Any], best_state: dict[str, torch.Tensor] | None) -> None:
    import ray.train

    with tempfile.TemporaryDirectory() as directory:
        engine.save(Path(directory), rank)
        save_trainer_state(Path(directory), rank, state)
        if best_state:
            torch.save(best_state, Path(directory) / BEST_STATE_FILE.format(rank))
        ray.train.report({"step": state["step"]}, checkpoint=ray.train.Checkpoint.from_directory(directory))


def save_artifact(model, config: RunConfig, resolved: dict, log: dict, meta: dict, prompts_dir: str, out: Path) -> None:
    """The method's artifact (see kftune.methods.artifacts) and the run's files (`write_run_files`).
    Saving may fold a method into `model` (merged LoRA): it is the tuned model, not a training state, after."""
    save_tuned_model(model, config.method, out)
    cast_floating_parameters(
        model, weights_dtype(config.train.precision, config.method.name, bool(config.train.deepspeed))
    )  # as load_tuned_model reads it back
    write_run_files(model, config, resolved, log, meta, prompts_dir, out, rank=0)


def write_run_files(
    model, config: RunConfig, resolved: dict, log: dict, meta: dict, prompts_dir: str, out: Path, rank: int
) -> None:
    """Tokenizer, resolved config, train log and the probe predictions of the tuned `model`, on rank 0.
    The probe's forward is collective when `model` is ZeRO-3 partitioned."""
    probe_rows = as_sequences(read_prompts(prompts_dir, "test")[:PROBE_ROWS], config.model.task)
    outputs = probe_outputs(model, probe_rows, meta["pad_token_id"], config.model.task)
    if rank != 0:
        return
    load_tokenizer(resolve_model_path(config.model.name_or_path)).save_pretrained(str(out))
    (out / TUNED_CONFIG_FILE).write_text(json.dumps(resolved, indent=2))
    (out / TRAIN_LOG_FILE).write_text(json.dumps(log, indent=2))
    (out / LABELS_FILE).write_text(json.dumps(meta["label_names"]))
    (out / PROBE_FILE).write_text(json.dumps({"sources": [r["source"] for r in probe_rows], "outputs": outputs}))


@torch.no_grad()
def probe_outputs(model, rows: list[dict], pad_token_id: int, task: str) -> list[list[float]]:
    """Logits (classification) or per-row loss sums (language models) on a few test rows: the reference
    a reloaded artifact must reproduce."""
    was_training = model.training
    model.eval()
    batch = Collator(pad_token_id, task)(rows)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    if task == "sequence_classification":
        batch.pop("labels")
        outputs = model(**batch).logits.float().tolist()
    else:
        outputs = [[v] for v in token_losses(model, batch, task).sum(dim=1).tolist()]
    model.train(was_training)
    return outputs
