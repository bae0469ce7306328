"""The chart and the RayJob follower against a real Kubernetes API server (kube-apiserver 1.20 + etcd,
`scripts/kube-apiserver.sh`; `make k8s-e2e` builds them and runs this file). There is no kubelet,
scheduler, controller or KubeRay operator: objects are validated, defaulted, stored and authorized,
nothing runs. So the post-install hook is created by hand (it would wait forever for a Job that
never completes) and KubeRay's status updates are made through the status subresource.

Skips when the binaries are not built (.cache/k8s/bin) or helm is missing."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from kubernetes import client as k8s, config as kube_config, dynamic, watch
from kubernetes.client.exceptions import ApiException
from kubernetes.config import kube_config as kubeconfig_loader

from conftest import REPO, needs_cluster_tool, wait_for_api_server_build
from kftune.config import parse_config
from kftune.errors import KftuneError
from kftune.kube.rayjob import GROUP, PLURAL, VERSION, KubernetesRayJobApi, build_rayjob, run_rayjob

BIN = Path(os.environ.get("KFTUNE_K8S_CACHE", REPO / ".cache" / "k8s")) / "bin"
SCRIPT = REPO / "scripts" / "kube-apiserver.sh"
HELM = REPO / ".cache" / "tools" / "helm"
CHART = REPO / "charts" / "kftune"
CRDS = REPO / "tests" / "fixtures" / "crds"
NAMESPACE, RELEASE = "kftune-e2e", "kftune"
PROFILE = "team-a"  # a multi-user Kubeflow profile namespace: runs as its `default-editor`
KFP_RBAC = REPO / "tests" / "fixtures" / "kfp-rbac"
PUBLISHER = f"system:serviceaccount:{NAMESPACE}:{RELEASE}"
RUNNER = f"system:serviceaccount:{NAMESPACE}:pipeline-runner"
EDITOR = f"system:serviceaccount:{PROFILE}:default-editor"


@pytest.fixture(autouse=True, scope="module")
def api_server_and_helm_built():
    wait_for_api_server_build()
    needs_cluster_tool(
        not (BIN / "kube-apiserver").exists() or not (BIN / "etcd").exists() or not HELM.exists(),
        "no API server binaries or helm: `make k8s-e2e` builds them (scripts/kube-apiserver.sh build) and runs this file",
    )


# What the chart's Role adds to the run's account for the train step, and nothing more: RayJobs, pods and pods/log.
GRANTED = {
    ("ray.io", "rayjobs", ""): {"create", "get", "list", "watch", "delete"},
    ("", "pods", ""): {"get", "list", "watch"},
    ("", "pods", "log"): {"get"},
}
# What every step pod's account must be allowed: Argo's emissary executor reports outputs (its documented minimum,
# tests/fixtures/kfp-rbac/argo-emissary-executor-role.yaml), and kftune's train step follows its RayJob.
RUN_NEEDS = {("argoproj.io", "workflowtaskresults", ""): {"create", "patch"}, **GRANTED}
# The Kubeflow Pipelines API calls of `kftune schedule` (kftune.kube.kfp_server.schedule), as multi-user KFP authorizes them.
SCHEDULE_CALLS = {
    ("pipelines.kubeflow.org", "pipelines", ""): {"get", "list", "create"},
    ("pipelines.kubeflow.org", "pipelines", "versions"): {"get", "list", "create"},
    ("pipelines.kubeflow.org", "experiments", ""): {"get", "list", "create"},
    ("pipelines.kubeflow.org", "jobs", ""): {"get", "list", "create", "delete"},
}
VERBS = ("get", "list", "watch", "create", "update", "patch", "delete", "deletecollection")
PROBED = [
    *GRANTED,
    ("ray.io", "rayjobs", "status"),
    ("ray.io", "rayclusters", ""),
    ("", "pods", "exec"),
    ("", "secrets", ""),
    ("", "configmaps", ""),
    ("", "serviceaccounts", "token"),
    ("batch", "jobs", ""),
    ("rbac.authorization.k8s.io", "roles", ""),
    ("argoproj.io", "workflowtaskresults", ""),
    ("argoproj.io", "workflows", ""),
    *SCHEDULE_CALLS,
    ("pipelines.kubeflow.org", "runs", ""),
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The running API server: its admin kubeconfig and client."""
    state = tmp_path_factory.mktemp("apiserver")
    done = subprocess.run(["bash", str(SCRIPT), "start", str(state)], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    print(done.stdout.strip())
    try:
        kubeconfig = state / "kubeconfig"
        admin = kube_config.new_client_from_config(config_file=str(kubeconfig))
        k8s.CoreV1Api(admin).create_namespace({"metadata": {"name": NAMESPACE}})
        yield {"state": state, "kubeconfig": kubeconfig, "admin": admin}
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", str(state)], timeout=60)


def without_empty_string_defaults(schema):
    """The CRD less its `default: ""` entries (on object names; controller-gen writes them for Kubernetes >= 1.30
    types): API server 1.20 reads an empty-string default as null and rejects the CRD. A list-map key needs a
    default or `required` there, so those keys become required. Only names left out lose their default."""
    if isinstance(schema, list):
        return [without_empty_string_defaults(value) for value in schema]
    if not isinstance(schema, dict):
        return schema
    kept = {
        key: without_empty_string_defaults(value)
        for key, value in schema.items()
        if not (key == "default" and value == "")
    }
    keys = [
        key
        for key in schema.get("x-kubernetes-list-map-keys", [])
        if schema["items"]["properties"][key].get("default") == ""
    ]
    if keys:
        kept["items"]["required"] = sorted({*kept["items"].get("required", []), *keys})
    return kept


@pytest.fixture(scope="module")
def crds(cluster):
    """The KubeRay CRDs of tests/fixtures/crds, created and Established."""
    extensions = k8s.ApiextensionsV1Api(cluster["admin"])
    for file in ("ray.io_rayjobs.yaml", "ray.io_rayclusters.yaml"):
        crd = yaml.load((CRDS / file).read_text(), Loader=yaml.CSafeLoader)
        extensions.create_custom_resource_definition(without_empty_string_defaults(crd))
    for name in ("rayjobs.ray.io", "rayclusters.ray.io"):
        stream = watch.Watch()
        for event in stream.stream(
            extensions.list_custom_resource_definition, field_selector=f"metadata.name={name}", timeout_seconds=30
        ):
            conditions = {c.type: c.status for c in event["object"].status.conditions or []}
            if conditions.get("Established") == "True":
                stream.stop()
        assert {c.type: c.status for c in extensions.read_custom_resource_definition(name).status.conditions}[
            "Established"
        ] == "True"


def helm(cluster, *args: str) -> str:
    done = subprocess.run(
        [str(HELM), "--kubeconfig", str(cluster["kubeconfig"]), *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def create(cluster, document: dict, namespace: str | None = None) -> None:
    """Create one manifest of any kind through the dynamic client."""
    resource = dynamic.DynamicClient(cluster["admin"]).resources.get(
        api_version=document["apiVersion"], kind=document["kind"]
    )
    resource.create(body=document, namespace=namespace)


def aggregate_cluster_roles(cluster) -> None:
    """What kube-controller-manager's clusterrole-aggregation controller does (it does not run here): a ClusterRole
    with an aggregationRule gets the rules of every ClusterRole its selectors match, repeated until nothing changes."""
    api = k8s.RbacAuthorizationV1Api(cluster["admin"])
    changed = True
    while changed:
        changed = False
        roles = api.list_cluster_role().items
        for role in roles:
            if not role.aggregation_rule:
                continue
            selectors = [s.match_labels or {} for s in role.aggregation_rule.cluster_role_selectors]
            rules = [
                cluster["admin"].sanitize_for_serialization(rule)
                for other in roles
                if other.metadata.name != role.metadata.name
                and any(selector.items() <= (other.metadata.labels or {}).items() for selector in selectors)
                for rule in other.rules or []
            ]
            unique = [rule for i, rule in enumerate(rules) if rule not in rules[:i]]
            if unique != [cluster["admin"].sanitize_for_serialization(rule) for rule in role.rules or []]:
                api.patch_cluster_role(role.metadata.name, {"rules": unique})
                changed = True


@pytest.fixture(scope="module")
def kfp_rbac(cluster):
    """Kubeflow Pipelines' upstream RBAC (tests/fixtures/kfp-rbac): standalone KFP's `pipeline-runner` account in
    NAMESPACE; and PROFILE as multi-user Kubeflow sets up a profile namespace: `default-editor` bound to the
    ClusterRole kubeflow-edit (here a stand-in aggregating only the pipelines roles, as kubeflow/manifests'
    kubeflow-edit aggregates them) and to Argo's documented minimum for the emissary executor."""
    core = k8s.CoreV1Api(cluster["admin"])
    for namespace in (PROFILE, "elsewhere"):
        core.create_namespace({"metadata": {"name": namespace}})
    for file in ("pipeline-runner-sa-and-binding.yaml", "pipeline-runner-role.yaml"):
        for document in yaml.safe_load_all((KFP_RBAC / file).read_text()):
            create(cluster, document, NAMESPACE)
    for document in yaml.safe_load_all((KFP_RBAC / "multi-user-view-edit-roles.yaml").read_text()):
        create(cluster, document)
    create(
        cluster,
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "kubeflow-edit"},
            "rules": [],
            "aggregationRule": {
                "clusterRoleSelectors": [
                    {"matchLabels": {"rbac.authorization.kubeflow.org/aggregate-to-kubeflow-edit": "true"}}
                ]
            },
        },
    )
    aggregate_cluster_roles(cluster)
    create(cluster, yaml.safe_load((KFP_RBAC / "argo-emissary-executor-role.yaml").read_text()), PROFILE)
    core.create_namespaced_service_account(PROFILE, {"metadata": {"name": "default-editor"}})
    editor = [{"kind": "ServiceAccount", "name": "default-editor", "namespace": PROFILE}]
    for name, kind in (("default-editor", "ClusterRole"), ("executor", "Role")):
        role = "kubeflow-edit" if kind == "ClusterRole" else name
        create(
            cluster,
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": {"name": name},
                "subjects": editor,
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": role},
            },
            PROFILE,
        )


