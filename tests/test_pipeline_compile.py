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
    ir = next(yaml.safe_load_all(out.read_text()))  # then the Kubernetes platform spec
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
