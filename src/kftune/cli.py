"""`kftune` command line: run | compile | validate | methods."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kftune.errors import KftuneError


def _load(args):
    from kftune.config import load_config

    return load_config(args.config, args.set or [])


def cmd_run(args) -> int:
    from kftune.local import preflight, run_pipeline, with_local_registry

    config = _load(args)
    out = Path(args.out or Path("runs") / Path(args.config).stem)
    config = with_local_registry(config, out)
    print(f"kftune: checking config, model and data ({args.config}) ...", flush=True)
    preflight(config)
    print(f"kftune: running the pipeline; outputs in {out}", flush=True)
    summary = run_pipeline(config, out)
    _print_summary(config, summary)
    return 0


def _print_summary(config, summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    evaluation, train, registered = summary["evaluation"], summary["train"], summary["registered"]
    table = Table(title=f"kftune run: {registered['model_name']} v{registered['version']}", show_header=True)
    table.add_column("")
    table.add_column("base", justify="right")
    table.add_column("tuned", justify="right")
    for metric in config.eval.metrics:
        base = evaluation.get("base", {}).get(metric)
        table.add_row(f"{metric} (test, {evaluation['rows']} rows)", "-" if base is None else f"{base:.4f}", f"{evaluation['tuned'][metric]:.4f}")
    share = 100 * train["trainable_parameters"] / train["total_parameters"]
    table.add_row("trainable parameters", "", f"{train['trainable_parameters']:,} ({share:.2f}%)")
    table.add_row("training", "", f"{train['steps']} steps, {train['seconds_per_step']:.3f} s/step, {train['workers']} workers")
    table.add_row("MLflow model", "", f"{registered['model_name']} v{registered['version']} @{', @'.join(registered['aliases'])}")
    table.add_row("promotion gate", "", registered["gate"])
    table.add_row("wall time", "", f"{summary['wall_seconds']} s")
    console = Console()
    console.print(table)
    console.print(f"outputs:   {summary['outputs']['pipeline']}")
    console.print(f"MLflow:    {registered['tracking_uri']}  (browse: mlflow ui --backend-store-uri {registered['tracking_uri']})")


def cmd_compile(args) -> int:
    from kfp import compiler

    from kftune.config import config_to_dict
    from kftune.pipelines.kftune_pipeline import kftune_pipeline

    config = _load(args)
    compiler.Compiler().compile(kftune_pipeline, args.output, pipeline_parameters={"config": config_to_dict(config)})
    print(f"wrote {args.output}")
    return 0


def cmd_validate(args) -> int:
    from kftune.config import config_to_dict

    print(json.dumps(config_to_dict(_load(args)), indent=2))
    return 0


def cmd_methods(args) -> int:
    """Each method with its description and tasks; with --model, what it trains on that model
    (applied with default options, or the example values below where an option is required)."""
    from kftune.methods import METHODS

    width = max(map(len, METHODS))
    if not args.model:
        for name, spec in sorted(METHODS.items()):
            print(f"{name:<{width}}  {spec.description}  [{', '.join(spec.tasks)}]")
        return 0
    from kftune.methods import apply_method, trainable_parameters
    from kftune.models import load_base_model, resolve_model_path

    required_options = {"freeze_bottom": {"layers": 2}, "train_top": {"layers": 2}, "layer_range": {"start": 1, "end": 3}, "gradual_unfreeze": {"every_steps": 100}}
    path = resolve_model_path(args.model)
    print(f"{'method':<{width}}  {'trainable':>12}  {'%':>7}  ({args.task} on {path})")
    for name, spec in sorted(METHODS.items()):
        if args.task not in spec.tasks:
            print(f"{name:<{width}}  {'-':>12}  {'-':>7}  not for {args.task}")
            continue
        try:
            model = apply_method(load_base_model(path, args.task, 2, 0), spec.options.model_validate(required_options.get(name, {})), args.task)
        except KftuneError as exc:
            print(f"{name:<{width}}  {'-':>12}  {'-':>7}  {exc}")
            continue
        trainable, total = trainable_parameters(model)
        print(f"{name:<{width}}  {trainable:>12,}  {100 * trainable / total:>6.2f}%  {spec.description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kftune", description="Fine-tune language models through one Kubeflow pipeline.")
    commands = parser.add_subparsers(dest="command", required=True)

    def with_config(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("config", help="run config (YAML)")
        sub.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a field, e.g. train.lr=5e-4 (repeatable)")
        return sub

    run = with_config("run", "run the pipeline locally (kfp.local, local Ray, sqlite MLflow)")
    run.add_argument("--out", help="output folder (default: runs/<config name>); MLflow's store lives here")
    run.set_defaults(func=cmd_run)
    compile_ = with_config("compile", "compile the pipeline to KFP IR YAML with this config as default")
    compile_.add_argument("-o", "--output", default="pipeline.yaml")
    compile_.set_defaults(func=cmd_compile)
    with_config("validate", "check a config and print it with every default filled in").set_defaults(func=cmd_validate)
    methods = commands.add_parser("methods", help="list the fine-tuning methods; with --model, what each trains on it")
    methods.add_argument("--model", help="a packaged alias or model folder: print trainable parameters and % per method")
    methods.add_argument("--task", default="sequence_classification", choices=["sequence_classification", "causal_lm"], help="the task head to load with --model")
    methods.set_defaults(func=cmd_methods)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KftuneError as exc:
        print(f"kftune: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