@pytest.fixture(scope="module")
def release(cluster, crds, kfp_rbac, tmp_path_factory):
    """The chart installed without its hooks, next to the upstream RBAC: as shipped in NAMESPACE (standalone KFP),
    and with `runServiceAccount=default-editor` in the profile PROFILE. Each hook Job rendered and created separately.

    The chart says kubeVersion >=1.27 and the only API server buildable offline is 1.20, so the installed
    copy differs from charts/kftune in that one line; every object is otherwise as shipped."""
    chart = tmp_path_factory.mktemp("chart") / "kftune"
    shutil.copytree(CHART, chart)
    meta = yaml.safe_load((chart / "Chart.yaml").read_text())
    (chart / "Chart.yaml").write_text(yaml.safe_dump({**meta, "kubeVersion": ">=1.20.0-0"}))
    hooks = {}
    for namespace, values in (
        (NAMESPACE, []),
        (PROFILE, ["--set", "runServiceAccount=default-editor", "--set", f"kfp.namespace={PROFILE}"]),
    ):
        helm(cluster, "install", RELEASE, str(chart), "--namespace", namespace, "--no-hooks", *values)
        hooks[namespace] = yaml.safe_load(
            helm(
                cluster,
                "template",
                RELEASE,
                str(chart),
                "--namespace",
                namespace,
                *values,
                "--show-only",
                "templates/publish-job.yaml",
            )
        )
        k8s.BatchV1Api(cluster["admin"]).create_namespaced_job(namespace, hooks[namespace])
    return {"chart": chart, "hooks": hooks}


