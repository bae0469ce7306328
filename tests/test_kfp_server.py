"""`kftune submit` / `kftune schedule`: argument handling, the package they upload, and their
publish logic against a stand-in for kfp.Client. No KFP server here: the real HTTP calls are untested."""

from __future__ import annotations

import http.server
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import pytest
import yaml
from kfp import components

from conftest import CLUSTER_RUN_CONFIG
from kftune.cli import main
from kftune.kube.kfp_server import kfp_cron, publish, schedule, submit, version_name

EXAMPLE = str(CLUSTER_RUN_CONFIG)


def test_dry_run_writes_the_package_it_would_upload_and_names_its_version(tmp_path, capsys):
    package = tmp_path / "pipeline.yaml"
    assert main(["submit", EXAMPLE, "--host", "http://kfp.invalid", "--dry-run", "--package", str(package)]) == 0
    out = capsys.readouterr().out
    assert components.load_component_from_file(str(package)).name == "kftune"
    assert f"version {version_name(package)}" in out and "nothing sent to http://kfp.invalid" in out
    again = tmp_path / "again.yaml"
    main(
        [
            "schedule",
            EXAMPLE,
            "--host",
            "http://kfp.invalid",
            "--cron",
            "0 3 * * *",
            "--dry-run",
            "--package",
            str(again),
        ]
    )
    assert version_name(again) == version_name(package), "the same config must map to the same pipeline version"


def test_unreachable_server_is_one_error_naming_it(capsys):
    assert main(["submit", EXAMPLE, "--host", "http://127.0.0.1:9"]) == 2
    assert "kftune: error: Kubeflow Pipelines at http://127.0.0.1:9:" in capsys.readouterr().err


def test_host_is_required():
    with pytest.raises(SystemExit) as exit_:
        main(["submit", EXAMPLE])
    assert exit_.value.code == 2


@pytest.mark.parametrize(
    ("given", "expected"),
    [("0 3 * * *", "0 0 3 * * *"), ("30 0 3 * * 1-5", "30 0 3 * * 1-5"), ("*/15 * * * MON", "0 */15 * * * MON")],
)
def test_cron_becomes_kfps_six_fields(given, expected):
    assert kfp_cron(given) == expected


def test_bad_cron_fails_before_compiling(capsys):
    assert main(["schedule", EXAMPLE, "--host", "http://kfp.invalid", "--cron", "daily"]) == 2
    assert "--cron 'daily': expected 5 fields" in capsys.readouterr().err


class FakeKfpClient:
    """The kfp.Client methods kfp_server calls, over in-memory state, returning kfp_server_api-shaped objects."""

    def __init__(self):
        self.pipelines, self.versions, self.experiments, self.runs, self.recurring = {}, {}, {}, [], {}

    def get_pipeline_id(self, name):
        return self.pipelines.get(name)

    def upload_pipeline(self, path, pipeline_name, description=None, namespace=None):
        self.pipelines[pipeline_name] = f"p-{pipeline_name}"
        self.versions[f"p-{pipeline_name}"] = {
            pipeline_name: "v-0"
        }  # KFP makes a first version named like the pipeline
        return SimpleNamespace(pipeline_id=f"p-{pipeline_name}")

    def list_pipeline_versions(self, pipeline_id, page_token="", page_size=10):
        items = [SimpleNamespace(display_name=n, pipeline_version_id=i) for n, i in self.versions[pipeline_id].items()]
        return SimpleNamespace(pipeline_versions=items, next_page_token="")

    def upload_pipeline_version(self, path, pipeline_version_name, pipeline_id):
        components.load_component_from_file(path)  # what is uploaded is loadable IR
        self.uploaded = next(yaml.safe_load_all(Path(path).read_text()))
        version_id = f"v-{len(self.versions[pipeline_id])}"
        self.versions[pipeline_id][pipeline_version_name] = version_id
        return SimpleNamespace(pipeline_version_id=version_id)

    def create_experiment(self, name, namespace=None):
        return SimpleNamespace(experiment_id=self.experiments.setdefault(name, f"e-{name}"))

    def run_pipeline(
        self, experiment_id, job_name, pipeline_id=None, version_id=None, params=None, service_account=None
    ):
        self.runs.append((experiment_id, job_name, version_id, params, service_account))
        return SimpleNamespace(run_id=f"r-{len(self.runs)}")

    def list_recurring_runs(self, page_token="", page_size=10, experiment_id=None):
        items = [SimpleNamespace(display_name=n, recurring_run_id=i) for n, (i, _) in self.recurring.items()]
        return SimpleNamespace(recurring_runs=items, next_page_token="")

    def delete_recurring_run(self, recurring_run_id):
        self.recurring = {n: v for n, v in self.recurring.items() if v[0] != recurring_run_id}

    def create_recurring_run(self, experiment_id, job_name, cron_expression, version_id, **options):
        assert options["max_concurrency"] == 1 and options["no_catchup"] is True
        self.recurring[job_name] = (f"rr-{job_name}-{version_id}", cron_expression)
        self.scheduled_params = options["params"]
        return SimpleNamespace(recurring_run_id=self.recurring[job_name][0])


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    path = tmp_path_factory.mktemp("kfp") / "pipeline.yaml"
    main(["compile", EXAMPLE, "-o", str(path)])
    return path


