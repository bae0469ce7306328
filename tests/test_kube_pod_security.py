"""Every pod spec kftune produces meets the "restricted" Pod Security Standard (tests/pod_security.py, written
from the published rules): the chart's pods, the RayJob's head, workers and submitter, and the compiled
pipeline's step pods. Chart pods also have a read-only root filesystem with emptyDirs where they write;
pods with several GPUs get a memory-backed /dev/shm."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from conftest import CLUSTER, CLUSTER_RUN_CONFIG
from kftune.config import parse_config
from kftune.kube.rayjob import build_rayjob
from pod_security import restricted_violations
from test_chart import VALUES, by_kind, helm, render  # noqa: F401  (helm is a fixture)

RAYJOB = {"nodes": 2, "worker": {"cpu": "16", "memory": "128Gi", "gpus": 4}}
# What KFP's backend sets on every step container whatever the pipeline says (kfp-kubernetes 2.17, set_security_context:
# "Platform security defaults (allowPrivilegeEscalation=false, drop ALL capabilities, seccompProfile=RuntimeDefault)
# are enforced separately"); the pipeline adds runAsNonRoot and runAsUser. Argo's own init/wait containers are KFP's.
KFP_STEP_DEFAULTS = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}
COMPLIANT = {
    "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
    "containers": [
        {"name": "main", "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}}
    ],
}


def test_the_checker_rejects_what_the_standard_rejects():
    assert restricted_violations(COMPLIANT) == []
    only_no_escalation = {"containers": [{"name": "ray-head", "securityContext": {"allowPrivilegeEscalation": False}}]}
    problems = " | ".join(restricted_violations(only_no_escalation))
    assert (
        "runAsNonRoot must be true" in problems
        and "seccompProfile.type must be RuntimeDefault" in problems
        and "must include ALL" in problems
    )
    for change, words in [
        ({"volumes": [{"name": "host", "hostPath": {"path": "/"}}]}, "volume type hostPath"),
        ({"hostNetwork": True}, "host namespaces"),
        ({"securityContext": {**COMPLIANT["securityContext"], "runAsUser": 0}}, "runAsUser: must not be 0"),
        (
            {"securityContext": {**COMPLIANT["securityContext"], "seccompProfile": {"type": "Unconfined"}}},
            "seccompProfile.type",
        ),
        (
            {
                "containers": [
                    {
                        "name": "main",
                        "securityContext": {
                            "allowPrivilegeEscalation": False,
                            "capabilities": {"drop": ["ALL"], "add": ["SYS_ADMIN"]},
                        },
                    }
                ]
            },
            "only NET_BIND_SERVICE",
        ),
        (
            {"containers": [{"name": "main", "securityContext": {"capabilities": {"drop": ["ALL"]}}}]},
            "allowPrivilegeEscalation: must be false",
        ),
        (
            {
                "containers": [
                    {
                        "name": "main",
                        "securityContext": {**COMPLIANT["containers"][0]["securityContext"], "runAsNonRoot": False},
                    }
                ]
            },
            "runAsNonRoot must be true",
        ),
    ]:
        assert words in " | ".join(restricted_violations({**COMPLIANT, **change})), change


def rayjob_pods(make_config, cluster) -> dict:
    spec = build_rayjob(parse_config(make_config(cluster=cluster)), "run", "/data/kftune-runs/run")["spec"]
    pods = {
        "head": spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"],
        "worker": spec["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"],
    }
    if "submitterPodTemplate" in spec:
        pods["submitter"] = spec["submitterPodTemplate"]["spec"]
    return pods


@pytest.mark.parametrize(
    "cluster",
    [{}, {**CLUSTER, "rayjob": RAYJOB}, {"rayjob": {**RAYJOB, "submission_mode": "HTTPMode", "worker": {"gpus": 1}}}],
)
def test_every_rayjob_pod_is_restricted(make_config, cluster):
    pods = rayjob_pods(make_config, cluster)
    assert ("submitter" in pods) == (cluster.get("rayjob", {}).get("submission_mode", "K8sJobMode") == "K8sJobMode")
    for role, pod in pods.items():
        assert restricted_violations(pod) == [], role


def test_multi_gpu_workers_get_a_memory_backed_dev_shm(make_config):
    worker = rayjob_pods(make_config, {**CLUSTER, "rayjob": RAYJOB})["worker"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in worker["volumes"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in worker["containers"][0]["volumeMounts"]
    assert "volumes" not in rayjob_pods(make_config, {**CLUSTER, "rayjob": RAYJOB})["submitter"], (
        "the submitter needs no claim"
    )
    single = rayjob_pods(make_config, {"rayjob": {"worker": {"gpus": 1}}})
    assert all("dshm" not in str(pod) for pod in single.values())


def pod_templates(objects: list[dict]) -> dict[str, tuple[dict, dict]]:
    """kind/name -> (pod spec, pod annotations) of every pod the chart renders (directly or through a controller)."""
    found = {}
    for obj in objects:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] == "Pod":
            found[name] = (obj["spec"], obj["metadata"].get("annotations") or {})
        elif obj["kind"] == "InferenceService":  # KServe's predictor is a pod spec (plus its own fields)
            found[name] = (obj["spec"]["predictor"], obj["metadata"].get("annotations") or {})
        elif "template" in obj.get("spec", {}):
            template = obj["spec"]["template"]
            found[name] = (template["spec"], (template.get("metadata") or {}).get("annotations") or {})
    return found


@pytest.mark.parametrize("values", VALUES, ids=str)
def test_every_chart_pod_is_restricted_with_a_read_only_root(helm, values):  # noqa: F811
    pods = pod_templates(render(helm, *VALUES[values]))
    assert pods or values == "no-mlflow-no-publish", "the chart renders pods"
    for name, (pod, pod_annotations) in pods.items():
        assert restricted_violations(pod, pod_annotations) == [], name
        empty_dirs = {volume["name"] for volume in pod.get("volumes", []) if "emptyDir" in volume}
        for container in pod["containers"]:
            assert container["securityContext"]["readOnlyRootFilesystem"] is True, name
            tmp = [mount for mount in container.get("volumeMounts", []) if mount["mountPath"] == "/tmp"]
            assert tmp and tmp[0]["name"] in empty_dirs, f"{name}: /tmp must be an emptyDir"


def step_pod(executor: dict, platform: dict) -> dict:
    """The pod KFP's backend makes for a step: its container with the kfp-kubernetes settings and the backend's defaults."""
    context = {**KFP_STEP_DEFAULTS, **platform.get("securityContext", {})}
    if "runAsUser" in context:
        context["runAsUser"] = int(context["runAsUser"])  # protobuf int64 is written as a string
    volumes = [
        {"name": mount["volumeName"], "emptyDir": {"medium": mount.get("medium", "")}}
        for mount in platform.get("emptyDirMounts", [])
    ]
    volumes += [
        {"name": f"pvc-{i}", "persistentVolumeClaim": {"claimName": "from-a-parameter"}}
        for i, _ in enumerate(platform.get("pvcMount", []))
    ]
    return {
        "containers": [{"name": "main", "image": executor["container"]["image"], "securityContext": context}],
        "volumes": volumes,
    }


def test_every_compiled_step_pod_is_restricted(tmp_path):
    package = tmp_path / "pipeline.yaml"
    overrides = ["--set", f"cluster={yaml.safe_dump(CLUSTER, default_flow_style=True).strip()}"]
    done = subprocess.run(
        [sys.executable, "-m", "kftune.cli", "compile", str(CLUSTER_RUN_CONFIG), *overrides, "-o", str(package)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    ir, platform = yaml.safe_load_all(package.read_text())
    settings = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name, executor in ir["deploymentSpec"]["executors"].items():
        if "importer" in executor:  # run by KFP's own importer launcher, in KFP's pod: nothing of kftune's
            continue
        assert restricted_violations(step_pod(executor, settings[name])) == [], name
        assert settings[name]["securityContext"] == {"runAsNonRoot": True, "runAsUser": "1000"}
    assert settings["exec-train"]["emptyDirMounts"] == [
        {"medium": "Memory", "mountPath": "/dev/shm", "volumeName": "dshm"}
    ], "2 GPUs: NCCL's /dev/shm"
    assert "emptyDirMounts" not in settings["exec-evaluate"]
