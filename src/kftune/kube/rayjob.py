"""Training on a Kubernetes cluster as a KubeRay RayJob (ray.io/v1).

`build_rayjob` turns a run config into the manifest: a CPU head that runs no training, one GPU
worker group of `cluster.rayjob.nodes` pods, and an entrypoint that runs kftune's trainer
(`python -m kftune.train`) with the config in its runtime env; Ray Train then starts one worker
per GPU. Every pod (head, workers, the submitter) meets the "restricted" Pod Security Standard
(`kftune.kube.security`). `run_rayjob` creates it (a retried step re-attaches to the one of its
attempt that is running or succeeded, and replaces a failed one), streams the submitter's log, maps
the final status to an outcome and raises with the RayJob's own reason when it failed.
`train_on_rayjob` is the pipeline's train step around it.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, Protocol

import yaml

from kftune.config import RunConfig, config_to_dict, parse_config
from kftune.errors import KftuneError
from kftune.kube.security import container_security_context, pod_security_context, shared_memory
from kftune.kube.settings import ClusterSection, Placement, Resources
from kftune.train import TRAIN_LOG_FILE, WORKER_ENV

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
MAX_NAME = 47  # KubeRay derives longer names (cluster, submitter Job) from it and rejects 48+
CONFIG_ENV = "KFTUNE_CONFIG"
SPEC_LABEL = "kftune.io/spec-sha256"
"""The first 40 hex digits of the spec's sha256: a retried step re-attaches only to a RayJob built from the same spec."""
SUBMITTER = Resources(cpu="500m", memory="1Gi")
SWEEP_REPORT = "sweep_report.html"
"""A sweep's report in the RayJob's work folder (the sweep runs in the job's driver, `python -m kftune.train`)."""


def rayjob_name(run_name: str) -> str:
    """A valid RayJob name from a pipeline run name: lowercase DNS label, at most 47 characters."""
    name = re.sub(r"[^a-z0-9-]+", "-", run_name.lower()).strip("-")[:MAX_NAME].rstrip("-")
    if not name:
        raise KftuneError(f"cannot derive a RayJob name from run name {run_name!r}")
    return name


def sized_for_rayjob(config: RunConfig) -> RunConfig:
    """The config the trainer sees on the cluster: one Ray Train worker per GPU of the worker group (a sweep's
    trials at once share them), no second RayJob."""
    rayjob = config.cluster.rayjob
    workers = rayjob.ray_workers(config.sweep.parallel if config.sweep else 1)
    train = config.train.model_copy(update={"workers": workers, "use_gpu": rayjob.worker.gpus > 0})
    cluster = config.cluster.model_copy(update={"rayjob": rayjob.model_copy(update={"enabled": False})})
    return parse_config(
        config_to_dict(config.model_copy(update={"train": train, "cluster": cluster})), source="cluster.rayjob"
    )


def build_rayjob(config: RunConfig, run_name: str, work_dir: str) -> dict[str, Any]:
    """The RayJob manifest. `work_dir` (prompts/ in, model/ out, Ray Train's storage) must be on `cluster.volume`, which every pod mounts."""
    from kftune.components.images import TRAINER_IMAGE

    cluster, rayjob = config.cluster, config.cluster.rayjob
    image = rayjob.image or TRAINER_IMAGE
    name = rayjob_name(run_name)
    entrypoint = shlex.join(["python", "-m", "kftune.train", "--work-dir", work_dir])
    env = {**WORKER_ENV, CONFIG_ENV: json.dumps(config_to_dict(sized_for_rayjob(config)))}
    spec: dict[str, Any] = {
        "entrypoint": entrypoint,
        "runtimeEnvYAML": yaml.safe_dump({"env_vars": env}),
        "shutdownAfterJobFinishes": rayjob.shutdown_after_finishes,
        "rayClusterSpec": {
            "rayVersion": version("ray"),
            "headGroupSpec": {
                "rayStartParams": {"num-cpus": "0"},  # the head schedules; training happens on the GPU workers
                "template": _pod_template(
                    "ray-head", image, rayjob.head, cluster.steps, cluster, mlflow_env=config.sweep is not None
                ),
            },
            "workerGroupSpecs": [
                {
                    "groupName": "gpu-workers",
                    "replicas": rayjob.nodes,
                    "minReplicas": rayjob.nodes,
                    "maxReplicas": rayjob.nodes,
                    "rayStartParams": {},
                    "template": _pod_template("ray-worker", image, rayjob.worker, cluster.train, cluster),
                }
            ],
        },
    }
    if rayjob.shutdown_after_finishes:
        spec["ttlSecondsAfterFinished"] = rayjob.ttl_seconds_after_finished
    if rayjob.active_deadline_seconds:
        spec["activeDeadlineSeconds"] = rayjob.active_deadline_seconds
    spec["backoffLimit"] = rayjob.backoff_limit
    spec["submissionMode"] = rayjob.submission_mode
    if (
        rayjob.submission_mode == "K8sJobMode"
    ):  # KubeRay's default submitter pod sets no security context; KubeRay fills in the command
        spec["submitterPodTemplate"] = _pod_template(
            "ray-job-submitter", image, SUBMITTER, cluster.steps, cluster, mounts_volume=False
        )
        spec["submitterPodTemplate"]["spec"]["restartPolicy"] = "Never"
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:40]
    labels = {"app.kubernetes.io/name": "kftune", "app.kubernetes.io/component": "train", SPEC_LABEL: digest}
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "RayJob",
        "metadata": {"name": name, "namespace": cluster.namespace, "labels": labels},
        "spec": spec,
    }


