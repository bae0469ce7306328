"""The loss terms `retention` adds to each training micro-batch: the training loop's one entry point.

    extra = share * (anchor penalty + distill.weight * KL + replay.weight * general-data LM loss)

(an encoder classifier: distill.weight * the cosine distance of sentence embeddings instead of the KL).

`share` is 1 / (workers x gradient_accumulation): the engines sum what every micro-batch of every worker
hands them, so the terms count once per optimizer step. General rows are drawn per micro-batch from one
seeded permutation, by step, micro-batch and worker, so a resumed run draws what the uninterrupted one did.
What has to be computed from the base before training (the Fisher, generated replay rows) is computed by
rank 0, cached in the run's storage when it is a local folder, and sent to the other workers.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kftune.config import RunConfig
from kftune.errors import KftuneError
from kftune.prompts.collate import Collator
from kftune.prompts.packing import IGNORE_INDEX
from kftune.retention.anchor import Anchor, anchored_weights
from kftune.retention.distill import (
    Teacher,
    distillation_sum,
    frozen_copy,
    is_peft,
    language_model_loss,
    output_logits,
)
from kftune.retention.embedding import cosine_distance_sum, head_size, sentence_embeddings, sentence_rows
from kftune.train.collectives import from_rank_zero


class GeneralBatches:
    """`per_batch` general rows for each (step, micro-batch, worker), without repeats until all were drawn."""

    def __init__(
        self, rows: list[dict], per_batch: int, pad_token_id: int, task: str, seed: int, rank: int, world: int
    ):
        if not rows:
            raise KftuneError("retention.general_data: no usable general rows (every line empty after tokenizing?)")
        self.rows, self.per_batch, self.rank, self.world = rows, per_batch, rank, world
        self.order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
        self.collate = Collator(pad_token_id, task)

    def draw(self, micro_batch_index: int) -> dict[str, torch.Tensor]:
        start = (micro_batch_index * self.world + self.rank) * self.per_batch
        return self.collate([self.rows[self.order[(start + i) % len(self.rows)]] for i in range(self.per_batch)])


class RetentionTerms:
    def __init__(
        self,
        config: RunConfig,
        anchor: Anchor | None,
        teacher: Teacher | None,
        general: GeneralBatches | None,
        world: int,
    ):
        self.settings, self.task = config.retention, config.model.task
        self.accumulation = config.train.gradient_accumulation
        self.anchor, self.teacher, self.general = anchor, teacher, general
        self.share = 1.0 / (world * self.accumulation)
        self.sums: dict[str, float] = {}
        self.counted = 0
        self.micro_batches = 0

    def loss(self, model, batch: dict[str, torch.Tensor], step: int, items: torch.Tensor) -> torch.Tensor:
        """This micro-batch's share of the retention terms; `model` is the unwrapped module being trained and
        `items` the task loss's item count over the whole global batch."""
        micro_batch_index = step * self.accumulation + self.micro_batches % self.accumulation
        self.micro_batches += 1
        terms: dict[str, torch.Tensor] = {}
        values: dict[str, torch.Tensor] = {}  # what the history records where it is not this worker's term
        if self.anchor and self.anchor.in_graph:
            terms["anchor"], values["anchor"] = self.anchor.penalty()
        distill, replay = self.settings.distill, self.settings.replay
        if distill and "task" in distill.inputs:  # over the global batch's items, like the task loss
            if self.task == "sequence_classification":
                kept = cosine_distance_sum(sentence_embeddings(model, batch), self.teacher.embeddings(batch))
            else:
                kept = distillation_sum(
                    output_logits(model, batch, self.task),
                    self.teacher.logits(batch, self.task),
                    batch["labels"] != IGNORE_INDEX,
                    distill.temperature,
                )
            terms["distill_task"] = distill.weight * kept / (items * self.share)
        if self.general is not None:
            general = {k: v.to(batch["input_ids"].device) for k, v in self.general.draw(micro_batch_index).items()}
            if self.task == "sequence_classification":  # an encoder: distillation of embeddings only
                distance = cosine_distance_sum(sentence_embeddings(model, general), self.teacher.embeddings(general))
                terms["distill_general"] = distill.weight * distance / len(general["input_ids"])
            else:
                logits = output_logits(model, general, self.task)
                if distill and "general" in distill.inputs:
                    mask = general["attention_mask"]
                    kl = distillation_sum(logits, self.teacher.logits(general, self.task), mask, distill.temperature)
                    terms["distill_general"] = distill.weight * kl / mask.sum()
                if replay:
                    terms["replay"] = replay.weight * language_model_loss(logits, general["labels"], self.task)
        for name, value in (terms | values).items():
            self.sums[name] = self.sums.get(name, 0.0) + value.detach().float()
        self.counted += 1
        return self.share * sum(terms.values())

    def before_step(self, engine) -> None:
        """At an accumulation boundary, before the optimizer step: the anchor's gradient on ZeRO-3 partitions
        (its penalty counted with every micro-batch of the step, as the terms in the loss are)."""
        if self.anchor and self.anchor.partitions and engine.at_boundary():
            penalty = self.anchor.add_partition_gradients(engine.loss_scale())
            self.sums["anchor"] = self.sums.get("anchor", 0.0) + penalty * self.accumulation

    def report(self) -> dict[str, float]:
        """The mean of each term over the micro-batches since the last report (for the loss history)."""
        means = {
            f"retention_{name}": round(float(total) / max(self.counted, 1), 6) for name, total in self.sums.items()
        }
        self.sums, self.counted = {}, 0
        return means


