"""`python -m kftune.train`: the RayJob entrypoint. Trains inside the Ray cluster ($RAY_ADDRESS, set by
KubeRay) with the run config from $KFTUNE_CONFIG (the RayJob's runtime env), in a work folder on the
shared volume: prompts/ in, model/ out, ray/ for Ray Train's checkpoints unless train.checkpoint.storage names a place (every node must reach it)."""

import argparse
import json
import os
from pathlib import Path

from kftune.config import parse_config
from kftune.kube.rayjob import CONFIG_ENV
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
    log = run_training(config, args.work_dir / "prompts", args.work_dir / "model", args.work_dir / "ray")
    print(json.dumps({key: log[key] for key in ("steps", "seconds", "final_loss")}))


if __name__ == "__main__":
    main()