def _pod_template(
    container: str,
    image: str,
    resources: Resources,
    placement: Placement,
    cluster: ClusterSection,
    *,
    mounts_volume: bool = True,
    mlflow_env: bool = False,
) -> dict[str, Any]:
    """`mounts_volume` False for the submitter: it only talks to the head, and a ReadWriteOnce claim may be on another node.
    `mlflow_env`: the `cluster.mlflow_secret` credentials as env vars (the head, where a sweep's driver logs the trials)."""
    requests = {"cpu": resources.cpu, "memory": resources.memory}
    limits = {"memory": resources.memory}
    if resources.gpus:
        requests[resources.accelerator] = limits[resources.accelerator] = str(resources.gpus)
    main: dict[str, Any] = {
        "name": container,
        "image": image,
        "resources": {"requests": requests, "limits": limits},
        "securityContext": container_security_context(),
    }
    if mlflow_env and cluster.mlflow_secret:
        main["env"] = [
            {"name": env, "valueFrom": {"secretKeyRef": {"name": cluster.mlflow_secret.name, "key": key}}}
            for key, env in cluster.mlflow_secret.env.items()
        ]
    pod: dict[str, Any] = {"securityContext": pod_security_context(cluster.run_as_user), "containers": [main]}
    volumes, mounts = shared_memory(resources.gpus)
    if cluster.volume and mounts_volume:
        volumes.append({"name": "data", "persistentVolumeClaim": {"claimName": cluster.volume.claim}})
        mounts.append({"name": "data", "mountPath": cluster.volume.mount_path})
    if volumes:
        main["volumeMounts"], pod["volumes"] = mounts, volumes
    if placement.node_selector:
        pod["nodeSelector"] = dict(placement.node_selector)
    if placement.tolerations:
        pod["tolerations"] = [t.model_dump(exclude_none=True) for t in placement.tolerations]
    if cluster.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": secret} for secret in cluster.image_pull_secrets]
    return {"spec": pod}


@dataclass(frozen=True)
class Outcome:
    finished: bool
    succeeded: bool
    summary: str


TERMINAL_DEPLOYMENT = {"Complete", "Failed", "ValidationFailed"}


def outcome(status: dict[str, Any] | None) -> Outcome:
    """Map a RayJob's status to finished / succeeded, with its own words (reason, message) for failures.

    KubeRay reports two things: jobDeploymentStatus (its lifecycle: Initializing .. Complete, Failed,
    ValidationFailed) and jobStatus (Ray's: PENDING .. SUCCEEDED, FAILED, STOPPED). Only Complete
    with SUCCEEDED is a success.
    """
    status = status or {}
    deployment = status.get("jobDeploymentStatus") or "New"
    job = status.get("jobStatus") or "PENDING"
    if deployment not in TERMINAL_DEPLOYMENT:
        return Outcome(False, False, f"{deployment}, Ray job {job}")
    if deployment == "Complete" and job == "SUCCEEDED":
        return Outcome(True, True, "Complete, Ray job SUCCEEDED")
    reason = status.get("reason") or "no reason given"
    message = status.get("message") or "no message"
    return Outcome(True, False, f"{deployment} ({reason}), Ray job {job}: {message}")


