"""Publish the compiled pipeline to a Kubeflow Pipelines server and start it: `kftune submit` (one run)
and `kftune schedule` (a recurring run). Both upload the package as a pipeline version named after
kftune's version and the package's content hash, so re-running either is idempotent."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kftune import __version__
from kftune.errors import KftuneError

PIPELINE_NAME = "kftune"


@dataclass(frozen=True)
class Published:
    pipeline_id: str
    version_id: str
    version_name: str
    experiment_id: str


def package_digest(package: Path) -> str:
    """sha256 of the package's documents as canonical JSON: KFP's header comment lists dict keys in random order."""
    documents = list(yaml.safe_load_all(package.read_text(encoding="utf-8")))
    return hashlib.sha256(json.dumps(documents, sort_keys=True).encode()).hexdigest()


def version_name(package: Path) -> str:
    """`<kftune version>-<package digest, 12 hex>`: the same pipeline maps to the same version."""
    return f"{__version__}-{package_digest(package)[:12]}"


def kfp_cron(expression: str) -> str:
    """KFP wants six cron fields (seconds first); accept the usual five and prepend second 0."""
    fields = expression.split()
    if len(fields) == 5:
        fields.insert(0, "0")
    if len(fields) != 6 or not all(re.fullmatch(r"[0-9*/,\-?A-Za-z]+", field) for field in fields):
        raise KftuneError(f"--cron {expression!r}: expected 5 fields (minute hour day month weekday), e.g. '0 3 * * *'")
    return " ".join(fields)


def _all(list_call, items_attr: str, **kwargs) -> list:
    found, token = [], ""
    while True:
        page = list_call(page_token=token, page_size=100, **kwargs)
        found.extend(getattr(page, items_attr) or [])
        token = page.next_page_token
        if not token:
            return found


def publish(client: Any, package: Path, experiment: str, namespace: str | None = None) -> Published:
    """Upload `package` as a version of pipeline `kftune` (creating the pipeline the first time) and ensure the experiment."""
    name = version_name(package)
    pipeline_id = client.get_pipeline_id(PIPELINE_NAME)
    if pipeline_id is None:
        pipeline_id = client.upload_pipeline(
            str(package), pipeline_name=PIPELINE_NAME, description="kftune fine-tuning pipeline", namespace=namespace
        ).pipeline_id
    versions = {
        v.display_name: v.pipeline_version_id
        for v in _all(client.list_pipeline_versions, "pipeline_versions", pipeline_id=pipeline_id)
    }
    version_id = (
        versions.get(name)
        or client.upload_pipeline_version(
            str(package), pipeline_version_name=name, pipeline_id=pipeline_id
        ).pipeline_version_id
    )
    experiment_id = client.create_experiment(
        experiment, namespace=namespace
    ).experiment_id  # returns the existing one by name
    return Published(pipeline_id, version_id, name, experiment_id)


ALWAYS_RUNS = ("fingerprint-data",)
"""Tasks never served from cache: their output keys the cache of the tasks after them (`kftune.data.fingerprint`)."""


def with_caching(package: Path, enabled: bool, output: Path) -> Path:
    """A copy of `package` with KFP's cache on or off for every task but ALWAYS_RUNS.

    Caching lives in the pipeline spec: kfp.Client's `enable_caching` only rewrites a package it uploads
    with the run, and is ignored for a run of an uploaded pipeline version, which is how kftune starts runs."""
    documents = list(yaml.safe_load_all(package.read_text(encoding="utf-8")))
    for name, task in documents[0]["root"]["dag"]["tasks"].items():
        task["cachingOptions"] = {"enableCache": True} if enabled and name not in ALWAYS_RUNS else {}
    output.write_text(yaml.safe_dump_all(documents, sort_keys=False), encoding="utf-8")
    return output


def package_default_config(path: Path) -> dict[str, Any] | None:
    """The `config` parameter's default when `path` is a compiled kftune pipeline; None for any other file."""
    try:
        document = next(yaml.safe_load_all(path.read_text(encoding="utf-8")), None)
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(document, dict) or "pipelineInfo" not in document:
        return None
    try:
        return document["root"]["inputDefinitions"]["parameters"]["config"]["defaultValue"]
    except KeyError:
        raise KftuneError(
            f"{path}: a pipeline package without a `config` parameter default; compile it with `kftune compile`"
        ) from None


