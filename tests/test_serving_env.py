"""The registered `@champion` served from a fresh environment that only a package index fills: MLflow
builds it with uv from the version's own requirements, and kftune's code travels with the version (no
index has kftune). `mlflow models predict` in that environment, `mlflow models serve --env-manager uv`
and MLServer's MLflow runtime (configured as the chart's InferenceService configures it, V2 inference
protocol) answer what the evaluate step predicts on the same rows; bad requests get errors naming the
field, and the server keeps serving. One environment is built for the whole module; every server binds
127.0.0.1 and stops by itself."""

import glob
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from conftest import REPO, free_port, helm_or_skip, register_tuned, serve_until
from kftune.config import parse_config
from kftune.evaluate.evaluate import class_logits
from kftune.models import load_tokenizer, load_tuned_model
from kftune.prompts.build import read_meta, read_prompts

pytestmark = pytest.mark.slow

MODEL = "sst2-serving"
MLSERVER = ("mlserver==1.7.1", "mlserver-mlflow==1.7.1")
# A CPU torch wheel on local disk, where scripts/setup.sh finds it: otherwise the environment would
# download torch's multi-GB CUDA build.
TORCH_WHEELS = "/opt/wheels"
MLFLOW = str(Path(sys.executable).with_name("mlflow"))


def cpu_torch_wheel() -> str | None:
    found = glob.glob(f"{TORCH_WHEELS}/torch-{torch.__version__}-*.whl")
    return found[0] if found else None


@pytest.fixture(scope="module")
def champion(tiny_data, tmp_path_factory):
    """A LoRA MiniLM version registered as champion in a sqlite store, and what evaluation predicts
    for the test split's rows (label, probability)."""
    folder = tmp_path_factory.mktemp("served")
    config = parse_config(
        {
            "model": {"name_or_path": "minilm-l6", "task": "sequence_classification"},
            "data": {
                "path": str(tiny_data["train"]),
                "columns": {"text": "sentence"},
                "split": {"test": str(tiny_data["test"])},
            },
            "prompt": {"template": "plain", "max_length": 64},
            "method": {"name": "lora", "r": 4, "target_modules": ["query", "value"]},
            "eval": {"batch_size": 8, "compare_base": False, "forgetting": False},
            "registry": {
                "model_name": MODEL,
                "tracking_uri": f"sqlite:///{folder / 'mlflow.db'}",
                "artifact_location": (folder / "artifacts").as_uri(),
            },
        }
    )
    evaluation = register_tuned(config, folder)
    rows = read_prompts(folder / "prompts", "test")
    best = (
        class_logits(load_tuned_model(folder / "model"), rows, load_tokenizer(folder / "model").pad_token_id, 8)
        .softmax(dim=-1)
        .max(dim=-1)
    )
    labels = read_meta(folder / "prompts")["label_names"]
    sentences = [json.loads(line)["text"] for line in (folder / "data" / "test.jsonl").read_text().splitlines()]
    return {
        "uri": config.registry.tracking_uri,
        "folder": folder,
        "sentences": sentences,
        "evaluation": evaluation,
        "labels": [labels[i] for i in best.indices.tolist()],
        "scores": best.values.tolist(),
    }


@pytest.fixture(scope="module")
def environ(champion, tmp_path_factory):
    """The variables of a machine that has the tracking URI, uv and a package index, and no kftune:
    nothing of this checkout's Python path reaches the environment MLflow builds."""
    wheel = cpu_torch_wheel()
    if wheel is None or shutil.which("uv") is None:
        pytest.skip(f"needs uv and the CPU torch wheel in {TORCH_WHEELS} (scripts/setup.sh), not a CUDA torch download")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(
        MLFLOW_TRACKING_URI=champion["uri"],
        MLFLOW_ENV_ROOT=str(tmp_path_factory.mktemp("envs")),
        UV_FIND_LINKS=str(Path(wheel).parent),
    )
    return env


def dataframe_split(sentences: list[str]) -> dict:
    return {"dataframe_split": {"columns": ["sentence"], "data": [[s] for s in sentences]}}