class RayJobApi(Protocol):
    """The Kubernetes calls `run_rayjob` needs; `KubernetesRayJobApi` makes them with the kubernetes client."""

    def create(self, manifest: dict[str, Any]) -> bool:
        """False when a RayJob of that name already exists."""

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The RayJob, or None when there is none of that name."""

    def status(self, namespace: str, name: str) -> dict[str, Any] | None: ...
    def submitter_log(self, namespace: str, name: str) -> Iterable[str] | None: ...
    def delete(self, namespace: str, name: str) -> None: ...


class KubernetesRayJobApi:
    """RayJobs through the Kubernetes API (in-cluster service account, else ~/.kube/config)."""

    def __init__(self) -> None:
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        self.objects, self.core = client.CustomObjectsApi(), client.CoreV1Api()

    def create(self, manifest):
        from kubernetes.client.exceptions import ApiException

        try:
            self.objects.create_namespaced_custom_object(
                GROUP, VERSION, manifest["metadata"]["namespace"], PLURAL, manifest
            )
        except ApiException as exc:
            if exc.status != 409:  # 409 Conflict: AlreadyExists
                raise
            return False
        return True

    def get(self, namespace, name):
        from kubernetes.client.exceptions import ApiException

        try:
            return self.objects.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as exc:
            if exc.status != 404:
                raise
            return None

    def status(self, namespace, name):
        return self.objects.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name).get("status")

    def submitter_log(self, namespace, name):
        """The submitter pod's log (`ray job submit` tails the job's driver output), followed to its end."""
        pods = self.core.list_namespaced_pod(namespace, label_selector=f"job-name={name}").items
        running = [pod for pod in pods if pod.status.phase in ("Running", "Succeeded", "Failed")]
        if not running:
            return None
        stream = self.core.read_namespaced_pod_log(
            running[-1].metadata.name, namespace, follow=True, _preload_content=False
        )
        return (line.decode(errors="replace").rstrip("\n") for line in stream.stream())

    def delete(self, namespace, name):
        self.objects.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)


def run_rayjob(
    manifest: dict[str, Any],
    api: RayJobApi,
    *,
    delete_after: bool,
    poll_seconds: float = 10.0,
    echo: Callable[[str], None] = print,
    sleep: Callable[[float], None] = time.sleep,
) -> Outcome:
    """Create the RayJob (or re-attach, see `start`), stream its log, wait for a terminal status; raises KftuneError when it failed."""
    namespace, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
    start(manifest, api, poll_seconds=poll_seconds, echo=echo, sleep=sleep)
    streamed, last = False, None
    try:
        while True:
            result = outcome(api.status(namespace, name))
            if result.finished:
                break
            if result.summary != last:
                echo(f"kftune: RayJob {name}: {result.summary}")
                last = result.summary
            log = None if streamed else api.submitter_log(namespace, name)
            if log is not None:
                for line in log:
                    echo(line)
                streamed = True
            else:
                sleep(poll_seconds)
    finally:
        if delete_after:
            api.delete(namespace, name)
    if not result.succeeded:
        raise KftuneError(f"RayJob {namespace}/{name} failed: {result.summary}")
    echo(f"kftune: RayJob {name}: {result.summary}")
    return result


REPLACE_POLLS = 60


def start(
    manifest: dict[str, Any],
    api: RayJobApi,
    *,
    poll_seconds: float,
    echo: Callable[[str], None],
    sleep: Callable[[float], None],
) -> None:
    """Create the RayJob. When one of that name exists (a retried train step), follow it if it comes from the same
    spec and is running or succeeded; replace it if it failed or comes from another spec, so a retry trains again."""
    namespace, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
    if api.create(manifest):
        echo(f"kftune: created RayJob {namespace}/{name}")
        return
    existing = api.get(namespace, name) or {}
    same_spec = (existing.get("metadata", {}).get("labels") or {}).get(SPEC_LABEL) == manifest["metadata"]["labels"][
        SPEC_LABEL
    ]
    result = outcome(existing.get("status"))
    if existing and same_spec and not (result.finished and not result.succeeded):
        echo(f"kftune: following the existing RayJob {namespace}/{name} ({result.summary})")
        return
    echo(
        f"kftune: replacing the existing RayJob {namespace}/{name}: "
        + (f"it failed: {result.summary}" if same_spec else "built from another spec")
    )
    if existing:
        api.delete(namespace, name)
    for _ in range(REPLACE_POLLS):  # deletion waits for KubeRay's finalizer
        if api.get(namespace, name) is None and api.create(manifest):
            echo(f"kftune: created RayJob {namespace}/{name}")
            return
        sleep(poll_seconds)
    raise KftuneError(
        f"RayJob {namespace}/{name}: the old one was not gone after {REPLACE_POLLS} polls; delete it and retry the step"
    )


def train_on_rayjob(
    config: RunConfig,
    prompts_dir: str | Path,
    model_dir: str | Path,
    run_name: str,
    sweep_report_path: str | Path = "",
    api: RayJobApi | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The pipeline's train step on a cluster: stage the prompts on the shared volume, run the RayJob,
    copy the trained Model folder (and a sweep's report) back into the step's artifacts. Returns the train log."""
    work = Path(config.cluster.volume.mount_path) / "kftune-runs" / rayjob_name(run_name)
    shutil.copytree(prompts_dir, work / "prompts", dirs_exist_ok=True)
    manifest = build_rayjob(config, run_name, str(work))
    run_rayjob(
        manifest, api or KubernetesRayJobApi(), delete_after=config.cluster.rayjob.delete_after_follow, echo=echo
    )
    shutil.copytree(work / "model", model_dir, dirs_exist_ok=True)
    if config.sweep and sweep_report_path:
        shutil.copyfile(work / SWEEP_REPORT, sweep_report_path)
    return json.loads((Path(model_dir) / TRAIN_LOG_FILE).read_text())