def submit(
    client: Any,
    package: Path,
    experiment: str,
    run_name: str,
    params: dict | None = None,
    namespace: str | None = None,
    service_account: str | None = None,
) -> str:
    """Publish and start one run; returns the run id."""
    published = publish(client, package, experiment, namespace)
    run = client.run_pipeline(
        published.experiment_id,
        run_name,
        pipeline_id=published.pipeline_id,
        version_id=published.version_id,
        params=params,
        service_account=service_account,
    )
    return run.run_id


def schedule(
    client: Any,
    package: Path,
    experiment: str,
    job_name: str,
    cron: str,
    params: dict | None = None,
    namespace: str | None = None,
    service_account: str | None = None,
) -> str:
    """Publish and create the recurring run `job_name`, replacing one of that name (KFP cannot edit one in place)."""
    cron = kfp_cron(cron)
    published = publish(client, package, experiment, namespace)
    for old in _all(client.list_recurring_runs, "recurring_runs", experiment_id=published.experiment_id):
        if old.display_name == job_name:
            client.delete_recurring_run(old.recurring_run_id)
    created = client.create_recurring_run(
        published.experiment_id,
        job_name,
        description=f"kftune {published.version_name}",
        cron_expression=cron,
        max_concurrency=1,
        no_catchup=True,
        pipeline_id=published.pipeline_id,
        version_id=published.version_id,
        params=params,
        service_account=service_account,
    )
    return created.recurring_run_id


def connect(host: str, namespace: str | None = None, token: str | None = None) -> Any:
    """A kfp.Client. `token`: a bearer token (kfp.Client's existing_token); without one, inside a cluster kfp.Client
    sends the pod's projected service-account token (/var/run/secrets/kubeflow/pipelines/token)."""
    from kfp import Client

    try:
        return Client(host=host, namespace=namespace, existing_token=token)
    except (
        TimeoutError
    ):  # without a namespace kfp.Client asks /healthz whether KFP is multi-user, 5 times, then gives up
        status = _healthz_status(host, token)
        raise KftuneError(
            refusal(host, status, "", namespace, token)
            if status in (401, 403)
            else f"Kubeflow Pipelines at {host}: its health check ({HEALTHZ}) failed (HTTP {status})"
        ) from None


HEALTHZ = "/apis/v2beta1/healthz"


def _healthz_status(host: str, token: str | None) -> int | None:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        host.rstrip("/") + HEALTHZ, headers={"Authorization": f"Bearer {token}"} if token else {}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def refusal(host: str, status: int, detail: str, namespace: str | None, token: str | None) -> str:
    """What to pass when Kubeflow Pipelines answers 401 (no accepted credentials) or 403 (not allowed)."""
    said = f": {detail.strip()}" if detail.strip() else ""
    if status == 401:
        missing = (
            "the bearer token given with --token-file was not accepted"
            if token
            else "no credentials were sent: pass a bearer token with --token-file"
        )
        return (
            f"Kubeflow Pipelines at {host} answered 401 Unauthorized{said}. {missing.capitalize()} "
            "(multi-user Kubeflow: e.g. `kubectl -n <profile> create token default-editor --audience=pipelines.kubeflow.org`)."
        )
    hints = [] if namespace else ["--namespace <your profile> (multi-user Kubeflow authorizes per profile namespace)"]
    hints.append(
        "an account allowed pipelines, pipelines/versions, experiments, runs and jobs in pipelines.kubeflow.org there "
        "(a profile's editor is; see docs/kubernetes.md)" + ("" if token else ", its token given with --token-file")
    )
    return f"Kubeflow Pipelines at {host} answered 403 Forbidden{said}. Missing: " + "; ".join(hints) + "."
