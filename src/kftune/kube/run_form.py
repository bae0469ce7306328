"""The fields people change per run, as named, typed pipeline parameters: what the Kubeflow UI's run form
shows besides the `config` struct and the placement settings.

Each parameter's default is the compiled config's value. A run's value replaces the config's only where it
differs from that default, so a run that edits the field inside `config` instead keeps that edit; the
pipeline's first task (`resolve_config`) merges them and validates the result.
"""

from __future__ import annotations

import copy
from typing import Any

RUN_FORM: dict[str, tuple[str, type]] = {
    "base_model": ("model.name_or_path", str),
    "data_path": ("data.path", str),
    "template": ("prompt.template", str),
    "method": ("method.name", str),
    "method_options": ("method", dict),
    "learning_rate": ("train.lr", float),
    "epochs": ("train.epochs", int),
    "batch_size": ("train.batch_size", int),
    "workers": ("train.workers", int),
    "gpu_nodes": ("cluster.rayjob.nodes", int),
    "gpus_per_node": ("cluster.rayjob.worker.gpus", int),
    "zero_stage": ("train.deepspeed.stage", int),
    "registered_model_name": ("registry.model_name", str),
    "gate_metric": ("registry.gate.metric", str),
    "gate_margin": ("registry.gate.margin", float),
}
"""Pipeline parameter -> (config field, type). `method_options`: the method section without its name (LoRA's
r, alpha, target_modules, ...). zero_stage -1: DeepSpeed off. The GPUs are the RayJob's (`cluster.rayjob`),
which the train step creates at run time; a train pod's own GPUs are part of its compiled pod spec."""
NO_DEEPSPEED = -1


def run_form_arguments(config: dict[str, Any]) -> dict[str, Any]:
    """Each run-form parameter's value in a config dict (as `config_to_dict` writes it)."""
    arguments = {}
    for name, (path, kind) in RUN_FORM.items():
        value = _get(config, path)
        if name == "template" and isinstance(value, dict):
            value = value.get("name", "")  # a user's template travels inline in `config`; the form shows its name
        if name == "method_options":
            value = {key: option for key, option in value.items() if key != "name"}
        arguments[name] = NO_DEEPSPEED if value is None and name == "zero_stage" else kind(value)
    return arguments


def apply_run_form(config: dict[str, Any], compiled: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """`config` with every run-form value that differs from its compiled default written into its field.
    A new method starts from that method's defaults, or the form's method options when those changed too
    (the config's options belong to the method it replaces)."""
    config = copy.deepcopy(config)
    changed = {name for name in RUN_FORM if given[name] != compiled[name]}
    if changed & {"method", "method_options"}:
        method = str(given["method"]) if "method" in changed else config["method"]["name"]
        options = dict(given["method_options"]) if "method_options" in changed else {}
        config["method"] = {"name": method, **options}
    for name in sorted(changed - {"method", "method_options"}):
        path, kind = RUN_FORM[name]
        value = kind(given[name])
        if name == "zero_stage":
            train = config.setdefault("train", {})
            train["deepspeed"] = None if value == NO_DEEPSPEED else {**(train.get("deepspeed") or {}), "stage": value}
            if train["deepspeed"] is None:
                del train["deepspeed"]
        else:
            _set(config, path, value)
    return config


def _get(config: dict[str, Any], path: str) -> Any:
    node: Any = config
    for part in path.split("."):
        node = (node or {}).get(part)
    return node


def _set(config: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    node = config
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
