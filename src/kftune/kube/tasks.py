"""Apply the `cluster` settings to a pipeline task at compile time: resources, placement, the data
volume, pull secrets and the MLflow credentials Secret (kfp-kubernetes). The local runner ignores
all of them, so `kftune run` uses the same DAG."""

from __future__ import annotations

from kfp import kubernetes
from kfp.dsl import PipelineTask

from kftune.kube.settings import ClusterSection, Placement


def configure_task(task: PipelineTask, placement: Placement, cluster: ClusterSection, *, uses_mlflow: bool = False) -> PipelineTask:
    resources = placement.resources
    task.set_cpu_request(resources.cpu).set_memory_request(resources.memory).set_memory_limit(resources.memory)
    if resources.gpus:
        task.set_accelerator_type(resources.accelerator).set_accelerator_limit(resources.gpus)
    for label, value in placement.node_selector.items():
        kubernetes.add_node_selector(task, label_key=label, label_value=value)
    for toleration in placement.tolerations:
        kubernetes.add_toleration(task, **toleration.model_dump(exclude_none=True))
    if cluster.volume:
        kubernetes.mount_pvc(task, pvc_name=cluster.volume.claim, mount_path=cluster.volume.mount_path)
    if cluster.image_pull_secrets:
        kubernetes.set_image_pull_secrets(task, list(cluster.image_pull_secrets))
    if uses_mlflow and cluster.mlflow_secret:
        kubernetes.use_secret_as_env(task, secret_name=cluster.mlflow_secret.name, secret_key_to_env=cluster.mlflow_secret.env)
    return task
