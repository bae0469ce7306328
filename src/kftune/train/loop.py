"""One training worker, top to bottom: model, method, data, optimizer, steps, save.

Ray Train runs `train_worker` once per worker; `ray.train.torch.prepare_model` wraps the model in
DDP (gloo on CPU, NCCL on GPU). Rank 0 prints progress and writes the Model artifact; it reports
once, at the end, because every `ray.train.report` is a synchronisation point that costs seconds.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler

from kftune.config import RunConfig, config_to_dict
from kftune.methods import apply_method, on_step, optimizer_parameter_groups, save_tuned_model, trainable_parameters
from kftune.models import LABELS_FILE, TUNED_CONFIG_FILE, load_base_model, load_tokenizer, resolve_model_path
from kftune.prompts.build import IGNORE_INDEX, read_meta, read_prompts
from kftune.prompts.packing import batch_tokens, make_collator
from kftune.train import TRAIN_LOG_FILE
from kftune.train.progress import ProgressLine

PROBE_FILE = "probe.json"
PROBE_ROWS = 16
LOSS_POINTS = 200  # the loss curve kept in train_log.json is averaged down to about this many points


class Collator:
    """Pads a batch to its longest row (not to max_length): short SST-2 rows train ~2x faster."""

    def __init__(self, pad_token_id: int, task: str):
        self.pad, self.task = pad_token_id, task

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), longest), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row["input_ids"])] = torch.tensor(row["input_ids"])
            mask[i, : len(row["input_ids"])] = 1
        if self.task == "sequence_classification":
            labels = torch.tensor([r["labels"] for r in rows])
        else:
            labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
            for i, row in enumerate(rows):
                labels[i, : len(row["labels"])] = torch.tensor(row["labels"])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def next_token_losses(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-position loss of predicting each labelled token from the ones before it (0 where the label
    is -100): the one causal-LM loss that evaluation and the reload probe share."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logits = logits[:, -batch["labels"].shape[1] :]  # prompt-learning methods prepend virtual tokens
    return torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], ignore_index=IGNORE_INDEX, reduction="none")


def train_worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    from transformers import get_scheduler

    config = RunConfig.model_validate(loop_config["config"])
    prompts_dir = loop_config["prompts_dir"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(config.train.cpus_per_worker)
    device = ray.train.torch.get_device()
    task = config.model.task

    # Model and method: the same seeded base in every worker, then exactly the method's parameters trainable.
    meta = read_meta(prompts_dir)
    num_labels = len(meta["label_names"]) or None
    model_path = resolve_model_path(config.model.name_or_path)
    model = apply_method(load_base_model(model_path, task, num_labels, config.train.seed), config.method, task)
    trainable, total = trainable_parameters(model)
    model = ray.train.torch.prepare_model(model)

    # Data: each worker reads its shard; the global batch is split evenly.
    rows = read_prompts(prompts_dir, "train")
    sampler = DistributedSampler(rows, num_replicas=world, rank=rank, shuffle=True, seed=config.train.seed)
    loader = DataLoader(rows, batch_size=config.train.batch_size // world, sampler=sampler, collate_fn=make_collator(meta, task, unwrap(model)))
    total_steps = config.train.epochs * len(loader)
    if config.train.max_steps:
        total_steps = min(total_steps, config.train.max_steps)

    # Over every parameter the method may ever train (gradual unfreezing turns more on later; AdamW
    # skips those without a gradient), in layer-wise learning-rate groups when asked for.
    groups = optimizer_parameter_groups(unwrap(model), config.method, config.train.lr, config.train.layer_lr_decay)
    parameters = [p for group in groups for p in group["params"]]
    optimizer = torch.optim.AdamW(groups, lr=config.train.lr, weight_decay=config.train.weight_decay)
    scheduler = get_scheduler(config.train.schedule, optimizer, int(config.train.warmup * total_steps), total_steps)
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.train.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=config.train.precision == "fp16")

    progress = ProgressLine(total_steps) if rank == 0 else None
    losses: list[float] = []
    tokens = 0
    step = 0
    started = time.perf_counter()
    model.train()
    for epoch in range(config.train.epochs):
        sampler.set_epoch(epoch)
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                loss = model(**batch).loss
            scaler.scale(loss).backward()
            if config.train.max_grad_norm:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(parameters, config.train.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            step += 1
            unfrozen = on_step(unwrap(model), config.method, step)
            if unfrozen and rank == 0:
                print(f"train: step {step}: unfroze {', '.join(unfrozen)}", flush=True)
            tokens += batch_tokens(batch)
            losses.append(loss.item())
            if progress:
                progress.update(step, sum(losses[-20:]) / len(losses[-20:]))
            if step >= total_steps:
                break
        if step >= total_steps:
            break
    seconds = time.perf_counter() - started

    resolved = config_to_dict(config)
    resolved["model"]["num_labels"] = num_labels
    log = {
        "steps": step,
        "seconds": round(seconds, 2),
        "seconds_per_step": round(seconds / max(step, 1), 4),
        "tokens_per_second_per_worker": round(tokens / seconds, 1),
        "workers": world,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "final_loss": sum(losses[-20:]) / len(losses[-20:]),
        "loss_curve": _downsample(losses),
    }
    with tempfile.TemporaryDirectory() as out:
        checkpoint = None
        if rank == 0:
            _save_artifact(model, config, model_path, resolved, log, prompts_dir, Path(out))
            checkpoint = ray.train.Checkpoint.from_directory(out)
        ray.train.report({"final_loss": log["final_loss"], "steps": step}, checkpoint=checkpoint)


def _save_artifact(model, config: RunConfig, model_path: Path, resolved: dict, log: dict, prompts_dir: str, out: Path) -> None:
    """The method's artifact (see kftune.methods.artifacts), tokenizer, resolved config, train log, probe predictions."""
    unwrapped = unwrap(model)
    save_tuned_model(unwrapped, config.method, out)
    load_tokenizer(model_path).save_pretrained(str(out))
    (out / TUNED_CONFIG_FILE).write_text(json.dumps(resolved, indent=2))
    (out / TRAIN_LOG_FILE).write_text(json.dumps(log, indent=2))
    (out / LABELS_FILE).write_text(json.dumps(read_meta(prompts_dir)["label_names"]))
    probe_rows = read_prompts(prompts_dir, "test")[:PROBE_ROWS]
    probe = {"sources": [r["source"] for r in probe_rows], "outputs": probe_outputs(unwrapped, probe_rows, read_meta(prompts_dir)["pad_token_id"], config.model.task)}
    (out / PROBE_FILE).write_text(json.dumps(probe))


@torch.no_grad()
def probe_outputs(model, rows: list[dict], pad_token_id: int, task: str) -> list[list[float]]:
    """Logits (classification) or per-token loss sums (causal LM) on a few test rows: the reference a
    reloaded artifact must reproduce."""
    was_training = model.training
    model.eval()
    batch = Collator(pad_token_id, task)(rows)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    if task == "sequence_classification":
        batch.pop("labels")
        outputs = model(**batch).logits.float().tolist()
    else:
        outputs = [[v] for v in next_token_losses(model, batch).sum(dim=1).tolist()]
    model.train(was_training)
    return outputs


def unwrap(model):
    """The model inside a DDP wrapper."""
    return model.module if hasattr(model, "module") else model


def _downsample(values: list[float]) -> list[float]:
    stride = max(1, len(values) // LOSS_POINTS)
    return [round(sum(values[i : i + stride]) / len(values[i : i + stride]), 5) for i in range(0, len(values), stride)]