def build_retention(
    config: RunConfig, model, options, storage: str | None, rank: int, world: int, device: torch.device
):
    """The run's retention terms over `model` (the method applied, on its device, before any step), or None."""
    from kftune.methods import may_train
    from kftune.methods.base import task_head_names
    from kftune.models import load_tokenizer, resolve_model_path
    from kftune.retention.general import language_model_rows, training_lines

    settings = config.retention
    if not settings.enabled:
        return None
    tokenizer = load_tokenizer(resolve_model_path(config.model.name_or_path))
    lines = training_lines(settings.general_data, settings.general_rows) if settings.uses_general_data else []
    if config.model.task == "sequence_classification":  # an encoder's remedies keep its sentence embeddings
        rows = sentence_rows(lines, tokenizer, config.prompt.max_length)
    else:
        rows = language_model_rows(lines, tokenizer, config.model.task, config.prompt.max_length, config.train.seed)
    anchor = None
    if settings.anchored:
        inner = model.get_base_model() if is_peft(model) else model
        new = task_head_names(inner) if config.model.task == "sequence_classification" else set()
        fisher = _fisher(config, rows, storage) if settings.ewc and rank == 0 else None  # the Anchor shares it
        anchor = Anchor(
            anchored_weights(model, may_train(model, options), new),
            settings.l2_sp.alpha if settings.l2_sp else 0.0,
            settings.ewc.strength if settings.ewc else 0.0,
            fisher,
            "retention.l2_sp" if settings.l2_sp else "retention.ewc",
        )
    teacher = None
    if settings.distill:
        teacher = Teacher(model) if is_peft(model) else Teacher(model, frozen_copy(config, device))
    general = None
    wants_general = settings.replay or (settings.distill and "general" in settings.distill.inputs)
    if wants_general:
        if settings.replay and settings.replay.generated:
            rows = from_rank_zero(_generated_rows(config, lines, tokenizer, storage, device) if rank == 0 else None)
        per_batch = (
            max(1, round(settings.replay.ratio * config.train.micro_batch(world)))
            if settings.replay
            else config.train.micro_batch(world)
        )
        general = GeneralBatches(
            rows, per_batch, tokenizer.pad_token_id, config.model.task, config.train.seed, rank, world
        )
    return RetentionTerms(config, anchor, teacher, general, world)


def _local_storage(storage: str | None) -> Path | None:
    return Path(storage) if storage and "://" not in storage else None


def _fisher(config: RunConfig, rows: list[dict], storage: str | None) -> dict[str, torch.Tensor]:
    """The Fisher from `retention.ewc.fisher_file`, from the storage's cache, or computed (and cached)."""
    from kftune.models import load_base_model, load_tokenizer, resolve_model_path
    from kftune.retention.fisher import (
        cache_path,
        check_fisher_file,
        diagonal_fisher,
        general_fingerprint,
        load_fisher,
        model_fingerprint,
        save_fisher,
    )

    ewc, model_path = config.retention.ewc, resolve_model_path(config.model.name_or_path)
    used = rows[: ewc.fisher_rows]
    base = model_fingerprint(model_path)
    general = general_fingerprint([str(r["input_ids"]) for r in used], config.model.task, config.prompt.max_length)
    if ewc.fisher_file:
        check_fisher_file(ewc.fisher_file, base, general)
        print(f"train: EWC Fisher from {ewc.fisher_file}", flush=True)
        return load_fisher(ewc.fisher_file)
    path = cache_path(_local_storage(storage), base, general) if _local_storage(storage) else None
    if path and path.is_file():
        check_fisher_file(path, base, general)
        print(f"train: EWC Fisher reused from {path}", flush=True)
        return load_fisher(path)
    device = torch.device("cuda" if config.train.use_gpu and torch.cuda.is_available() else "cpu")
    model = load_base_model(
        model_path, config.model.task, head_size(config.model.task), config.train.seed, config.model.attn_implementation
    ).to(device)
    fisher = {
        n: f.cpu()
        for n, f in diagonal_fisher(model, used, config.model.task, load_tokenizer(model_path).pad_token_id).items()
    }
    del model
    if path:
        save_fisher(path, fisher, base, general, len(used))
    print(
        f"train: EWC Fisher computed on {len(used)} general rows" + (f", cached at {path}" if path else ""), flush=True
    )
    return fisher


def _generated_rows(config: RunConfig, lines: list[str], tokenizer, storage: str | None, device) -> list[dict]:
    """Generative replay rows: the base's answers to the general prompts, cached next to the Fisher."""
    import hashlib
    import json

    from kftune.models import load_base_model, resolve_model_path
    from kftune.retention.fisher import CACHE_FOLDER, model_fingerprint
    from kftune.retention.generated import base_answers

    model_path = resolve_model_path(config.model.name_or_path)
    key = hashlib.sha256(
        json.dumps([model_fingerprint(model_path), config.prompt.max_length, lines]).encode()
    ).hexdigest()[:24]
    local = _local_storage(storage)
    path = local / CACHE_FOLDER / f"replay-{key}.json" if local else None
    if path and path.is_file():
        print(f"train: generated replay rows reused from {path}", flush=True)
        return json.loads(path.read_text())
    model = load_base_model(
        model_path, config.model.task, None, config.train.seed, config.model.attn_implementation
    ).to(device)
    rows = base_answers(model, tokenizer, lines, config.prompt.max_length)
    del model
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rows))
    print(
        f"train: generated {len(rows)} replay rows from the base model" + (f", cached at {path}" if path else ""),
        flush=True,
    )
    return rows