def manifest_objects(cluster) -> list[dict]:
    return [
        doc for doc in yaml.safe_load_all(helm(cluster, "get", "manifest", RELEASE, "--namespace", NAMESPACE)) if doc
    ]


def read(cluster, obj: dict):
    """GET the object named by a manifest, through the dynamic client (any kind)."""
    resource = dynamic.DynamicClient(cluster["admin"]).resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
    return resource.get(name=obj["metadata"]["name"], namespace=NAMESPACE).to_dict()


def test_the_installed_release_has_every_object_of_the_chart(cluster, release):
    status = yaml.safe_load(helm(cluster, "status", RELEASE, "--namespace", NAMESPACE, "--output", "yaml"))
    assert status["info"]["status"] == "deployed"
    objects = manifest_objects(cluster)
    kinds = sorted(f"{o['kind']}/{o['metadata']['name']}" for o in objects)
    assert kinds == sorted(
        [
            "ConfigMap/kftune-pipeline",
            "Deployment/kftune-mlflow",
            "Role/kftune-train",
            "RoleBinding/kftune-train",
            "Secret/kftune-postgres",
            "Service/kftune-mlflow",
            "Service/kftune-postgres",
            "ServiceAccount/kftune",
            "StatefulSet/kftune-postgres",
            "Role/kftune-publish",
            "RoleBinding/kftune-publish",
        ]
    ), kinds
    for obj in objects:
        stored = read(cluster, obj)
        assert stored["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE
        assert stored["metadata"]["annotations"]["meta.helm.sh/release-name"] == RELEASE
    pipeline = read(cluster, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "kftune-pipeline"}})
    assert pipeline["data"]["pipeline.yaml"] == (CHART / "files" / "pipeline.yaml").read_text().rstrip("\n")
    assert (
        len(
            read(cluster, {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "kftune-postgres"}})["data"][
                "password"
            ]
        )
        > 0
    )


