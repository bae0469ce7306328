"""The `cluster` section of a run config: what `kftune compile` writes into the pipeline for
Kubernetes (resources, placement, volumes, secrets) and how a RayJob is sized. Plain data, read
at compile time; `kftune run` on this machine ignores it."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, StringConstraints

from kftune.section import Section

Quantity = Annotated[
    str,
    BeforeValidator(lambda v: str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v),
    StringConstraints(pattern=r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$"),
]
"""A Kubernetes resource quantity: `500m`, `2`, `16Gi` (a YAML number such as `cpu: 8` is read as its text)."""
Name = Annotated[str, StringConstraints(pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", max_length=253)]
"""A Kubernetes object name (DNS subdomain)."""


class Resources(Section):
    cpu: Quantity = "1"
    """Requested, not limited: a CPU limit only throttles."""
    memory: Quantity = "4Gi"
    """Requested and used as the limit: a step that outgrows it is OOM-killed instead of starving its node."""
    gpus: int = Field(default=0, ge=0)
    accelerator: str = "nvidia.com/gpu"
    """The extended resource name GPUs are requested under."""


class Toleration(Section):
    key: str | None = None
    operator: Literal["Equal", "Exists"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None


class Placement(Section):
    """Resources and scheduling of one kind of pod."""

    resources: Resources = Field(default_factory=Resources)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)


class VolumeClaim(Section):
    claim: Name
    """An existing PersistentVolumeClaim in the pipeline's namespace (data files, model cache)."""
    mount_path: str = Field(default="/data", pattern=r"^/")


class SecretEnv(Section):
    name: Name
    """A Secret in the pipeline's namespace."""
    env: dict[str, str] = Field(
        default_factory=lambda: {
            "MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
            "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD",
            "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
        }
    )
    """Secret key -> environment variable of the steps that talk to MLflow."""


class RayJobSection(Section):
    """A KubeRay RayJob for training on several GPU nodes (see `kftune.kube.rayjob`)."""

    enabled: bool = False
    """The pipeline's train step hands training to a RayJob (needs `cluster.volume`, ReadWriteMany for several nodes)."""
    image: str | None = None
    """Empty: the trainer image of this kftune version."""
    nodes: int = Field(default=1, ge=1)
    """Worker pods; Ray Train runs `gpus_per_node` workers on each."""
    worker: Resources = Field(default_factory=lambda: Resources(cpu="8", memory="64Gi", gpus=1))
    head: Resources = Field(default_factory=lambda: Resources(cpu="2", memory="8Gi"))
    shutdown_after_finishes: bool = True
    """Delete the RayCluster when the job ends (GPU nodes are expensive to leave idle)."""
    ttl_seconds_after_finished: int = Field(default=600, ge=0)
    """Seconds the finished cluster (and its logs) lives before KubeRay deletes it."""
    active_deadline_seconds: int | None = Field(default=None, ge=1)
    """The RayJob fails when it runs longer than this."""
    backoff_limit: int = Field(default=0, ge=0)
    """KubeRay retries a failed Ray job this many times, each on a new RayCluster."""
    submission_mode: Literal["K8sJobMode", "HTTPMode"] = "K8sJobMode"
    """K8sJobMode: a submitter Job runs `ray job submit` and its log is streamed; HTTPMode: KubeRay submits over HTTP (no submitter pod, no log to stream)."""
    delete_after_follow: bool = False
    """`kftune` deletes the RayJob object once it has followed it to the end."""

    def ray_workers(self, trials: int = 1) -> int:
        """Ray Train workers on the cluster: one per GPU (one per node without GPUs), shared by a sweep's `trials` at once."""
        return self.nodes * max(self.worker.gpus, 1) // trials


class RetrySection(Section):
    """KFP retries of the steps that talk to other services (KFP's set_retry); backoff doubles up to its maximum."""

    train_step: int = Field(default=2, ge=0)
    """A retried train step re-attaches to its running or succeeded RayJob and replaces a failed one."""
    register_step: int = Field(default=3, ge=0)
    backoff_seconds: int = Field(default=60, ge=0)
    backoff_factor: float = Field(default=2.0, ge=1.0)
    max_backoff_seconds: int = Field(default=3600, ge=1)


class ClusterSection(Section):
    namespace: Name = "kubeflow"
    steps: Placement = Field(default_factory=Placement)
    """fingerprint_data, prepare_data, build_prompts, register."""
    train: Placement = Field(default_factory=lambda: Placement(resources=Resources(cpu="4", memory="16Gi")))
    evaluate: Placement = Field(default_factory=lambda: Placement(resources=Resources(cpu="2", memory="8Gi")))
    """The evaluate step, which runs in the trainer image: give it GPUs (`resources.gpus`) for a model that only fits there."""
    volume: VolumeClaim | None = None
    """Mounted into every step."""
    mlflow_secret: SecretEnv | None = None
    """Credentials for the MLflow server and its artifact store, as env vars of the register step."""
    image_pull_secrets: list[Name] = Field(default_factory=list)
    rayjob: RayJobSection = Field(default_factory=RayJobSection)
    retries: RetrySection = Field(default_factory=RetrySection)
    run_as_user: int = Field(default=1000, ge=1)
    """The uid every pod runs as (the images' user); pods run as non-root under the "restricted" Pod Security Standard."""


def with_volume_claim(config: dict, claim: str) -> dict:
    """The run config (as a dict) with `cluster.volume.claim` set to `claim`, when it has a volume and `claim` is not empty."""
    cluster = config.get("cluster") or {}
    if not claim or not cluster.get("volume"):
        return config
    return {**config, "cluster": {**cluster, "volume": {**cluster["volume"], "claim": claim}}}
