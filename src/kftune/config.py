"""One run config: the pydantic schema, YAML loading, `--set` overrides, and errors that name the field.

The config is plain data. Every pipeline step receives the whole validated config and reads its
own section, so a run is reproducible from this one document.
"""

from __future__ import annotations

import codecs
import copy
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from kftune.alignment.config import (
    ALIGNMENT_METRICS,
    ONLINE_METRICS,
    OnlineSection,
    PreferenceSection,
    Stage,
    alignment_problem,
)
from kftune.errors import KftuneError
from kftune.kube.settings import ClusterSection
from kftune.methods import METHODS, MethodConfig, method_supports_task
from kftune.models import PACKAGED_MODELS
from kftune.prompts.templates import PACKAGED as PACKAGED_TEMPLATES, Template, resolve_template, template_contents
from kftune.retention.config import RetentionSection, retention_problem
from kftune.section import Section
from kftune.sweep.config import SweepSettings
from kftune.train.support import engine_problem

Task = Literal["sequence_classification", "causal_lm", "masked_lm"]


VARLEN_ATTENTION = ("flex_attention", "flash_attention_2", "flash_attention_3")
"""Attention kernels that take packed examples as variable-length sequences; all train on GPUs only."""


class ModelSection(Section):
    name_or_path: str = "minilm-l6"
    """A packaged model alias (see `kftune.models.PACKAGED_MODELS`), a local directory in HF format, or a GGUF file."""
    task: Task = "sequence_classification"
    num_labels: int | None = Field(default=None, ge=2)
    """For classification; inferred from the training labels when left empty."""
    attn_implementation: Literal["sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3"] | None = (
        None
    )
    """transformers' attention kernel; empty: its default (SDPA). With `prompt.packing`, flash and flex
    attention take packed examples as variable-length sequences (no mask is built); the others get a
    block-diagonal mask. flash_attention_* needs the flash-attn package and a GPU."""
    quantization: Literal["4bit", "8bit"] | None = None
    """QLoRA (Dettmers et al. 2023): the frozen base weights held in 4-bit NF4 (double-quantized) or
    8-bit through bitsandbytes, LoRA adapters trained on top in the training precision. Needs the
    bitsandbytes package and a device its kernels run on (checked when a worker starts)."""


