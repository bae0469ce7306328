"""The run form: the fields people change per run as named, typed pipeline parameters (`kftune.kube.run_form`),
their defaults the config's, a value set in the form overriding the config's, the `config` struct for the rest."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import CLUSTER, ON_VOLUME
from kftune import steps
from kftune.config import config_to_dict, parse_config
from kftune.kube.run_form import RUN_FORM, apply_run_form, run_form_arguments
from kftune.pipelines.kftune_pipeline import compile_pipeline

KFP_TYPES = {str: "STRING", float: "NUMBER_DOUBLE", int: "NUMBER_INTEGER", dict: "STRUCT"}


def test_the_form_fields_are_typed_parameters_defaulting_to_the_config(make_config, tmp_path):
    config = parse_config(make_config(cluster=CLUSTER, data=ON_VOLUME, train={"lr": 5e-4, "deepspeed": {"stage": 3}}))
    ir = next(yaml.safe_load_all(Path(compile_pipeline(config, str(tmp_path / "p.yaml"))).read_text()))
    parameters = ir["root"]["inputDefinitions"]["parameters"]
    for name, (_, kind) in RUN_FORM.items():
        assert parameters[name]["parameterType"] == KFP_TYPES[kind], name
    defaults = {name: parameters[name]["defaultValue"] for name in RUN_FORM}
    assert defaults == run_form_arguments(config_to_dict(config))
    assert (
        defaults["learning_rate"],
        defaults["zero_stage"],
        defaults["data_path"],
        defaults["registered_model_name"],
    ) == (5e-4, 3, "/data/sst2/train.tsv", "tiny")
    tasks = ir["root"]["dag"]["tasks"]
    resolve = tasks["resolve-config"]["inputs"]["parameters"]
    assert resolve["learning_rate"] == {"componentInputParameter": "learning_rate"}
    assert resolve["compiled_form"]["runtimeValue"]["constant"] == defaults, (
        "the compiled defaults travel with the task"
    )
    for name, task in tasks.items():
        if name != "resolve-config" and not name.startswith("importer"):  # the importers record lineage
            assert task["inputs"]["parameters"]["config"] == {
                "taskOutputParameter": {"producerTask": "resolve-config", "outputParameterKey": "config"}
            }, name


def test_a_form_value_overrides_the_config_and_an_unchanged_one_keeps_a_config_edit(make_config):
    config = config_to_dict(parse_config(make_config()))
    compiled = run_form_arguments(config)
    edited = {**config, "train": {**config["train"], "epochs": 3}}  # edited in the config struct, form left as compiled
    given = {**compiled, "learning_rate": 0.01, "registered_model_name": "from-the-form", "zero_stage": 2}
    resolved = steps.resolve_config(edited, compiled, given)
    assert (
        resolved["train"]["lr"],
        resolved["registry"]["model_name"],
        resolved["train"]["deepspeed"]["stage"],
        resolved["train"]["epochs"],
    ) == (0.01, "from-the-form", 2, 3)
    assert steps.resolve_config(config, {}, compiled) == config, (
        "a local run passes the config's own values: nothing changes"
    )


def test_a_new_method_starts_from_its_defaults_and_deepspeed_turns_off(make_config):
    config = config_to_dict(parse_config(make_config(train={"deepspeed": {"stage": 2}})))
    compiled = run_form_arguments(config)
    resolved = apply_run_form(config, compiled, {**compiled, "method": "bitfit", "zero_stage": -1})
    assert resolved["method"] == {"name": "bitfit"} and "deepspeed" not in resolved["train"]


def test_method_options_and_the_rayjob_gpus_come_from_the_form(make_config):
    config = config_to_dict(parse_config(make_config(cluster=CLUSTER, data=ON_VOLUME)))
    compiled = run_form_arguments(config)
    assert compiled["method_options"] == {k: v for k, v in config["method"].items() if k != "name"}
    wider = {**compiled["method_options"], "r": 16, "alpha": 32}
    resolved = steps.resolve_config(
        config, compiled, {**compiled, "method_options": wider, "gpu_nodes": 3, "gpus_per_node": 4}
    )
    assert resolved["method"] == {"name": "lora", **wider}
    assert (resolved["cluster"]["rayjob"]["nodes"], resolved["cluster"]["rayjob"]["worker"]["gpus"]) == (3, 4)
    switched = apply_run_form(
        config, compiled, {**compiled, "method": "ia3", "method_options": {"target_modules": ["value"]}}
    )
    assert switched["method"] == {"name": "ia3", "target_modules": ["value"]}


def test_a_bad_form_value_is_an_error_naming_the_field(make_config):
    config = config_to_dict(parse_config(make_config()))
    compiled = run_form_arguments(config)
    with pytest.raises(Exception, match=r"train.lr"):
        steps.resolve_config(config, compiled, {**compiled, "learning_rate": -1.0})
