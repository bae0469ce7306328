"""What `kftune run` and `kftune validate` check before any pipeline step starts, so that bad input
fails in seconds with a message naming the field: the model folder, the method applied to the model
built on the meta device (its architecture without its weights: nothing is read but config.json),
and the data (files, columns, splits, labels)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

from kftune.alignment.config import ONLINE_STAGES
from kftune.config import RunConfig, config_to_dict, parse_config
from kftune.errors import KftuneError

MODULE_NAMES_SHOWN = 16


def preflight(config: RunConfig) -> list[str]:
    """Raise KftuneError at the first problem; return the warnings a user should see before training."""
    from kftune.data.prepare import prepare

    check_template_file(config)
    check_method_on_model(config)
    if config.stage in ONLINE_STAGES:  # the reward function imports; the reward model is one
        from kftune.alignment.online import check_reward_model, load_reward_function

        if config.online.reward_function:
            load_reward_function(config.online.reward_function)
        else:
            check_reward_model(config.online.reward_model, config.registry.tracking_uri)
    if config.eval.reward_model:
        from kftune.alignment.online import check_reward_model

        check_reward_model(config.eval.reward_model, config.registry.tracking_uri, "eval.reward_model")
    check_retention_files(config)
    return prepare(config).warnings


def check_template_file(config: RunConfig) -> None:
    """A template given by path (from Python; `load_config` reads it already): read it and check it against
    the run, as validation does for templates it holds."""
    from kftune.prompts.templates import PACKAGED, template_contents

    if isinstance(config.prompt.template, str) and config.prompt.template not in PACKAGED:
        data = config_to_dict(config)
        data["prompt"]["template"] = template_contents(config.prompt.template)
        parse_config(data)


def check_retention_files(config: RunConfig) -> None:
    """The general data retention and the forgetting measure read, and a Fisher file to reuse, made for this base."""
    from kftune.models import resolve_model_path
    from kftune.retention.fisher import check_fisher_file, model_fingerprint
    from kftune.retention.general import held_out_lines, training_lines

    retention = config.retention
    if retention.uses_general_data:
        training_lines(retention.general_data, retention.general_rows)
    if config.eval.forgetting:
        held_out_lines(config.eval.general_text)
    if retention.ewc and retention.ewc.fisher_file:
        check_fisher_file(retention.ewc.fisher_file, model_fingerprint(resolve_model_path(config.model.name_or_path)))


def check_method_on_model(config: RunConfig) -> None:
    """Apply the method to the model's architecture on the meta device: target modules, layer ranges,
    bias terms and block layouts are checked by the code that will apply them in training."""
    from kftune.methods import apply_method
    from kftune.models import resolve_model_path

    path = resolve_model_path(config.model.name_or_path)
    model = model_on_meta(path, config.model.task, config.model.num_labels or 2)
    try:
        with warnings.catch_warnings():  # libraries' deprecation notices about each other: not the user's concern here
            warnings.simplefilter("ignore", FutureWarning)
            apply_method(model, config.method, config.model.task)
    except KftuneError as exc:
        raise KftuneError(f"{exc}\n  {model_offers(model)}") from None
    except Exception as exc:  # peft's and torch's own errors on a mismatch (e.g. no module matches target_modules)
        reason = " ".join(str(exc).split())
        field = _field_at_fault(config.method, reason)
        value = getattr(config.method, field.removeprefix("method."))
        raise KftuneError(
            f"{field}: {value!r} does not fit the {model.config.model_type} model at {path} "
            f"({type(exc).__name__}: {reason})\n  {model_offers(model)}"
        ) from None


def model_on_meta(path: str | Path, task: str, num_labels: int):
    """The model with its task head, parameters on the meta device (shapes only, no memory, no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSequenceClassification

    from kftune.models import pretrained_args

    folder, gguf = pretrained_args(path)
    model_config = AutoConfig.from_pretrained(folder, **gguf, num_labels=num_labels)
    auto = {"sequence_classification": AutoModelForSequenceClassification, "masked_lm": AutoModelForMaskedLM}.get(
        task, AutoModelForCausalLM
    )
    with torch.device("meta"):
        return auto.from_config(model_config)


def model_offers(model) -> str:
    """What a method can be pointed at: the model type, its layer count and the names of its linear layers."""
    import torch

    linear = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"
        }
    )
    shown = ", ".join(linear[:MODULE_NAMES_SHOWN]) + (
        f", ... ({len(linear)} names)" if len(linear) > MODULE_NAMES_SHOWN else ""
    )
    config = model.config
    layers = getattr(config, "num_hidden_layers", None)
    return f"the model ({config.model_type}{f', {layers} layers' if layers else ''}) has linear layers named: {shown}"


def _field_at_fault(options, reason: str) -> str:
    """The method option a library error is about: one whose name or text value the message mentions."""
    fields = {field: value for field, value in options.model_dump().items() if field != "name"}
    for field in fields:
        if re.search(rf"\b({field}|{field.replace('_', ' ')})\b", reason, re.IGNORECASE):
            return f"method.{field}"
    for field, value in fields.items():
        texts = value if isinstance(value, list) else [value]
        if any(isinstance(text, str) and re.search(rf"\b{re.escape(text)}\b", reason) for text in texts):
            return f"method.{field}"
    return "method.name"