def test_the_hook_job_is_accepted_as_rendered(cluster, release):
    job = k8s.BatchV1Api(cluster["admin"]).read_namespaced_job("kftune-publish", NAMESPACE)
    assert job.spec.template.spec.service_account_name == RELEASE
    assert job.spec.ttl_seconds_after_finished == 86400
    assert job.spec.template.spec.containers[0].args[:3] == ["kftune", "schedule", "/etc/kftune/pipeline.yaml"]
    projected = [v for v in job.spec.template.spec.volumes if v.projected]
    assert projected[0].projected.sources[0].service_account_token.audience == "pipelines.kubeflow.org"
    assert job.status.succeeded is None, "nothing runs Jobs here: the hook was created, not executed"


def allowed(cluster, user: str, namespace: str, group: str, resource: str, subresource: str, verb: str) -> bool:
    """SubjectAccessReview for a ServiceAccount `user` (system:serviceaccount:NS:NAME) with the groups its tokens carry."""
    account_namespace = user.split(":")[2]
    review = k8s.AuthorizationV1Api(cluster["admin"]).create_subject_access_review(
        {
            "spec": {
                "user": user,
                "groups": [
                    "system:serviceaccounts",
                    f"system:serviceaccounts:{account_namespace}",
                    "system:authenticated",
                ],
                "resourceAttributes": {
                    "namespace": namespace,
                    "group": group,
                    "resource": resource,
                    "subresource": subresource,
                    "verb": verb,
                },
            },
        }
    )
    return review.status.allowed


def rights(cluster, user: str, namespace: str, probed) -> dict[tuple[str, str, str], set[str]]:
    """(group, resource, subresource) -> the verbs of VERBS the API server allows `user` in `namespace`."""
    return {key: {verb for verb in VERBS if allowed(cluster, user, namespace, *key, verb)} for key in probed}


def run_account(hook: dict) -> str:
    """The ServiceAccount the publish Job's `kftune schedule` names for the recurring run's pods."""
    args = hook["spec"]["template"]["spec"]["containers"][0]["args"]
    (account,) = [arg.split("=", 1)[1] for arg in args if arg.startswith("--service-account=")]
    return account


@pytest.mark.parametrize("namespace", [NAMESPACE, PROFILE], ids=["standalone-kfp", "multi-user-profile"])
def test_scheduled_runs_use_an_account_argo_and_every_step_can_work_as(cluster, release, namespace):
    user = f"system:serviceaccount:{namespace}:{run_account(release['hooks'][namespace])}"
    found = rights(cluster, user, namespace, RUN_NEEDS)
    missing = {key: needed - found[key] for key, needed in RUN_NEEDS.items() if needed - found[key]}
    assert not missing, f"{user} cannot do what a step pod needs: {missing}"
    assert not any(rights(cluster, user, "elsewhere", RUN_NEEDS).values()), "nothing outside its own namespace"


def test_the_chart_adds_exactly_the_train_role_to_the_runs_account(cluster, release):
    """In the profile, default-editor holds Kubeflow's editor rights (pipelines.kubeflow.org), Argo's executor minimum and the chart's Role."""
    found = {key: verbs for key, verbs in rights(cluster, EDITOR, PROFILE, PROBED).items() if verbs}
    kubernetes_api = {
        key: verbs for key, verbs in found.items() if key[0] not in ("pipelines.kubeflow.org", "argoproj.io")
    }
    assert kubernetes_api == GRANTED
    assert found[("argoproj.io", "workflowtaskresults", "")] == {"create", "patch"}


