"""Per-run placement: the compiled pipeline takes CPU/memory requests, node selectors, tolerations
and the PVC of each kind of step pod from pipeline parameters whose defaults are the config's
`cluster` values; GPUs, mount path and secrets stay compile-time (kftune.kube.tasks)."""

from __future__ import annotations

from pathlib import Path

import yaml

from conftest import CLUSTER, ON_VOLUME
from kftune.config import config_to_dict, parse_config
from kftune.kube.rayjob import build_rayjob
from kftune.kube.run_form import RUN_FORM
from kftune.kube.settings import with_volume_claim
from kftune.kube.tasks import placement_arguments
from kftune.pipelines.kftune_pipeline import compile_pipeline


def compiled(config, tmp_path):
    documents = list(yaml.safe_load_all(Path(compile_pipeline(config, str(tmp_path / "p.yaml"))).read_text()))
    return documents[0], documents[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def channel(name: str) -> str:
    return f"{{{{$.inputs.parameters['pipelinechannel--{name}']}}}}"


def test_placement_parameters_default_to_the_config_and_drive_every_task(tmp_path, make_config):
    ir, platform = compiled(parse_config(make_config(cluster=CLUSTER, data=ON_VOLUME)), tmp_path)
    parameters = ir["root"]["inputDefinitions"]["parameters"]
    defaults = {
        name: spec["defaultValue"] for name, spec in parameters.items() if name != "config" and name not in RUN_FORM
    }
    assert defaults == {
        "steps_cpu": "2",
        "steps_memory": "8Gi",
        "steps_node_selector": {"pool": "cpu"},
        "steps_tolerations": [],
        "train_cpu": "8",
        "train_memory": "64Gi",
        "train_node_selector": {"pool": "gpu"},
        "train_tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "evaluate_cpu": "4",
        "evaluate_memory": "32Gi",
        "evaluate_node_selector": {"pool": "gpu"},
        "evaluate_tolerations": [],
        "volume_claim": "kftune-data",
    }
    executors = {name: spec for name, spec in ir["deploymentSpec"]["executors"].items() if "container" in spec}
    assert set(executors) == {
        f"exec-{step}"
        for step in (
            "resolve-config",
            "fingerprint-data",
            "prepare-data",
            "build-prompts",
            "train",
            "evaluate",
            "register",
        )
    }
    for name, spec in executors.items():
        group = {"exec-train": "train", "exec-evaluate": "evaluate"}.get(name, "steps")
        resources = spec["container"]["resources"]
        assert (
            resources["resourceCpuRequest"],
            resources["resourceMemoryRequest"],
            resources["resourceMemoryLimit"],
        ) == (channel(f"{group}_cpu"), channel(f"{group}_memory"), channel(f"{group}_memory"))
        assert ("accelerator" in resources) == (group != "steps"), (
            "GPUs are compile-time, for train and evaluate (given GPUs here)"
        )
        settings = platform[name]
        assert settings["nodeSelector"] == {"nodeSelectorJson": {"componentInputParameter": f"{group}_node_selector"}}
        assert settings["tolerations"] == [{"tolerationJson": {"componentInputParameter": f"{group}_tolerations"}}]
        assert [(m["mountPath"], m["pvcNameParameter"]) for m in settings["pvcMount"]] == [
            ("/data", {"componentInputParameter": "volume_claim"})
        ]
        assert [s["secretName"] for s in settings["imagePullSecret"]] == ["ghcr"]
        assert (name in ("exec-register", "exec-train")) == bool(settings.get("secretAsEnv")), (
            "register, and train (a sweep's driver logs its trials), get the MLflow credentials"
        )
    assert (
        ir["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]["accelerator"]["resourceCount"] == "2"
    )
    assert ir["root"]["dag"]["tasks"]["train"]["inputs"]["parameters"]["volume_claim"] == {
        "componentInputParameter": "volume_claim"
    }, "the train step learns the claim it mounts, for the RayJob it creates"


def test_without_a_cluster_section_the_defaults_are_the_schema_defaults_and_nothing_is_mounted(tmp_path, make_config):
    ir, platform = compiled(
        parse_config(make_config(data={"path": "s3://data/train.tsv", "split": {"test": "s3://data/dev.tsv"}})),
        tmp_path,
    )
    defaults = {name: spec["defaultValue"] for name, spec in ir["root"]["inputDefinitions"]["parameters"].items()}
    assert (
        defaults["train_cpu"],
        defaults["steps_memory"],
        defaults["volume_claim"],
        defaults["train_tolerations"],
    ) == ("4", "4Gi", "", [])
    assert all("pvcMount" not in settings and "imagePullSecret" not in settings for settings in platform.values())
    assert "accelerator" not in ir["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]


def test_the_parameters_are_exactly_the_placement_arguments(tmp_path, make_config):
    config = parse_config(make_config(cluster=CLUSTER, data=ON_VOLUME))
    ir, _ = compiled(config, tmp_path)
    assert set(ir["root"]["inputDefinitions"]["parameters"]) == {
        "config",
        *placement_arguments(config.cluster),
        *RUN_FORM,
    }


def test_a_run_with_another_claim_creates_a_rayjob_mounting_that_claim(make_config):
    config = config_to_dict(parse_config(make_config(cluster={**CLUSTER, "rayjob": {"enabled": True}})))
    moved = parse_config(with_volume_claim(config, "scratch-rwx"))
    manifest = build_rayjob(moved, "run-1", "/data/kftune-runs/run-1")
    for template in (
        manifest["spec"]["rayClusterSpec"]["headGroupSpec"]["template"],
        manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"],
    ):
        assert template["spec"]["volumes"] == [{"name": "data", "persistentVolumeClaim": {"claimName": "scratch-rwx"}}]
    assert with_volume_claim(config, "") == config, "an empty parameter keeps the config's claim"
    without = config_to_dict(parse_config(make_config()))
    assert with_volume_claim(without, "scratch-rwx") == without, "no volume in the config: nothing to mount"
