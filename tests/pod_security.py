"""The "restricted" Pod Security Standard as a checker of pod specs, written from its published rules:
https://kubernetes.io/docs/concepts/security/pod-security-standards/ (the Baseline controls plus the
Restricted ones, as of Kubernetes 1.31). The API server the tests run (1.20) has no PodSecurity admission,
so the tests apply these rules to every pod spec kftune produces."""

from __future__ import annotations

from typing import Any

BASELINE_CAPABILITIES = {
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
}
RESTRICTED_CAPABILITIES = {"NET_BIND_SERVICE"}
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
CONFINED_SECCOMP = {"RuntimeDefault", "Localhost"}
APPARMOR_ANNOTATION = "container.apparmor.security.beta.kubernetes.io/"


def restricted_violations(pod: dict[str, Any], annotations: dict[str, str] | None = None) -> list[str]:
    """Every rule of the restricted profile that `pod` (a PodSpec) breaks, as `field: rule`; empty when it is admitted."""
    problems: list[str] = []
    pod_context = pod.get("securityContext") or {}
    containers = [
        (f"{kind}[{c['name']}]", c)
        for kind in ("initContainers", "containers", "ephemeralContainers")
        for c in pod.get(kind) or []
    ]
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            problems.append(f"spec.{field}: host namespaces are forbidden")
    for sysctl in pod_context.get("sysctls") or []:
        if sysctl["name"] not in SAFE_SYSCTLS:
            problems.append(f"spec.securityContext.sysctls: {sysctl['name']} is not a safe sysctl")
    for volume in pod.get("volumes") or []:
        kind = next(key for key in volume if key != "name")
        if kind not in RESTRICTED_VOLUMES:
            problems.append(f"spec.volumes[{volume['name']}]: volume type {kind} is not allowed")
    for key, value in (annotations or {}).items():
        if key.startswith(APPARMOR_ANNOTATION) and value != "runtime/default" and not value.startswith("localhost/"):
            problems.append(f"metadata.annotations[{key}]: AppArmor profile {value} is not allowed")
    contexts = [("spec.securityContext", pod_context)] + [
        (f"{where}.securityContext", c.get("securityContext") or {}) for where, c in containers
    ]
    for where, context in contexts:
        problems += _context_violations(where, context)
    for where, container in containers:
        context = container.get("securityContext") or {}
        if context.get("privileged"):
            problems.append(f"{where}.securityContext.privileged: must be unset or false")
        capabilities = context.get("capabilities") or {}
        added = set(capabilities.get("add") or [])
        if added - BASELINE_CAPABILITIES or added - RESTRICTED_CAPABILITIES:
            problems.append(
                f"{where}.securityContext.capabilities.add: only NET_BIND_SERVICE may be added, not {sorted(added - RESTRICTED_CAPABILITIES)}"
            )
        if "ALL" not in (capabilities.get("drop") or []):
            problems.append(f"{where}.securityContext.capabilities.drop: must include ALL")
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}.securityContext.allowPrivilegeEscalation: must be false")
        if context.get("procMount", "Default") != "Default":
            problems.append(f"{where}.securityContext.procMount: must be Default")
        if any(port.get("hostPort") for port in container.get("ports") or []):
            problems.append(f"{where}.ports: hostPort is forbidden")
        if context.get("runAsNonRoot", pod_context.get("runAsNonRoot")) is not True:
            problems.append(f"{where}: runAsNonRoot must be true (in the container or the pod securityContext)")
        seccomp = (context.get("seccompProfile") or pod_context.get("seccompProfile") or {}).get("type")
        if seccomp not in CONFINED_SECCOMP:
            problems.append(
                f"{where}: seccompProfile.type must be RuntimeDefault or Localhost (in the container or the pod), not {seccomp}"
            )
    return problems


def _context_violations(where: str, context: dict[str, Any]) -> list[str]:
    """The rules that apply alike to the pod's and each container's securityContext."""
    problems = []
    if (context.get("windowsOptions") or {}).get("hostProcess"):
        problems.append(f"{where}.windowsOptions.hostProcess: must be unset or false")
    selinux = context.get("seLinuxOptions") or {}
    if selinux.get("type", "") not in SELINUX_TYPES or selinux.get("user") or selinux.get("role"):
        problems.append(f"{where}.seLinuxOptions: custom SELinux user, role or type")
    if (context.get("appArmorProfile") or {}).get("type", "RuntimeDefault") not in CONFINED_SECCOMP:
        problems.append(f"{where}.appArmorProfile.type: must be RuntimeDefault or Localhost")
    if (context.get("seccompProfile") or {}).get("type", "RuntimeDefault") not in CONFINED_SECCOMP:
        problems.append(f"{where}.seccompProfile.type: must be RuntimeDefault or Localhost")
    if context.get("runAsUser") == 0:
        problems.append(f"{where}.runAsUser: must not be 0")
    return problems