def test_the_publish_account_may_call_exactly_what_kftune_schedule_calls(cluster, release):
    for namespace in (NAMESPACE, PROFILE):
        user = f"system:serviceaccount:{namespace}:{RELEASE}"
        found = {key: verbs for key, verbs in rights(cluster, user, namespace, PROBED).items() if verbs}
        assert found == SCHEDULE_CALLS, f"{user}: {found}"
        assert not any(rights(cluster, user, "elsewhere", SCHEDULE_CALLS).values()), (
            "a Role: nothing outside the release's namespace"
        )
    editor = rights(cluster, EDITOR, PROFILE, SCHEDULE_CALLS)
    assert all(verbs <= editor[key] for key, verbs in SCHEDULE_CALLS.items()), (
        f"each call must be one Kubeflow grants a profile's editors (upstream kubeflow-pipeline-edit/view): {editor}"
    )


@pytest.fixture(scope="module")
def as_service_account(cluster, release, tmp_path_factory):
    """A kubeconfig holding a real token (TokenRequest) of the account the train pod runs as: standalone KFP's pipeline-runner."""
    token = (
        k8s.CoreV1Api(cluster["admin"])
        .create_namespaced_service_account_token(
            "pipeline-runner",
            NAMESPACE,
            {"spec": {"audiences": ["https://kubernetes.default.svc"], "expirationSeconds": 3600}},
        )
        .status.token
    )
    config = yaml.safe_load(cluster["kubeconfig"].read_text())
    config["users"] = [{"name": "admin", "user": {"token": token}}]
    path = tmp_path_factory.mktemp("sa") / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return path


def test_the_service_account_token_authenticates_and_sees_its_own_limits(as_service_account):
    api = kube_config.new_client_from_config(config_file=str(as_service_account))
    review = k8s.AuthorizationV1Api(api).create_self_subject_rules_review({"spec": {"namespace": NAMESPACE}})
    rules = {(tuple(r.api_groups or []), tuple(r.resources or [])): set(r.verbs) for r in review.status.resource_rules}
    assert rules[(("ray.io",), ("rayjobs",))] == GRANTED[("ray.io", "rayjobs", "")]
    with pytest.raises(ApiException) as denied:
        k8s.CoreV1Api(api).list_namespaced_secret(NAMESPACE)
    assert denied.value.status == 403


@pytest.fixture
def follower(as_service_account, crds, monkeypatch):
    """KubernetesRayJobApi as the train pod builds it, authenticated as the run's service account
    (out of a cluster it reads the default kubeconfig: pointed at the service account's)."""
    monkeypatch.setattr(kubeconfig_loader, "KUBE_CONFIG_DEFAULT_LOCATION", str(as_service_account))
    return KubernetesRayJobApi()


def rayjob_manifest(make_config, run_name: str) -> dict:
    config = parse_config(
        make_config(
            cluster={
                "namespace": NAMESPACE,
                "volume": {"claim": "kftune-data", "mount_path": "/data"},
                "image_pull_secrets": ["ghcr"],
                "train": {
                    "node_selector": {"pool": "gpu"},
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                },
                "rayjob": {"enabled": True, "nodes": 2, "worker": {"gpus": 4}, "active_deadline_seconds": 7200},
            }
        )
    )
    return build_rayjob(config, run_name, f"/data/kftune-runs/{run_name}")


def kept(sent, stored) -> list[str]:
    """Paths of what was sent and is not stored as sent (the API server prunes fields its schema does not know)."""
    if isinstance(sent, dict):
        if not isinstance(stored, dict):
            return ["(type)"]
        return [
            f".{key}{path}"
            for key, value in sent.items()
            for path in (kept(value, stored[key]) if key in stored else [" pruned"])
        ]
    if isinstance(sent, list):
        if not isinstance(stored, list) or len(stored) != len(sent):
            return ["(list)"]
        return [f"[{i}]{path}" for i, (a, b) in enumerate(zip(sent, stored, strict=False)) for path in kept(a, b)]
    return [] if sent == stored else [f" {sent!r} != {stored!r}"]


def set_status(cluster, name: str, status: dict) -> None:
    """What KubeRay would do: write the RayJob's status through its status subresource."""
    k8s.CustomObjectsApi(cluster["admin"]).patch_namespaced_custom_object_status(
        GROUP, VERSION, NAMESPACE, PLURAL, name, {"status": status}
    )


