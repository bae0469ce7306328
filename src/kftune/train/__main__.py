"""`python -m kftune.train`: the RayJob entrypoint. Runs the train step inside a Ray cluster
($RAY_ADDRESS, set by KubeRay) with the run config from $KFTUNE_CONFIG (the RayJob's runtime env)."""

import argparse
import json
import os

from kftune.kube.rayjob import CONFIG_ENV
from kftune.steps import train


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m kftune.train")
    parser.add_argument("--prompts", required=True, help="tokenized prompts folder (build_prompts output)")
    parser.add_argument("--model", required=True, help="where the trained Model folder goes")
    parser.add_argument("--run-name", required=True)
    args = parser.parse_args()
    print(json.dumps(train(json.loads(os.environ[CONFIG_ENV]), args.prompts, args.model, args.run_name)))


if __name__ == "__main__":
    main()
