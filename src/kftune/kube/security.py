"""The security settings of every pod kftune produces, so that each is admitted in a namespace enforcing the
"restricted" Pod Security Standard (https://kubernetes.io/docs/concepts/security/pod-security-standards/#restricted):
non-root, the runtime's default seccomp profile, every capability dropped, no privilege escalation."""

from __future__ import annotations

from typing import Any

SHARED_MEMORY_VOLUME = "dshm"
"""A memory-backed emptyDir at /dev/shm: NCCL and Ray's object store exchange data between the processes of a
multi-GPU pod there, and a container runtime's default /dev/shm is 64 MiB."""


def pod_security_context(uid: int) -> dict[str, Any]:
    """The pod-level settings; fsGroup lets the non-root user write the mounted volume."""
    return {"runAsNonRoot": True, "runAsUser": uid, "fsGroup": uid, "seccompProfile": {"type": "RuntimeDefault"}}


def container_security_context() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True}


def shared_memory(gpus: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, mounts) giving a pod with more than one GPU a memory-backed /dev/shm; none for one GPU or none."""
    if gpus <= 1:
        return [], []
    return [{"name": SHARED_MEMORY_VOLUME, "emptyDir": {"medium": "Memory"}}], [
        {"name": SHARED_MEMORY_VOLUME, "mountPath": "/dev/shm"}
    ]