@pytest.fixture(scope="module")
def fresh_python(environ) -> str:
    """The environment MLflow builds for the version with uv, as `mlflow models predict/serve --env-manager uv`
    build it (`mlflow models prepare-env`: the same code path, but kept in MLFLOW_ENV_ROOT where `serve`
    finds it; `predict` would build it in a temporary folder of its own). Timed."""
    started = time.perf_counter()
    command = [MLFLOW, "models", "prepare-env", "-m", f"models:/{MODEL}@champion", "--env-manager", "uv"]
    done = subprocess.run(
        command, env=environ, capture_output=True, text=True, timeout=1200, cwd=environ["MLFLOW_ENV_ROOT"]
    )
    assert done.returncode == 0, done.stderr[-4000:]
    print(f"\nfresh environment built in {time.perf_counter() - started:.0f} s")
    (python,) = glob.glob(f"{environ['MLFLOW_ENV_ROOT']}/mlflow-*/bin/python")
    return python


def post(url: str, body: bytes | str | dict, content_type: str = "application/json") -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else (body if isinstance(body, str) else json.dumps(body)).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        text = error.read().decode(errors="replace")
        try:
            return error.code, json.loads(text)
        except json.JSONDecodeError:
            return error.code, {"text": text}


def test_the_environment_has_no_kftune_but_the_version_brings_it(fresh_python):
    """The environment MLflow built installed no kftune: the version's code_paths supplied it."""
    probe = "import importlib.util, sys; print(importlib.util.find_spec('kftune'))"
    assert subprocess.run([fresh_python, "-c", probe], capture_output=True, text=True, cwd="/").stdout.strip() == "None"
    torch_in_env = subprocess.run(
        [fresh_python, "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True
    )
    assert torch_in_env.stdout.strip() == torch.__version__  # the local CPU build, not a CUDA download


def test_mlflow_models_predict_in_the_fresh_environment(champion, fresh_python, environ, tmp_path):
    """`mlflow models predict` run by the environment built for the version: what evaluation predicts."""
    (tmp_path / "in.json").write_text(json.dumps(dataframe_split(champion["sentences"])))
    mlflow_in_env = str(Path(fresh_python).with_name("mlflow"))
    command = [
        mlflow_in_env,
        "models",
        "predict",
        "-m",
        f"models:/{MODEL}@champion",
        "-i",
        "in.json",
        "-t",
        "json",
        "-o",
        "out.json",
        "--env-manager",
        "local",
    ]
    done = subprocess.run(command, cwd=tmp_path, env=environ, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = json.loads((tmp_path / "out.json").read_text())["predictions"]
    assert [r["label"] for r in rows] == champion["labels"]
    torch.testing.assert_close(torch.tensor([r["score"] for r in rows]), torch.tensor(champion["scores"]))


def test_mlflow_models_serve_and_bad_requests(champion, fresh_python, environ, tmp_path):
    port = free_port()
    command = [
        MLFLOW,
        "models",
        "serve",
        "-m",
        f"models:/{MODEL}@champion",
        "--env-manager",
        "uv",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "-w",
        "1",
    ]
    with serve_until(command, f"http://127.0.0.1:{port}/ping", tmp_path / "serve.log", env=environ, cwd=tmp_path):
        url = f"http://127.0.0.1:{port}/invocations"
        status, answer = post(url, dataframe_split(champion["sentences"]))
        assert status == 200, answer
        assert [r["label"] for r in answer["predictions"]] == champion["labels"]
        torch.testing.assert_close(
            torch.tensor([r["score"] for r in answer["predictions"]]), torch.tensor(champion["scores"])
        )

        bad = {
            "an input without the template's field": (
                {"dataframe_records": [{"review": "a fine film"}]},
                "input needs column(s) 'sentence'",
            ),
            "a generation request to a classifier": (
                {"dataframe_records": [{"prompt": "Continue: the film"}]},
                "input needs column(s) 'sentence'",
            ),
            "a body in none of MLflow's formats": ({"text": ["a fine film"]}, "dataframe_split"),
            "a body that is not JSON": ("sentence=a fine film", "Invalid input"),
        }
        for why, (body, named) in bad.items():
            status, answer = post(url, body)
            assert status == 400 and named in answer.get("message", ""), (why, status, answer)
        status, answer = post(url, dataframe_split(champion["sentences"][:2]))  # still serving
        assert status == 200 and [r["label"] for r in answer["predictions"]] == champion["labels"][:2]


def chart_predictor() -> dict:
    """The predictor container the chart renders with `serving.enabled` (templates/inferenceservice.yaml)."""
    import yaml

    helm = helm_or_skip()
    settings = [
        "--set",
        "serving.enabled=true",
        "--set",
        f"serving.modelName={MODEL}",
        "--set",
        "serving.image=kftune-serving:test",
    ]
    done = subprocess.run(
        [
            helm,
            "template",
            "kftune",
            str(REPO / "charts" / "kftune"),
            *settings,
            "--show-only",
            "templates/inferenceservice.yaml",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    (container,) = yaml.safe_load(done.stdout)["spec"]["predictor"]["containers"]
    return container


def test_mlserver_mlflow_runtime_v2_protocol(champion, fresh_python, environ, tmp_path):
    """MLServer with its MLflow runtime (PyPI packages, installed in the environment MLflow built for
    the version), configured as the chart's InferenceService configures it, on 127.0.0.1."""
    install = ["uv", "pip", "install", "--quiet", "--python", fresh_python, *MLSERVER]
    done = subprocess.run(install, env=environ, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    container = chart_predictor()
    assert container["command"][:2] == ["mlserver", "start"]
    http = free_port()
    env = {**environ, **{e["name"]: e["value"] for e in container["env"] if e["name"] != "HOME"}}
    env.update(  # here: loopback ports, the test's registry, the model loaded in the server process itself
        MLSERVER_HOST="127.0.0.1",
        MLSERVER_HTTP_PORT=str(http),
        MLSERVER_GRPC_PORT=str(free_port()),
        MLSERVER_METRICS_PORT=str(free_port()),
        MLSERVER_PARALLEL_WORKERS="0",
        MLFLOW_TRACKING_URI=champion["uri"],
    )
    assert env["MLSERVER_MODEL_URI"] == f"models:/{MODEL}@champion"
    mlserver = str(Path(fresh_python).with_name("mlserver"))
    (tmp_path / "empty").mkdir()
    with serve_until(
        [mlserver, "start", str(tmp_path / "empty")],
        f"http://127.0.0.1:{http}/v2/models/{MODEL}/ready",
        tmp_path / "mlserver.log",
        env=env,
        cwd=tmp_path,
    ):
        url = f"http://127.0.0.1:{http}/v2/models/{MODEL}/infer"
        request = {
            "inputs": [
                {
                    "name": "sentence",
                    "shape": [len(champion["sentences"]), 1],
                    "datatype": "BYTES",
                    "data": champion["sentences"],
                }
            ]
        }
        status, answer = post(url, request)
        assert status == 200, answer
        outputs = {output["name"]: output["data"] for output in answer["outputs"]}
        assert outputs["label"] == champion["labels"]
        torch.testing.assert_close(torch.tensor(outputs["score"]), torch.tensor(champion["scores"]))

        # A request without the template's field: 400 naming it. A body that is not V2 is rejected by
        # MLServer's request model (422).
        review = {"inputs": [{"name": "review", "shape": [1, 1], "datatype": "BYTES", "data": ["a fine film"]}]}
        status, answer = post(url, review)
        assert status == 400 and "input needs column(s) 'sentence'" in answer["error"], (status, answer)
        status, answer = post(url, {"dataframe_split": {"columns": ["sentence"], "data": [["a fine film"]]}})
        assert status == 422 and "inputs" in json.dumps(answer), answer
        status, answer = post(
            url, {"inputs": [{**request["inputs"][0], "shape": [2, 1], "data": champion["sentences"][:2]}]}
        )
        assert status == 200 and answer["outputs"][0]["data"] == champion["labels"][:2]  # still serving
