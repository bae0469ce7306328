"""`kftune compile` produces KFP IR a cluster accepts: the tasks in order, config as the default, prepare_data keyed by the data."""

import itertools
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import CLUSTER_RUN_CONFIG
from kftune.config import config_to_dict, load_config

STEPS = ["resolve-config", "fingerprint-data", "prepare-data", "build-prompts", "train", "evaluate", "register"]
LINEAGE = {"importer": "data source", "importer-2": "base model"}


def test_compiled_ir_has_the_steps_in_order(tmp_path):
    out = tmp_path / "pipeline.yaml"
    example = CLUSTER_RUN_CONFIG
    done = subprocess.run(
        [sys.executable, "-m", "kftune.cli", "compile", str(example), "--set", "train.lr=5e-4", "-o", str(out)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    ir = next(yaml.safe_load_all(out.read_text()))  # then the Kubernetes platform spec
    assert ir["pipelineInfo"]["name"] == "kftune"
    tasks = ir["root"]["dag"]["tasks"]
    assert sorted(tasks) == sorted(STEPS + list(LINEAGE))
    for before, after in itertools.pairwise(STEPS):
        assert before in tasks[after].get("dependentTasks", []), f"{after} must run after {before}"
    default = ir["root"]["inputDefinitions"]["parameters"]["config"]["defaultValue"]
    assert default == config_to_dict(load_config(example, ["train.lr=5e-4"]))
    executors = ir["deploymentSpec"]["executors"]
    images = {name: spec["container"]["image"] for name, spec in executors.items() if "container" in spec}
    trainer = {
        "exec-train",
        "exec-evaluate",
    }  # evaluate scores the model where it fits: CUDA torch, GPUs from cluster.evaluate
    assert all(images[name].startswith("ghcr.io/kftune/kftune-trainer:") for name in trainer)
    assert all(image.startswith("ghcr.io/kftune/kftune-step:") for name, image in images.items() if name not in trainer)
    assert all(
        "pip install" not in " ".join(spec["container"]["command"])
        for spec in executors.values()
        if "container" in spec
    )

    from kfp import components

    assert components.load_component_from_file(str(out)).name == "kftune"


def compiled_chart_config(tmp_path) -> Path:
    """The chart's run config compiled by the CLI, as the chart's publish Job does."""
    out = tmp_path / "pipeline.yaml"
    done = subprocess.run([sys.executable, "-m", "kftune.cli", "compile", str(CLUSTER_RUN_CONFIG), "-o", str(out)])
    assert done.returncode == 0
    return out


def compiled_tasks(path) -> dict:
    return next(yaml.safe_load_all(path.read_text()))["root"]["dag"]["tasks"]


def test_prepare_data_is_keyed_by_the_data_fingerprint_which_is_never_cached(tmp_path):
    """KFP's cache key is the component plus its inputs: the fingerprint, computed fresh in every run, is one of prepare_data's."""
    from kftune.kube.kfp_server import with_caching

    out = compiled_chart_config(tmp_path)
    tasks = compiled_tasks(out)
    assert tasks["fingerprint-data"]["cachingOptions"] == {}, "fingerprint_data must run in every run"
    assert tasks["prepare-data"]["inputs"]["parameters"]["data_fingerprint"]["taskOutputParameter"] == {
        "producerTask": "fingerprint-data",
        "outputParameterKey": "Output",
    }
    assert {name: tasks[name]["cachingOptions"] for name in STEPS if name != "fingerprint-data"} == {
        key: {"enableCache": True} for key in [step for step in STEPS if step != "fingerprint-data"]
    }

    off = compiled_tasks(with_caching(out, False, tmp_path / "off.yaml"))
    assert all(task["cachingOptions"] == {} for task in off.values())
    on = with_caching(tmp_path / "off.yaml", True, tmp_path / "on.yaml")
    assert list(yaml.safe_load_all(on.read_text())) == list(yaml.safe_load_all(out.read_text())), (
        "--cache restores the compiled settings"
    )


def test_the_data_source_and_base_model_are_lineage_artifacts_no_step_downloads(tmp_path):
    """dsl.importer records where the run's data and base model are (as resolved for this run) in KFP's metadata;
    no step takes them as inputs, since KFP's launcher would download (or, for a volume path, fail on) them."""
    out = compiled_chart_config(tmp_path)
    ir = next(yaml.safe_load_all(out.read_text()))
    tasks, executors = ir["root"]["dag"]["tasks"], ir["deploymentSpec"]["executors"]
    sources = {"data source": ("data_source", "system.Dataset"), "base model": ("base_model", "system.Model")}
    for name, shown in LINEAGE.items():
        assert tasks[name]["taskInfo"]["name"] == shown
        key, schema = sources[shown]
        assert tasks[name]["inputs"]["parameters"]["uri"]["taskOutputParameter"] == {
            "producerTask": "resolve-config",
            "outputParameterKey": key,
        }
        assert executors[f"exec-{name}"]["importer"]["typeSchema"]["schemaTitle"] == schema
    assert (
        tasks["importer"]["inputs"]["parameters"]["metadata"]["taskOutputParameter"]["producerTask"]
        == "fingerprint-data"
    )
    consumed = [
        artifact["taskOutputArtifact"]["producerTask"]
        for task in tasks.values()
        for artifact in task.get("inputs", {}).get("artifacts", {}).values()
    ]
    assert not set(consumed) & set(LINEAGE)
