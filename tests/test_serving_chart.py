"""The chart's `serving` option: an InferenceService (KServe) serving models:/<name>@champion with
MLServer's MLflow runtime. tests/test_serving_env.py runs MLServer with the variables rendered here."""

import subprocess

import yaml

from conftest import REPO, helm_or_skip

CHART = REPO / "charts" / "kftune"
ENABLED = [
    "--set",
    "serving.enabled=true",
    "--set",
    "serving.modelName=sst2-sentiment",
    "--set",
    "serving.image=registry.example.com/kftune-serving:0.1.0",
]


def template(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [helm_or_skip(), "template", "kftune", str(CHART), "--namespace", "ml", *args], capture_output=True, text=True
    )


def inference_services(*args: str) -> list[dict]:
    done = template(*args)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc and doc["kind"] == "InferenceService"]


def test_off_by_default_and_lint_clean_when_on():
    assert inference_services() == []
    lint = subprocess.run([helm_or_skip(), "lint", "--strict", str(CHART), *ENABLED], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_the_champion_from_the_release_mlflow_on_mlserver():
    (service,) = inference_services(*ENABLED, "--set", "serving.baseModelVolume.claim=kftune-data")
    assert service["apiVersion"] == "serving.kserve.io/v1beta1" and service["metadata"]["name"] == "kftune-champion"
    (container,) = service["spec"]["predictor"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert container["command"][:2] == ["mlserver", "start"] and container["name"] == "kserve-container"
    assert env["MLSERVER_MODEL_IMPLEMENTATION"] == "mlserver_mlflow.MLflowRuntime"
    assert (
        env["MLSERVER_MODEL_URI"] == "models:/sst2-sentiment@champion"
        and env["MLSERVER_MODEL_NAME"] == "sst2-sentiment"
    )
    assert (
        env["MLFLOW_TRACKING_URI"] == "http://kftune-mlflow.ml.svc:5000"
    )  # the release's server, whose artifact proxy serves the files
    assert container["ports"][0]["containerPort"] == int(env["MLSERVER_HTTP_PORT"]) == 8080
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["base-model"] == {"name": "base-model", "mountPath": "/data", "readOnly": True}
    volumes = {v["name"]: v for v in service["spec"]["predictor"]["volumes"]}
    assert volumes["base-model"]["persistentVolumeClaim"]["claimName"] == "kftune-data"


def test_missing_model_name_or_image_is_named():
    done = template("--set", "serving.enabled=true")
    assert done.returncode != 0 and "serving.modelName" in done.stderr and "serving.image" in done.stderr
