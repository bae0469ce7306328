"""With CI=true the cluster tests cannot be skipped: a failed helm or API-server setup fails `make test`
(its cluster-tools target), and so does a test that would skip for lack of them (conftest.needs_cluster_tool)."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO


def run(command: list[str], ci: bool, **env: str) -> subprocess.CompletedProcess:
    environment = (
        {key: value for key, value in os.environ.items() if key != "CI"} | env | ({"CI": "true"} if ci else {})
    )
    return subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=600)


def test_make_fails_in_ci_when_helm_or_the_api_server_cannot_be_set_up():
    make = ["make", "--no-print-directory", "cluster-tools"]
    no_helm = run(
        make, ci=True, KFTUNE_TOOLS="/dev/null/tools"
    )  # mkdir fails: install-helm.sh cannot put helm anywhere
    assert no_helm.returncode != 0 and "helm not installed" in no_helm.stdout, no_helm.stdout + no_helm.stderr
    no_api_server = run(make, ci=True, KFTUNE_K8S_CACHE="/dev/null/k8s")
    assert no_api_server.returncode != 0 and "no kube-apiserver" in no_api_server.stdout, (
        no_api_server.stdout + no_api_server.stderr
    )
    outside_ci = run(make, ci=False, KFTUNE_K8S_CACHE="/dev/null/k8s")
    assert outside_ci.returncode == 0 and "tests/test_kube_apiserver.py will skip" in outside_ci.stdout, (
        outside_ci.stdout + outside_ci.stderr
    )


def test_the_api_server_tests_fail_in_ci_and_skip_elsewhere_without_the_binaries():
    pytest_file = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "tests/test_kube_apiserver.py",
        "-k",
        "hook_job",
    ]
    in_ci = run(pytest_file, ci=True, KFTUNE_K8S_CACHE="/dev/null/k8s")
    assert in_ci.returncode == 1 and "CI=true: no API server binaries" in in_ci.stdout, in_ci.stdout
    elsewhere = run(pytest_file, ci=False, KFTUNE_K8S_CACHE="/dev/null/k8s")
    assert elsewhere.returncode == 0 and "1 skipped" in elsewhere.stdout, elsewhere.stdout