def test_publishing_twice_reuses_the_version_and_runs_start_from_it(package):
    client = FakeKfpClient()
    first = publish(client, package, "nightly")
    assert publish(client, package, "nightly") == first
    assert first.version_name in client.versions[first.pipeline_id] and first.version_id != "v-0"
    assert submit(client, package, "nightly", "run-1", service_account="kftune") == "r-1"
    assert client.runs == [("e-nightly", "run-1", first.version_id, None, "kftune")]


def test_schedule_replaces_the_recurring_run_of_the_same_name(package, tmp_path):
    client = FakeKfpClient()
    schedule(client, package, "nightly", "kftune-sst2", "0 3 * * *")
    changed = tmp_path / "changed.yaml"
    main(["compile", EXAMPLE, "--set", "train.lr=5e-4", "-o", str(changed)])
    schedule(client, changed, "nightly", "kftune-sst2", "0 4 * * *")
    assert list(client.recurring) == ["kftune-sst2"]
    recurring_id, cron = client.recurring["kftune-sst2"]
    assert cron == "0 0 4 * * *" and recurring_id.endswith(client.versions["p-kftune"][version_name(changed)])
    assert (
        next(yaml.safe_load_all(changed.read_text()))["root"]["inputDefinitions"]["parameters"]["config"][
            "defaultValue"
        ]["train"]["lr"]
        == 5e-4
    )


def test_a_compiled_package_is_sent_as_is_and_set_overrides_become_the_run_parameter(package, monkeypatch, capsys):
    client = FakeKfpClient()
    monkeypatch.setattr("kftune.kube.kfp_server.connect", lambda host, namespace, token: client)
    assert (
        main(
            [
                "schedule",
                str(package),
                "--host",
                "http://kfp",
                "--cron",
                "0 3 * * *",
                "--set",
                "train.lr=5e-4",
                "--set",
                "registry.tracking_uri=http://mlflow:5000",
                "--set",
                "cluster.train.resources.cpu=6",
            ]
        )
        == 0
    )
    assert version_name(package) in client.versions["p-kftune"], "the package itself is the uploaded version"
    sent = client.scheduled_params["config"]
    assert (sent["train"]["lr"], sent["registry"]["tracking_uri"], sent["train"]["workers"]) == (
        5e-4,
        "http://mlflow:5000",
        2,
    )
    assert client.scheduled_params["train_cpu"] == "6", "a --set placement reaches its pipeline parameter too"
    assert "recurring run kftune-sst2-sentiment (0 0 3 * * *)" in capsys.readouterr().out
    assert main(["submit", str(package), "--host", "http://kfp", "--set", "train.lrr=1"]) == 2
    assert "train.lrr: unknown key" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "cached"),
    [
        ("--no-cache", set()),
        (  # and the lineage importers
            "--cache",
            {
                "resolve-config",
                "prepare-data",
                "build-prompts",
                "train",
                "evaluate",
                "register",
                "importer",
                "importer-2",
            },
        ),
    ],
)
def test_cache_flags_rewrite_the_uploaded_package_and_fingerprint_data_always_runs(package, monkeypatch, flag, cached):
    client = FakeKfpClient()
    monkeypatch.setattr("kftune.kube.kfp_server.connect", lambda host, namespace, token: client)
    assert main(["submit", str(package), "--host", "http://kfp", flag]) == 0
    tasks = client.uploaded["root"]["dag"]["tasks"]
    assert {name for name, task in tasks.items() if task["cachingOptions"].get("enableCache")} == cached
    assert "fingerprint-data" in tasks


class RefusingKfp(http.server.BaseHTTPRequestHandler):
    """An HTTP server that answers every request as a multi-user KFP refusing it would, and records the Authorization header."""

    status = 401
    seen: ClassVar[list[str | None]] = []

    def do_GET(self):
        RefusingKfp.seen.append(self.headers.get("Authorization"))
        body = b'{"error": "User system:serviceaccount:team-a:ci is not allowed to create experiments", "code": 7}'
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def refusing_kfp():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RefusingKfp)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    RefusingKfp.seen = []
    yield server
    server.shutdown()


@pytest.mark.parametrize(
    ("status", "namespace", "expected"),
    [
        (401, ["--namespace", "team-a"], "401 Unauthorized"),
        (403, [], "403 Forbidden"),
    ],
)
def test_a_refusal_names_what_is_missing(
    refusing_kfp, package, tmp_path, capsys, status, namespace, expected, monkeypatch
):
    monkeypatch.setenv("HOME", str(tmp_path))  # kfp.Client keeps a context file under ~/.config
    RefusingKfp.status = status
    host = f"http://127.0.0.1:{refusing_kfp.server_address[1]}"
    token = tmp_path / "token"
    token.write_text("secret-token\n")
    args = ["--token-file", str(token)] if status == 403 else []
    assert main(["submit", str(package), "--host", host, *namespace, *args]) == 2
    error = capsys.readouterr().err
    assert f"Kubeflow Pipelines at {host} answered {expected}" in error, error
    if status == 401:
        assert (
            "no credentials were sent: pass a bearer token with --token-file" in error.lower()
            and None in RefusingKfp.seen
        )
    else:
        assert "--namespace <your profile>" in error and "Bearer secret-token" in RefusingKfp.seen