def test_the_rayjob_the_train_step_builds_is_accepted_whole(cluster, follower, make_config):
    manifest = rayjob_manifest(make_config, "accepted-whole")
    assert follower.create(copy.deepcopy(manifest)) is True
    stored = k8s.CustomObjectsApi(cluster["admin"]).get_namespaced_custom_object(
        GROUP, VERSION, NAMESPACE, PLURAL, "accepted-whole"
    )
    assert kept(manifest["spec"], stored["spec"]) == [], "the CRD schema pruned or changed fields kftune sets"
    assert kept(manifest["metadata"]["labels"], stored["metadata"]["labels"]) == []
    follower.delete(NAMESPACE, "accepted-whole")


def test_the_server_validates_rayjobs_against_the_crd_schema(follower, make_config):
    manifest = rayjob_manifest(make_config, "invalid")
    manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "two"
    with pytest.raises(ApiException) as rejected:
        follower.create(manifest)
    assert rejected.value.status == 422 and "replicas" in rejected.value.body


def test_the_follower_reports_success_and_cleans_up(cluster, follower, make_config):
    manifest, lines = rayjob_manifest(make_config, "succeeds"), []

    def operator_runs_it(seconds):
        set_status(
            cluster,
            "succeeds",
            {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}
            if len(lines) < 3
            else {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"},
        )

    result = run_rayjob(
        manifest, follower, delete_after=True, poll_seconds=0, echo=lines.append, sleep=operator_runs_it
    )
    assert result.succeeded and lines[0] == f"kftune: created RayJob {NAMESPACE}/succeeds"
    assert (
        "kftune: RayJob succeeds: Running, Ray job RUNNING" in lines
        and lines[-1] == "kftune: RayJob succeeds: Complete, Ray job SUCCEEDED"
    )
    with pytest.raises(ApiException) as gone:
        follower.status(NAMESPACE, "succeeds")
    assert gone.value.status == 404, "delete_after_follow removed the RayJob"


def test_a_retried_step_follows_the_existing_rayjob_and_reports_kuberays_reason(cluster, follower, make_config):
    manifest = rayjob_manifest(make_config, "retried")
    assert follower.create(copy.deepcopy(manifest)) is True
    lines = []

    def operator_gives_up(seconds):
        set_status(
            cluster,
            "retried",
            {
                "jobDeploymentStatus": "Failed",
                "jobStatus": "FAILED",
                "reason": "DeadlineExceeded",
                "message": "The RayJob has passed the activeDeadlineSeconds.",
            },
        )

    with pytest.raises(KftuneError) as failed:
        run_rayjob(manifest, follower, delete_after=False, poll_seconds=0, echo=lines.append, sleep=operator_gives_up)
    assert lines[0] == f"kftune: following the existing RayJob {NAMESPACE}/retried (New, Ray job PENDING)"
    assert str(failed.value) == (
        f"RayJob {NAMESPACE}/retried failed: Failed (DeadlineExceeded), Ray job FAILED: "
        "The RayJob has passed the activeDeadlineSeconds."
    )
    assert follower.status(NAMESPACE, "retried")["jobDeploymentStatus"] == "Failed", (
        "delete_after_follow off: the RayJob stays"
    )
    assert follower.submitter_log(NAMESPACE, "retried") is None, "no submitter pod exists without KubeRay"


def test_a_retried_step_replaces_a_failed_rayjob_and_follows_the_new_one(cluster, follower, make_config):
    manifest, lines = rayjob_manifest(make_config, "failed-once"), []
    assert follower.create(copy.deepcopy(manifest)) is True
    set_status(
        cluster,
        "failed-once",
        {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "reason": "AppFailed", "message": "exit 1"},
    )
    first_uid = follower.get(NAMESPACE, "failed-once")["metadata"]["uid"]

    def operator_runs_the_new_one(seconds):
        set_status(cluster, "failed-once", {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"})

    result = run_rayjob(
        manifest, follower, delete_after=False, poll_seconds=0, echo=lines.append, sleep=operator_runs_the_new_one
    )
    assert result.succeeded
    assert lines[:2] == [
        f"kftune: replacing the existing RayJob {NAMESPACE}/failed-once: it failed: Failed (AppFailed), Ray job FAILED: exit 1",
        f"kftune: created RayJob {NAMESPACE}/failed-once",
    ]
    assert follower.get(NAMESPACE, "failed-once")["metadata"]["uid"] != first_uid, "a new RayJob, not the failed one"
    assert follower.get(NAMESPACE, "no-such-rayjob") is None
