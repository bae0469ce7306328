"""The RayJob manifest is valid against KubeRay's CRD schema; statuses map to outcomes; the
follower's loop against a fake API. The live Kubernetes calls (KubernetesRayJobApi) are untested here."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from conftest import CLUSTER
from kftune.config import parse_config
from kftune.errors import KftuneError
from kftune.kube.rayjob import CONFIG_ENV, build_rayjob, outcome, rayjob_name, run_rayjob, train_on_rayjob
from kftune.local import on_this_machine
from kftune.train import TRAIN_LOG_FILE
from kube_schema import validate_custom_resource

RAYJOB = {
    "nodes": 2,
    "worker": {"cpu": "16", "memory": "128Gi", "gpus": 4},
    "ttl_seconds_after_finished": 300,
    "active_deadline_seconds": 7200,
}


def manifest(make_config, cluster=None, run_name="kftune-run-20261123-060000"):
    config = parse_config(make_config(cluster=cluster or {}))
    return build_rayjob(config, run_name, "/data/kftune-runs/run")


@pytest.mark.parametrize(
    "cluster",
    [
        {},
        {**CLUSTER, "rayjob": RAYJOB},
        {"rayjob": {**RAYJOB, "shutdown_after_finishes": False, "worker": {"gpus": 0}}},
    ],
)
def test_every_built_rayjob_is_valid_against_the_crd(make_config, cluster):
    validate_custom_resource(manifest(make_config, cluster, "Run_With.Odd-Name" * 4), "ray.io_rayjobs.yaml")


def test_a_misspelled_field_fails_the_schema_check(make_config):
    job = manifest(make_config)
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replica"] = 2
    with pytest.raises(jsonschema.ValidationError, match="replica"):
        validate_custom_resource(job, "ray.io_rayjobs.yaml")


def test_worker_group_is_sized_from_the_config_and_the_trainer_sees_one_worker_per_gpu(make_config):
    job = manifest(make_config, {**CLUSTER, "rayjob": RAYJOB})
    spec = job["spec"]
    group = spec["rayClusterSpec"]["workerGroupSpecs"][0]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 2
    worker = group["template"]["spec"]
    assert worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert worker["nodeSelector"] == {"pool": "gpu"} and worker["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "kftune-data"}} in worker["volumes"]
    head = spec["rayClusterSpec"]["headGroupSpec"]
    assert (
        head["rayStartParams"] == {"num-cpus": "0"}
        and "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["requests"]
    )
    assert (spec["shutdownAfterJobFinishes"], spec["ttlSecondsAfterFinished"], spec["activeDeadlineSeconds"]) == (
        True,
        300,
        7200,
    )
    assert spec["entrypoint"] == "python -m kftune.train --work-dir /data/kftune-runs/run"
    env = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    trainer_config = parse_config(yaml.safe_load(env[CONFIG_ENV]))
    assert (trainer_config.train.workers, trainer_config.train.use_gpu, trainer_config.cluster.rayjob.enabled) == (
        8,
        True,
        False,
    )
    assert job["metadata"]["namespace"] == "ml"


def test_an_enabled_rayjob_needs_the_volume_and_a_batch_its_workers_split(make_config):
    with pytest.raises(KftuneError, match=r"cluster.volume: required with cluster.rayjob.enabled"):
        parse_config(make_config(cluster={"rayjob": {"enabled": True}}))
    with pytest.raises(KftuneError, match=r"cluster.rayjob.nodes: 3 nodes give 3 Ray workers"):
        parse_config(make_config(cluster={"rayjob": {"enabled": True, "nodes": 3}, "volume": {"claim": "data"}}))
    with pytest.raises(KftuneError, match=r"train.batch_size: 16 does not split evenly over train.workers=3"):
        manifest(make_config, {"rayjob": {"nodes": 3}})


def test_names_are_valid_rayjob_names():
    assert rayjob_name("My Run/2026_11_23") == "my-run-2026-11-23"
    assert len(rayjob_name("x" * 80)) == 47
    with pytest.raises(KftuneError):
        rayjob_name("___")


@pytest.mark.parametrize(
    ("status", "finished", "succeeded", "words"),
    [
        (None, False, False, "New, Ray job PENDING"),
        ({"jobDeploymentStatus": "Initializing"}, False, False, "Initializing"),
        ({"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}, False, False, "Running, Ray job RUNNING"),
        ({"jobDeploymentStatus": "Retrying", "jobStatus": "FAILED"}, False, False, "Retrying"),
        ({"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}, True, True, "SUCCEEDED"),
        (
            {"jobDeploymentStatus": "Complete", "jobStatus": "STOPPED"},
            True,
            False,
            "Complete (no reason given), Ray job STOPPED",
        ),
        (
            {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "reason": "AppFailed", "message": "exit code 1"},
            True,
            False,
            "Failed (AppFailed), Ray job FAILED: exit code 1",
        ),
        (
            {
                "jobDeploymentStatus": "Failed",
                "reason": "DeadlineExceeded",
                "message": "ran past activeDeadlineSeconds",
            },
            True,
            False,
            "DeadlineExceeded",
        ),
        (
            {"jobDeploymentStatus": "ValidationFailed", "reason": "ValidationFailed", "message": "name too long"},
            True,
            False,
            "name too long",
        ),
    ],
)
def test_status_maps_to_an_outcome_in_kuberays_words(status, finished, succeeded, words):
    result = outcome(status)
    assert (result.finished, result.succeeded) == (finished, succeeded)
    assert words in result.summary


class FakeRayJobApi:
    """Plays back a list of statuses; the log becomes available once the job runs. `existing`: a RayJob already there."""

    def __init__(self, statuses, existing=None):
        self.statuses, self.existing, self.created, self.deleted = list(statuses), existing, None, False

    def create(self, manifest):
        if self.existing is not None or self.created is not None:
            return False
        self.created = manifest
        return True

    def get(self, namespace, name):
        return self.existing

    def status(self, namespace, name):
        return self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]

    def submitter_log(self, namespace, name):
        return iter(["train [#####] 4/4 100%"]) if self.created and len(self.statuses) <= 2 else None

    def delete(self, namespace, name):
        self.deleted, self.existing = True, None


def test_follower_streams_the_log_and_succeeds(make_config):
    api = FakeRayJobApi(
        [
            {"jobDeploymentStatus": "Initializing"},
            {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"},
            {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"},
        ]
    )
    lines = []
    result = run_rayjob(manifest(make_config), api, delete_after=True, echo=lines.append, sleep=lambda s: None)
    assert result.succeeded and api.deleted
    assert lines[0].startswith("kftune: created RayJob kubeflow/kftune-run-")
    assert "train [#####] 4/4 100%" in lines and lines[-1].endswith("Complete, Ray job SUCCEEDED")


SUCCEEDED = {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}
FAILED = {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "reason": "AppFailed", "message": "NCCL timeout"}


@pytest.mark.parametrize("status", [SUCCEEDED, {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}, None])
def test_a_retried_step_follows_its_running_or_succeeded_rayjob(make_config, status):
    job, lines = manifest(make_config), []
    api = FakeRayJobApi([SUCCEEDED], existing={**job, "status": status})
    assert run_rayjob(job, api, delete_after=False, echo=lines.append, sleep=lambda s: None).succeeded
    assert lines[0].startswith("kftune: following the existing RayJob") and not api.deleted and api.created is None


def test_a_retried_step_replaces_a_failed_rayjob_and_trains_again(make_config):
    job, lines = manifest(make_config), []
    api = FakeRayJobApi(
        [{"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}, SUCCEEDED], existing={**job, "status": FAILED}
    )
    assert run_rayjob(job, api, delete_after=False, echo=lines.append, sleep=lambda s: None).succeeded
    assert (
        lines[0]
        == f"kftune: replacing the existing RayJob kubeflow/{job['metadata']['name']}: it failed: Failed (AppFailed), Ray job FAILED: NCCL timeout"
    )
    assert api.deleted and api.created is job and lines[1].startswith("kftune: created RayJob")


def test_a_rayjob_of_another_spec_is_replaced_not_followed(make_config):
    job, other = manifest(make_config), manifest(make_config, {"rayjob": {"nodes": 1, "worker": {"gpus": 2}}})
    assert (
        job["metadata"]["name"] == other["metadata"]["name"]
        and job["metadata"]["labels"] != other["metadata"]["labels"]
    )
    api, lines = FakeRayJobApi([SUCCEEDED], existing={**other, "status": {"jobDeploymentStatus": "Running"}}), []
    run_rayjob(job, api, delete_after=False, echo=lines.append, sleep=lambda s: None)
    assert lines[0].endswith("built from another spec") and api.created is job


def test_kuberays_retry_settings_come_from_the_config(make_config):
    spec = manifest(
        make_config, {"rayjob": {"backoff_limit": 2, "active_deadline_seconds": 3600, "submission_mode": "HTTPMode"}}
    )["spec"]
    assert (spec["backoffLimit"], spec["activeDeadlineSeconds"], spec["submissionMode"]) == (2, 3600, "HTTPMode")
    assert "submitterPodTemplate" not in spec, "HTTPMode has no submitter pod"
    default = manifest(make_config)["spec"]
    assert (default["backoffLimit"], default["submissionMode"]) == (
        0,
        "K8sJobMode",
    ) and "activeDeadlineSeconds" not in default
    assert default["submitterPodTemplate"]["spec"]["restartPolicy"] == "Never"


def test_follower_reports_the_rayjobs_own_reason_and_keeps_it_when_asked(make_config):
    api = FakeRayJobApi(
        [
            {
                "jobDeploymentStatus": "Failed",
                "jobStatus": "FAILED",
                "reason": "AppFailed",
                "message": "CUDA out of memory",
            }
        ]
    )
    with pytest.raises(
        KftuneError, match=r"RayJob kubeflow/.* failed: Failed \(AppFailed\), Ray job FAILED: CUDA out of memory"
    ):
        run_rayjob(manifest(make_config), api, delete_after=False, echo=lambda line: None, sleep=lambda s: None)
    assert not api.deleted


class TrainingFakeRayJobApi(FakeRayJobApi):
    """Also does what the RayJob's trainer would: reads prompts/ and writes model/ in the work folder."""

    def create(self, manifest):
        created = super().create(manifest)
        work = Path(shlex.split(manifest["spec"]["entrypoint"])[4])
        assert (work / "prompts" / "meta.json").is_file()
        (work / "model").mkdir()
        (work / "model" / TRAIN_LOG_FILE).write_text(json.dumps({"steps": 4}))
        return created


