"""Apply the `cluster` settings to a pipeline task (kfp-kubernetes). Requests, node selectors,
tolerations and the volume's claim come from per-run pipeline parameters, whose defaults are the
config's values (`placement_arguments`), so a run started from the Kubeflow UI can move a step to
other nodes or another PVC without recompiling; the GPU count, the mount path, pull secrets and the
MLflow Secret stay compile-time, as do the retries and the security context (non-root as
`cluster.run_as_user`; KFP's backend adds no privilege escalation, every capability dropped and the
RuntimeDefault seccomp profile, see kfp-kubernetes' set_security_context). The local runner ignores
all of them, so `kftune run` uses the same DAG."""

from __future__ import annotations

from typing import Any

from kfp import kubernetes
from kfp.dsl import PipelineTask

from kftune.kube.security import SHARED_MEMORY_VOLUME
from kftune.kube.settings import ClusterSection

GROUPS = ("steps", "train", "evaluate")
"""The kinds of step pod: the CPU steps, train, and evaluate (which scores the model where it fits)."""


def placement_arguments(cluster: ClusterSection) -> dict[str, Any]:
    """The pipeline's placement parameters and their values from a cluster section."""
    arguments: dict[str, Any] = {}
    for group in GROUPS:
        placement = getattr(cluster, group)
        arguments |= {
            f"{group}_cpu": placement.resources.cpu,
            f"{group}_memory": placement.resources.memory,
            f"{group}_node_selector": dict(placement.node_selector),
            f"{group}_tolerations": [t.model_dump(exclude_none=True) for t in placement.tolerations],
        }
    arguments["volume_claim"] = cluster.volume.claim if cluster.volume else ""
    return arguments


def configure_task(
    task: PipelineTask,
    group: str,
    cluster: ClusterSection,
    parameters: dict[str, Any],
    *,
    uses_mlflow: bool = False,
    retries: int = 0,
) -> PipelineTask:
    """`parameters` holds the pipeline's channels named as in `placement_arguments`; `group` one of GROUPS;
    `retries` with the backoff of `cluster.retries`."""
    memory = parameters[f"{group}_memory"]
    task.set_cpu_request(parameters[f"{group}_cpu"]).set_memory_request(memory).set_memory_limit(memory)
    resources = getattr(cluster, group).resources
    if resources.gpus:
        task.set_accelerator_type(resources.accelerator).set_accelerator_limit(resources.gpus)
    if resources.gpus > 1:
        kubernetes.empty_dir_mount(task, volume_name=SHARED_MEMORY_VOLUME, mount_path="/dev/shm", medium="Memory")
    kubernetes.set_security_context(task, run_as_user=cluster.run_as_user, run_as_non_root=True)
    if retries:
        backoff = cluster.retries
        task.set_retry(
            retries,
            backoff_duration=f"{backoff.backoff_seconds}s",
            backoff_factor=backoff.backoff_factor,
            backoff_max_duration=f"{backoff.max_backoff_seconds}s",
        )
    kubernetes.add_node_selector_json(task, parameters[f"{group}_node_selector"])
    kubernetes.add_toleration_json(task, parameters[f"{group}_tolerations"])
    if cluster.volume:
        kubernetes.mount_pvc(task, pvc_name=parameters["volume_claim"], mount_path=cluster.volume.mount_path)
    if cluster.image_pull_secrets:
        kubernetes.set_image_pull_secrets(task, list(cluster.image_pull_secrets))
    if uses_mlflow and cluster.mlflow_secret:
        kubernetes.use_secret_as_env(
            task, secret_name=cluster.mlflow_secret.name, secret_key_to_env=cluster.mlflow_secret.env
        )
    return task