class SplitSection(Section):
    validation: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Fraction of the training file held out for validation."""
    test: float | str = 0.1
    """Fraction of the training file held out for the final evaluation, or a path to a separate file."""


class DataSection(Section):
    path: str
    format: Literal["auto", "jsonl", "json", "csv", "tsv", "parquet"] = "auto"
    encoding: str = "utf-8"
    """Text encoding of the data files (csv, tsv, json, jsonl), any Python codec name: utf-8 (a byte-order
    mark is skipped), gbk, gb18030, big5, shift_jis, utf-16, latin-1, ..."""
    columns: dict[str, str] = Field(default_factory=dict)
    """Template field (and `label`) -> column of the data file. Unmapped fields use their own name."""
    split: SplitSection = Field(default_factory=SplitSection)
    max_rows: int | None = Field(default=None, ge=1)
    """Keep only the first N rows of the training file (quick runs)."""
    max_chars: int = Field(default=4000, ge=1)
    """Rows whose text is longer are dropped and reported: they would be cut by truncation anyway."""
    dedupe: bool = True

    @field_validator("encoding")
    @classmethod
    def _known_codec(cls, value: str) -> str:
        try:
            codecs.lookup(value)
        except LookupError:
            raise ValueError(
                f"unknown text encoding {value!r} (e.g. utf-8, utf-8-sig, gbk, gb18030, utf-16, latin-1)"
            ) from None
        return value


class PromptSection(Section):
    template: str | dict[str, Any] = "plain"
    """A packaged template name (src/kftune/prompts/templates/), or a user's template: the path of its YAML
    file, which the config loader reads into the config (a compiled pipeline's pods render with its contents,
    not with a file only the submitting machine has), or those contents inline."""
    max_length: int = Field(default=128, ge=8)
    few_shot: int = Field(default=0, ge=0)
    """In-context demonstrations before each prompt, drawn (seeded, stratified by label) from the train split only."""
    packing: bool = False
    """Pack short training rows into max_length rows; examples never attend to each other."""


class DeepSpeedSection(Section):
    """Train under a DeepSpeed engine instead of plain DDP (`kftune.train.engines`)."""

    stage: Literal[0, 1, 2, 3] = 2
    """ZeRO stage: 0 replicates everything, 1 partitions optimizer state, 2 also gradients, 3 also parameters."""
    offload_optimizer: bool = False
    """Keep optimizer state (and its step) in CPU memory; stage >= 1."""
    offload_params: bool = False
    """Keep parameters in CPU memory between uses; stage 3."""
    config_file: str | None = None
    """A DeepSpeed JSON whose keys override the generated config (batch sizes and precision stay ours)."""


class CheckpointSection(Section):
    storage: str | None = None
    """Where Ray Train keeps checkpoints: a local or PVC directory (a relative one is taken from the
    train step's working directory, which for `kftune run` is where it was started), or an `s3://`
    URI. A restarted run with the same config, data and storage resumes from its latest checkpoint.
    Empty: a temporary directory, so nothing survives the step."""
    every_steps: int = Field(default=0, ge=0)
    """Save the full training state every this many optimizer steps; 0: only the final model."""
    keep: int = Field(default=2, ge=1)
    """How many of the newest checkpoints to keep."""
    max_failures: int = Field(default=0, ge=-1)
    """Worker-group restarts Ray Train may make (preemption, a lost node) before the step fails; -1: no limit."""


class TrainSection(Section):
    epochs: int = Field(default=1, ge=1)
    max_steps: int | None = Field(default=None, ge=1)
    """Stop after this many optimizer steps (overrides epochs when smaller)."""
    batch_size: int = Field(default=32, ge=1)
    """Global batch per optimizer step: workers x micro-batch x gradient_accumulation."""
    gradient_accumulation: int = Field(default=1, ge=1)
    """Micro-batches each worker adds up before an optimizer step."""
    lr: float = Field(default=1e-3, gt=0)
    schedule: Literal["constant", "linear", "cosine", "cyclical"] = "linear"
    warmup: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Fraction of the steps spent warming the learning rate up from zero."""
    cycle_steps: int | None = Field(default=None, ge=2)
    """Cyclical schedule (Smith 2017, cyclical learning rates): steps per triangle from lr * cycle_floor up to lr and back;
    empty: a quarter of the run."""
    cycle_floor: float = Field(default=0.1, ge=0.0, lt=1.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    layer_lr_decay: float | None = Field(default=None, gt=0, le=1)
    """Discriminative fine-tuning: each block below the top one gets lr times this factor once more
    (full and freezing methods)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    gradient_checkpointing_every: int = Field(default=1, ge=1)
    """Selective checkpointing: recompute only every k-th decoder layer, the others keep their
    activations; memory the GPU would leave unused buys back speed. 1: every layer."""
    compile: bool = False
    """Run the model under torch.compile (in place; under DeepSpeed through its engine's compile)."""
    deepspeed: DeepSpeedSection | None = None
    """Empty: DDP (gloo on CPU, NCCL on GPUs)."""
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    log_every_steps: int = Field(default=10, ge=1)
    """Rank 0 records loss, learning rate, tokens/s and GPU memory this often; registered with the
    model as MLflow step metrics."""
    eval_every_steps: int = Field(default=0, ge=0)
    """Every this many optimizer steps (and at the end), the loss on the validation split
    (`data.split.validation`), and the accuracy for a classification head; recorded with the loss
    history (MLflow metrics `train_validation_*`). 0: no validation during training."""
    keep_best: bool = False
    """The artifact holds the weights of the evaluation with the lowest validation loss, not the last step's."""
    patience: int | None = Field(default=None, ge=1)
    """Stop early after this many evaluations in a row without a lower validation loss."""
    seed: int = 0
    workers: int = Field(default=2, ge=1)
    cpus_per_worker: int = Field(default=1, ge=1)
    use_gpu: bool = False

    def micro_batch(self, workers: int | None = None) -> int:
        """Rows one worker puts through the model per forward pass."""
        return self.batch_size // ((workers or self.workers) * self.gradient_accumulation)

    @property
    def partitions_weights(self) -> bool:
        """ZeRO-3: no worker holds a whole weight (what loads, copies, saves or penalises the model must know)."""
        return self.deepspeed is not None and self.deepspeed.stage == 3


class EvalSection(Section):
    metrics: list[
        Literal[
            "accuracy",
            "macro_f1",
            "perplexity",
            "exact_match",
            "rouge_l",
            "bleu",
            "preference_accuracy",
            "reward_margin",
            "mean_reward",
            "win_rate",
            "kl",
        ]
    ] = Field(default_factory=lambda: ["accuracy", "macro_f1"])
    """What the test split is scored by. Classification (a head, or a causal or masked LM through a
    verbalizer): accuracy, macro_f1, from one pass. Causal LM: perplexity on the target tokens and, on
    greedy generations, exact_match, rouge_l, bleu: each costs a pass, made only when listed. Alignment
    stages (see `kftune.alignment.evaluate`): preference_accuracy, reward_margin; grpo and ppo: mean_reward,
    win_rate, kl (also dpo, kto, orpo and simpo when eval.reward_model judges them)."""
    reward_model: str | None = None
    """dpo, kto, orpo, simpo: a registered kftune reward model (`models:/NAME@ALIAS`) that judges greedy
    generations of the held-out prompts, tuned against base (mean_reward, win_rate, kl)."""
    compare_base: bool = True
    batch_size: int = Field(default=64, ge=1)
    forgetting: bool = True
    """Also measure how much tuning moved the model on general text (catastrophic forgetting)."""
    general_text: str | None = None
    """One passage per line; empty: the held-out (odd) lines of the packaged Botchan excerpt (retention
    trains on the even ones, see `kftune.retention.general`)."""
    generate_rows: int = Field(default=64, ge=1)
    """Causal LM: test rows decoded greedily for exact_match / rouge_l / bleu."""
    max_new_tokens: int = Field(default=64, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the evaluate step scores: auto takes the step's GPU when it has one; cuda without one is an error."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """The dtype the scored models run in: auto is fp32 on the CPU and bf16 on GPUs (fp16 on those without bf16)."""


class GateSection(Section):
    metric: str = "accuracy"
    """Evaluation metric compared against the current champion (higher is better, perplexity lower)."""
    margin: float = 0.0
    max_forgetting: float | None = Field(default=None, ge=0)
    """Refuse to promote a version that forgot more than this (the evaluation's `forgetting.score`: the
    rise of the per-token loss of the base's own answers to held-out general prompts for causal LMs, 1 -
    the rank correlation of sentence similarities for encoders). Empty: forgetting does not gate."""


class RegistrySection(Section):
    tracking_uri: str | None = None
    """MLflow tracking URI. Empty: a sqlite store in the run's output directory."""
    artifact_location: str | None = None
    """Where a newly created experiment keeps artifacts. Empty: MLflow's default, or the output directory locally."""
    experiment: str = "kftune"
    model_name: str = Field(min_length=1)
    gate: GateSection = Field(default_factory=GateSection)
    retries: int = Field(default=5, ge=0)
    """HTTP retries against a tracking server, with exponential backoff, before the step fails."""
    backoff_seconds: int = Field(default=1, ge=0)
    """Base of the exponential backoff between retries (MLflow waits backoff * 2**attempt seconds)."""
    allow_duplicate: bool = False
    """Register a new version even when one was trained on the same data (its content hash) with the same
    config: by default a retraining whose data did not change hands back that version instead."""


class _FieldError(ValueError):
    """Cross-field problems, each reported under the dotted path of the field to change."""

    def __init__(self, problems: list[tuple[str, str]]):
        super().__init__("; ".join(f"{path}: {message}" for path, message in problems))
        self.problems = problems


CLASSIFICATION_METRICS = {"accuracy", "macro_f1"}
LM_METRICS = {"perplexity", "exact_match", "rouge_l", "bleu"}


class RunConfig(Section):
    stage: Stage = "sft"
    """The training objective: supervised fine-tuning, a reward model, or preference alignment (see
    `kftune.alignment`)."""
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection
    prompt: PromptSection = Field(default_factory=PromptSection)
    method: MethodConfig
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    registry: RegistrySection
    preference: PreferenceSection = Field(default_factory=PreferenceSection)
    online: OnlineSection = Field(default_factory=OnlineSection)
    retention: RetentionSection = Field(default_factory=RetentionSection)
    """Remedies against catastrophic forgetting (`kftune.retention`); off unless asked for."""
    sweep: SweepSettings | None = None
    """The train step runs this hyperparameter search and hands on the best trial's model (`kftune.sweep`)."""
    cluster: ClusterSection = Field(default_factory=ClusterSection)
    """Where and how the compiled pipeline runs on Kubernetes; `kftune run` ignores it."""

    @model_validator(mode="after")
    def _combinations(self) -> RunConfig:
        problems = list(self._combination_problems())
        if problems:
            raise _FieldError(problems)
        return self

    def _combination_problems(self) -> Iterator[tuple[str, str]]:
        """Every cross-field problem, as (field to change, why), so that one run of validation names them all."""
        task = self.model.task
        try:
            template = self._template_unread_or_checked()
        except _FieldError as exc:
            yield from exc.problems
            template = None
        problem = alignment_problem(self, template)
        if problem:
            yield problem
        if self.prompt.few_shot and (task != "causal_lm" or (template and template.conversation)):
            yield (
                "prompt.few_shot",
                "in-context demonstrations need a causal LM and a template that renders one row at a time",
            )
        if self.prompt.packing and (task != "causal_lm" or not METHODS[self.method.name].packs):
            yield (
                "prompt.packing",
                f"packs causal-LM rows for methods that add no virtual tokens (not {task} with {self.method.name})",
            )
        if not method_supports_task(self.method, task):
            yield ("method.name", f"method {self.method.name!r} does not support task {task}")
        method = METHODS[self.method.name]
        if self.train.layer_lr_decay is not None and not method.layer_lr_decay:
            yield (
                "train.layer_lr_decay",
                f"applies to methods that train whole layers ({', '.join(n for n, m in METHODS.items() if m.layer_lr_decay)}), not {method.name}",
            )
        problem = method.check_config(self) if method.check_config else None
        if problem:
            yield problem
        allowed = (
            ALIGNMENT_METRICS | ONLINE_METRICS
            if self.stage != "sft"
            else CLASSIFICATION_METRICS
            if task != "causal_lm"
            else LM_METRICS | (CLASSIFICATION_METRICS if template is None or template.labelled else set())
        )
        wrong = [m for m in self.eval.metrics if m not in allowed]
        if wrong:
            yield ("eval.metrics", f"{', '.join(wrong)} not available for {task}; use {', '.join(sorted(allowed))}")
        if self.model.attn_implementation in VARLEN_ATTENTION and not self.train.use_gpu:
            yield (
                "model.attn_implementation",
                f"{self.model.attn_implementation} trains only on GPUs (torch has no CPU backward "
                "for it); set train.use_gpu: true or use sdpa",
            )
        if self.train.gradient_checkpointing_every > 1 and not self.train.gradient_checkpointing:
            yield (
                "train.gradient_checkpointing_every",
                "selects the layers to recompute; set train.gradient_checkpointing: true too",
            )
        if self.train.batch_size % (self.train.workers * self.train.gradient_accumulation):
            yield (
                "train.batch_size",
                f"{self.train.batch_size} does not split evenly over train.workers={self.train.workers}"
                f" x train.gradient_accumulation={self.train.gradient_accumulation}",
            )
        if (self.train.keep_best or self.train.patience) and not self.train.eval_every_steps:
            field = "train.keep_best" if self.train.keep_best else "train.patience"
            yield (field, "needs validation during training: set train.eval_every_steps")
        if self.train.eval_every_steps and not self.data.split.validation:
            yield (
                "train.eval_every_steps",
                "needs validation rows: set data.split.validation (a fraction of the training file)",
            )
        if self.model.quantization:
            problem = _quantization_problem(self)
            if problem:
                yield problem
        yield from (problem for problem in (engine_problem(self), retention_problem(self)) if problem)
        rayjob = self.cluster.rayjob
        if rayjob.enabled and self.cluster.volume is None:
            yield (
                "cluster.volume",
                "required with cluster.rayjob.enabled: the RayJob's pods read prompts and write the model there",
            )
        trials = self.sweep.parallel if self.sweep else 1
        if rayjob.enabled and rayjob.ray_workers() % trials:
            yield (
                "sweep.parallel",
                f"{trials} trials at once cannot share the RayJob's {rayjob.ray_workers()} Ray workers (one per GPU) evenly",
            )
        workers = rayjob.ray_workers(trials)
        if rayjob.enabled and self.train.batch_size % (workers * self.train.gradient_accumulation):
            yield (
                "cluster.rayjob.nodes",
                f"{rayjob.nodes} nodes give {workers} Ray workers (one per GPU{', per trial' if trials > 1 else ''}), "
                f"which do not split train.batch_size={self.train.batch_size} evenly",
            )
        if self.registry.gate.metric not in self.eval.metrics:
            yield ("registry.gate.metric", f"{self.registry.gate.metric!r} is not in eval.metrics {self.eval.metrics}")
        if self.registry.gate.max_forgetting is not None and not self.eval.forgetting:
            yield ("registry.gate.max_forgetting", "needs the forgetting measured: set eval.forgetting: true")

    def _template_unread_or_checked(self) -> Template | None:
        """The template, checked against the task; None for a file path, which validation does not read
        (`load_config` and preflight read it into the config, and the checks run then)."""
        value = self.prompt.template
        if isinstance(value, str) and value not in PACKAGED_TEMPLATES:
            if Path(value).suffix not in (".yaml", ".yml"):
                choices = f"choose from: {', '.join(PACKAGED_TEMPLATES)}, or give a .yaml file"
                raise _FieldError([("prompt.template", f"unknown template {value!r}; {choices}")])
            return None
        try:
            template = resolve_template(value)
        except KftuneError as exc:
            raise _FieldError([("prompt.template", str(exc).removeprefix("prompt.template: "))]) from None
        if self.model.task not in template.tasks:
            tasks = ", ".join(template.tasks)
            raise _FieldError(
                [("prompt.template", f"template {template.name!r} is for {tasks}, not {self.model.task}")]
            )
        return template

    def columns_for(self, field: str) -> str:
        """The data column that feeds a template field (or `label`)."""
        return self.data.columns.get(field, field)

    def required_fields(self) -> list[str]:
        fields = resolve_template(self.prompt.template).fields
        return fields + (["label"] if self.has_labels else [])

    @property
    def has_labels(self) -> bool:
        """Classification data: a task head, or a causal LM scoring a verbalizer's words."""
        if self.stage != "sft":  # a reward model's head is a score, KTO's label a judgement
            return False
        return self.model.task == "sequence_classification" or resolve_template(self.prompt.template).labelled

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON: two runs with the same config share it (a lineage tag)."""
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()


def _quantization_problem(config: RunConfig) -> tuple[str, str] | None:
    """A quantized base is frozen and read by bitsandbytes kernels: LoRA on top, saved as an adapter, under DDP."""
    if config.method.name != "lora":
        return (
            "model.quantization",
            f"a quantized base trains LoRA adapters on top (method.name: lora), not {config.method.name}",
        )
    if config.method.merge:
        return (
            "method.merge",
            "cannot fold LoRA into a quantized base; with model.quantization the artifact is the adapter",
        )
    if config.train.deepspeed:
        return "train.deepspeed", "a quantized base trains under DDP; remove train.deepspeed or model.quantization"
    if config.model.name_or_path.endswith(".gguf"):
        return "model.quantization", "a GGUF file is de-quantized on load; quantize a Hugging Face folder instead"
    return None


def parse_config(data: dict[str, Any], source: str = "config", lines: dict[str, int] | None = None) -> RunConfig:
    """Validate a config dict; every problem is reported as `source:line field.path: message`."""
    try:
        config = RunConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            ctx_error = (err.get("ctx") or {}).get("error")
            if isinstance(ctx_error, _FieldError):
                problems += [f"{_where(source, lines, path)} {path}: {message}" for path, message in ctx_error.problems]
                continue
            else:
                loc = list(err["loc"])
                if loc[:1] == ["method"] and len(loc) > 1 and loc[1] in METHODS:
                    del loc[1]  # pydantic puts the union tag in the path; users wrote method.r, not method.lora.r
                path, message = ".".join(str(p) for p in loc), err["msg"]
                if err["type"] == "extra_forbidden":
                    message = "unknown key"
                elif err["type"] in ("union_tag_invalid", "union_tag_not_found"):
                    path += ".name"
                    message = f"unknown method {err['input'].get('name')!r}; choose from: {err['ctx']['expected_tags']}"
            problems.append(f"{_where(source, lines, path)} {path}: {message}")
        raise KftuneError("invalid config:\n  " + "\n  ".join(problems)) from None
    if config.sweep:  # the search space against this config: every trial's config must be valid too
        from kftune.sweep.space import pipeline_problems, sweep_problems, trial_base

        problems = pipeline_problems(config.sweep) + sweep_problems(trial_base(config), config.sweep)
        if problems:
            where = _where(source, lines, "sweep")
            raise KftuneError("invalid config:\n  " + "\n  ".join(f"{where} sweep: {p}" for p in problems))
    return config


def _where(source: str, lines: dict[str, int] | None, path: str) -> str:
    parts = path.split(".")
    while parts and lines is not None:
        line = lines.get(".".join(parts))
        if line:
            return f"{source}:{line}"
        parts.pop()
    return source + ":"


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config and apply `key.path=value` overrides (values parsed as YAML)."""
    path = Path(path)
    if not path.is_file():
        raise KftuneError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise KftuneError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise KftuneError(f"{path}: the top level must be a mapping of sections (model, data, ...)")
    data = apply_overrides(data, overrides)
    prompt = data.get("prompt")
    if isinstance(prompt, dict) and Path(str(prompt.get("template", ""))).suffix in (".yaml", ".yml"):
        prompt["template"] = template_contents(_resolve_path(prompt["template"], path.parent))
    config = parse_config(data, str(path), _key_lines(text))
    return _resolve_relative_paths(config, path.parent)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    values = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise KftuneError(f"--set {item!r}: expected key.path=value, e.g. train.lr=5e-4")
        values[key] = yaml.safe_load(raw) if raw else ""
    return with_values(data, values)


def with_values(data: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of a config dict with dotted fields set to values (sections created as needed)."""
    data = copy.deepcopy(data)
    for field, value in values.items():
        node = data
        *parents, leaf = field.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise KftuneError(f"{field}: {part} is not a section")
            node = child
        node[leaf] = value
    return data


def _key_lines(text: str) -> dict[str, int]:
    """Dotted key path -> 1-based line in the YAML text, so errors can point at the line."""
    lines: dict[str, int] = {}

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                path = f"{prefix}{key_node.value}"
                lines[path] = key_node.start_mark.line + 1
                walk(value_node, path + ".")

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, "")
    return lines


def _resolve_relative_paths(config: RunConfig, base: Path) -> RunConfig:
    """Make local data and model paths absolute (pipeline steps run elsewhere); relative ones may be
    relative to the file. Packaged model aliases and remote URIs stay as they are."""
    data = config.data.model_copy(update={"path": _resolve_path(config.data.path, base)})
    if isinstance(data.split.test, str):
        data = data.model_copy(
            update={"split": data.split.model_copy(update={"test": _resolve_path(data.split.test, base)})}
        )
    model = config.model
    if model.name_or_path not in PACKAGED_MODELS:
        model = model.model_copy(update={"name_or_path": _resolve_path(model.name_or_path, base)})
    online = config.online
    if online.reward_function:  # path/to/file.py:function
        file, _, function = online.reward_function.rpartition(":")
        online = online.model_copy(update={"reward_function": f"{_resolve_path(file, base)}:{function}"})
    retention = config.retention.with_paths(lambda value: _resolve_path(value, base))
    return config.model_copy(update={"data": data, "model": model, "online": online, "retention": retention})


def _resolve_path(value: str, base: Path) -> str:
    """A local path made absolute, relative to the working directory or else to `base`; URIs stay."""
    if "://" in value or Path(value).is_absolute():
        return value
    for candidate in (Path(value), base / value):
        if candidate.exists():
            return str(candidate.resolve())
    return value


def config_to_dict(config: RunConfig) -> dict[str, Any]:
    """Plain JSON data without empty (None) fields: KFP pipeline parameters cannot hold nulls."""
    return json.loads(config.model_dump_json(exclude_none=True))