def test_train_step_stages_prompts_on_the_volume_and_brings_the_model_back(make_config, tmp_path):
    cluster = {
        "volume": {"claim": "data", "mount_path": str(tmp_path / "volume")},
        "rayjob": {"enabled": True, "delete_after_follow": True},
    }
    config = parse_config(make_config(cluster=cluster))
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "meta.json").write_text("{}")
    api = TrainingFakeRayJobApi([{"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}])
    log = train_on_rayjob(config, prompts, tmp_path / "artifact", "Run 1", api=api, echo=lambda line: None)
    assert log == {"steps": 4} and (tmp_path / "artifact" / TRAIN_LOG_FILE).is_file()
    assert api.created["metadata"]["name"] == "run-1" and api.deleted


def test_kftune_run_trains_on_this_machine_even_with_a_rayjob_configured(make_config):
    config = parse_config(make_config(cluster={"volume": {"claim": "data"}, "rayjob": {"enabled": True}}))
    assert not on_this_machine(config).cluster.rayjob.enabled and on_this_machine(config).cluster.volume.claim == "data"
    retries = on_this_machine(config).cluster.retries  # a local failure shows at once, not after minutes of backoff
    assert (retries.train_step, retries.register_step) == (0, 0) and config.cluster.retries.train_step > 0
