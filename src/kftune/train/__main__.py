"""`python -m kftune.train`: the RayJob entrypoint. Trains inside the Ray cluster ($RAY_ADDRESS, set by
KubeRay) with the run config from $KFTUNE_CONFIG (the RayJob's runtime env), in a work folder on the
shared volume: prompts/ in, model/ out, ray/ for Ray Train's checkpoints unless train.checkpoint.storage names a place (every node must reach it).
With a `sweep` section the sweep runs here and model/ gets its best trial's model (`kftune.sweep.step`)."""

import argparse
import json
import os
from pathlib import Path

from kftune.config import parse_config
from kftune.kube.rayjob import CONFIG_ENV, SWEEP_REPORT
from kftune.sweep.step import sweep_folder, train_by_sweep
from kftune.train.launch import run_training


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m kftune.train")
    parser.add_argument(
        "--work-dir",
        required=True,
        type=Path,
        help="holds prompts/ (build_prompts output); model/ and ray/ are written",
    )
    args = parser.parse_args()
    config = parse_config(json.loads(os.environ[CONFIG_ENV]), source=f"${CONFIG_ENV}")
    prompts, model, storage = args.work_dir / "prompts", args.work_dir / "model", args.work_dir / "ray"
    if config.sweep:  # the sweep runs here, its trials on this Ray cluster; the best trial's model is handed on
        folder = sweep_folder(config, prompts, storage)
        log = train_by_sweep(config, prompts, model, folder, args.work_dir / SWEEP_REPORT)
    else:
        log = run_training(config, prompts, model, storage)
    print(json.dumps({key: log[key] for key in ("steps", "seconds", "final_loss")}))


if __name__ == "__main__":
    main()
