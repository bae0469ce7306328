"""`kftune compile` produces KFP IR a cluster accepts: five tasks, in order, config as the default."""

import subprocess
import sys

import yaml

from kftune.config import config_to_dict, load_config

from conftest import EXAMPLES

STEPS = ["prepare-data", "build-prompts", "train", "evaluate", "register"]


def test_compiled_ir_has_the_five_steps_in_order(tmp_path):
    out = tmp_path / "pipeline.yaml"
    example = EXAMPLES / "sst2-minilm-lora.yaml"
    done = subprocess.run([sys.executable, "-m", "kftune.cli", "compile", str(example), "--set", "train.lr=5e-4", "-o", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    ir = yaml.safe_load(out.read_text())
    assert ir["pipelineInfo"]["name"] == "kftune"
    tasks = ir["root"]["dag"]["tasks"]
    assert sorted(tasks) == sorted(STEPS)
    for before, after in zip(STEPS, STEPS[1:]):
        assert before in tasks[after].get("dependentTasks", []), f"{after} must run after {before}"
    default = ir["root"]["inputDefinitions"]["parameters"]["config"]["defaultValue"]
    assert default == config_to_dict(load_config(example, ["train.lr=5e-4"]))
    executors = ir["deploymentSpec"]["executors"]
    images = {name: spec["container"]["image"] for name, spec in executors.items()}
    assert images["exec-train"].startswith("ghcr.io/kftune/kftune-trainer:")
    assert all(image.startswith("ghcr.io/kftune/kftune-step:") for name, image in images.items() if name != "exec-train")
    assert all("pip install" not in " ".join(spec["container"]["command"]) for spec in executors.values())

    from kfp import components

    assert components.load_component_from_file(str(out)).name == "kftune"


def test_cluster_settings_reach_every_task_of_the_ir(tmp_path, make_config):
    from kftune.config import parse_config
    from kftune.pipelines.kftune_pipeline import compile_pipeline

    from conftest import CLUSTER

    documents = list(yaml.safe_load_all(open(compile_pipeline(parse_config(make_config(cluster=CLUSTER)), str(tmp_path / "p.yaml")))))
    ir, platform = documents[0], documents[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    executors = ir["deploymentSpec"]["executors"]
    train = executors.pop("exec-train")["container"]["resources"]
    assert (train["resourceCpuRequest"], train["resourceMemoryRequest"], train["resourceMemoryLimit"]) == ("8", "64Gi", "64Gi")
    assert train["accelerator"]["resourceType"] == "nvidia.com/gpu" and train["accelerator"]["resourceCount"] == "2"
    for spec in executors.values():
        assert spec["container"]["resources"]["resourceCpuRequest"] == "2" and "accelerator" not in spec["container"]["resources"]
    assert platform["exec-train"]["nodeSelector"]["labels"] == {"pool": "gpu"}
    assert platform["exec-train"]["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    for name, settings in platform.items():
        assert [m["mountPath"] for m in settings["pvcMount"]] == ["/data"] and settings["pvcMount"][0]["constant"] == "kftune-data"
        assert [s["secretName"] for s in settings["imagePullSecret"]] == ["ghcr"]
        if name != "exec-train":
            assert settings["nodeSelector"]["labels"] == {"pool": "cpu"} and "tolerations" not in settings
        secrets = settings.get("secretAsEnv", [])
        assert (name == "exec-register") == bool(secrets), "only register gets the MLflow credentials"
    assert platform["exec-register"]["secretAsEnv"][0]["keyToEnv"] == [{"envVar": "MLFLOW_TRACKING_PASSWORD", "secretKey": "password"}]


def test_without_a_cluster_section_the_ir_has_default_requests_and_no_platform_spec(tmp_path, make_config):
    from kftune.config import parse_config
    from kftune.pipelines.kftune_pipeline import compile_pipeline

    documents = list(yaml.safe_load_all(open(compile_pipeline(parse_config(make_config()), str(tmp_path / "p.yaml")))))
    assert len(documents) == 1
    resources = documents[0]["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]
    assert resources["resourceCpuRequest"] == "4" and "accelerator" not in resources
