"""`kftune` command line: run | sweep | compile | submit | schedule | validate | methods | promote | rollback."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from kftune.errors import KftuneError


def _load(args):
    from kftune.config import load_config

    return load_config(args.config, args.set or [])


def cmd_run(args) -> int:
    from kftune.local import with_local_registry

    out = Path(args.out or Path("runs") / Path(args.config).stem)
    _run_here(with_local_registry(_load(args), out), out, args.config, args.verbose)
    return 0


def _run_here(config, out: Path, source: str, verbose: bool) -> None:
    """The pipeline on this machine (train, evaluate, register), after the checks, with its summary printed."""
    from kftune.evaluate.evaluate import placement
    from kftune.local import LOG_FOLDER, run_pipeline

    print(f"kftune: checking config, model and data ({source}) ...", flush=True)
    _preflight(config, sys.stdout)
    placement(config.eval)  # the evaluate step runs on this machine: eval.device cuda needs a GPU here
    print(f"kftune: running the pipeline; outputs and step logs ({LOG_FOLDER}/) in {out}", flush=True)
    summary = run_pipeline(config, out, verbose=verbose)
    _print_summary(config, summary)


def cmd_sweep(args) -> int:
    """A search over config fields on Ray Tune (kftune.sweep); with --train-best, the pipeline with the sweep in its
    train step, which runs or resumes it in the same folder and hands the best trial's model to evaluate and register."""
    from kftune.config import config_to_dict, load_config, parse_config
    from kftune.local import with_local_registry
    from kftune.sweep.run import REPORT_FILE, checked_sweep, run_sweep
    from kftune.sweep.space import is_domain, load_sweep_settings

    overrides, space = [], {}
    for item in args.set or []:
        field, _, value = item.partition("=")
        if is_domain(value):
            space[field] = value
        else:
            overrides.append(item)
    config = load_config(args.config, overrides)
    flags = {"metric": args.metric, "samples": args.samples, "parallel": args.parallel, "grace_steps": args.grace_steps}
    settings = load_sweep_settings(args.space, space, flags, config.sweep)
    out = Path(args.out or Path("runs") / f"{Path(args.config).stem}-sweep").resolve()
    if args.train_best:
        in_folder = settings.model_copy(update={"storage": str(out)}).model_dump(exclude_none=True)
        swept = parse_config({**config_to_dict(config), "sweep": in_folder}, source=f"{args.config} with the sweep")
        checked_sweep(swept, swept.sweep)  # against this machine's resources and the model, before any step
        _run_here(with_local_registry(swept, out), out / "best", args.config, args.verbose)
        print(f"kftune: the sweep's report: {out / REPORT_FILE}")
        return 0
    summary = run_sweep(config, settings, out, with_local_registry(config, out))
    if summary["interrupted"]:
        return 130
    _print_sweep(summary, settings.metric)
    return 0


def _print_sweep(summary: dict, metric: str) -> None:
    from rich.console import Console
    from rich.table import Table

    best = summary["best"]
    table = Table(title=f"kftune sweep: MLflow run {summary['parent_run_id']}", title_justify="left")
    fields = list(summary["trials"][0]["values"]) if summary["trials"] else []
    for header in ["trial", *fields, "outcome", "steps", metric]:
        table.add_column(header)
    for row in summary["trials"]:
        marker = " (best)" if best and row["trial"] == best["trial"] else ""
        score = "-" if row["metric"] is None else f"{row['metric']:.4f}"
        table.add_row(
            row["trial"] + marker, *(str(row["values"][f]) for f in fields), row["outcome"], str(row["step"]), score
        )
    console = Console(width=max(Console().width, 120))
    console.print(table)
    if best:
        console.print(f"best config: {summary['best_config']}  (train it: kftune run {summary['best_config']})")


def _preflight(config, stream) -> None:
    """Fail on bad input before any step starts; show the warnings about the data."""
    from kftune.preflight import preflight

    for warning in preflight(config):
        print(f"kftune: warning: {warning}", file=stream, flush=True)


def _print_summary(config, summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    evaluation, train, registered = summary["evaluation"], summary["train"], summary["registered"]
    scores = Table(title=f"kftune run: {registered['model_name']} v{registered['version']}", title_justify="left")
    for header in (f"test split, {evaluation['rows']} rows", "base", "tuned", "change"):
        scores.add_column(header, justify="left" if header.startswith("test") else "right")
    for metric in config.eval.metrics:
        tuned = evaluation["tuned"][metric]
        base = evaluation.get("base", {}).get(metric)
        change = "" if base is None else f"{tuned - base:+.4f}"
        scores.add_row(metric, "-" if base is None else f"{base:.4f}", f"{tuned:.4f}", change)
    facts = Table.grid(padding=(0, 2))
    share = 100 * train["trainable_parameters"] / train["total_parameters"]
    rows = [
        ("trainable parameters", f"{train['trainable_parameters']:,} of {train['total_parameters']:,} ({share:.2f}%)"),
        (
            "training",
            f"{train['steps']} steps in {train['seconds']:.0f} s, {train['seconds_per_step']:.3f} s/step, {train['workers']} Ray workers",
        ),
        ("MLflow model", f"{registered['model_name']} v{registered['version']}  @{'  @'.join(registered['aliases'])}"),
        ("promotion gate", registered["gate"]),
        ("wall time", f"{summary['wall_seconds']:.0f} s"),
        ("outputs", summary["outputs"]["pipeline"]),
        (
            "MLflow store",
            f"{registered['tracking_uri']}  (browse: mlflow ui --backend-store-uri {registered['tracking_uri']})",
        ),
    ]
    for name, value in rows:
        facts.add_row(name, value)
    console = Console(width=max(Console().width, 120))
    console.print(scores)
    console.print(facts)


def cmd_compile(args) -> int:
    from kftune.pipelines.kftune_pipeline import compile_pipeline

    print(f"wrote {compile_pipeline(_load(args), args.output)}")
    return 0


def cmd_submit(args) -> int:
    from kftune.kube.kfp_server import submit

    def start_run(client, package, config, params):
        run_name = args.run_name or f"{config.registry.model_name}-{time.strftime('%Y%m%d-%H%M%S')}"
        return f"started run {submit(client, package, args.experiment, run_name, params, args.namespace, args.service_account)}"

    return _publish(args, start_run)


def cmd_schedule(args) -> int:
    from kftune.kube.kfp_server import kfp_cron, schedule

    cron = kfp_cron(args.cron)  # a bad expression fails before anything is compiled or uploaded

    def create_recurring_run(client, package, config, params):
        job = args.name or f"kftune-{config.registry.model_name}"
        return f"recurring run {job} ({cron}): {schedule(client, package, args.experiment, job, cron, params, args.namespace, args.service_account)}"

    return _publish(args, create_recurring_run)


def _pipeline_source(args, scratch: Path):
    """(package, config, run parameters). A run config is compiled; a compiled package (the Helm chart's)
    is sent as it is, and --set then overrides its default config, passed as the run's parameters (`config` and placement)."""
    from kftune.config import apply_overrides, parse_config
    from kftune.kube.kfp_server import package_default_config
    from kftune.kube.locations import check_pods_can_read
    from kftune.pipelines.kftune_pipeline import compile_pipeline, pipeline_arguments

    default = package_default_config(Path(args.config))
    if default is None:
        config = _load(args)
        return Path(compile_pipeline(config, args.package or str(scratch / "pipeline.yaml"))), config, None
    config = parse_config(apply_overrides(default, args.set or []), source=f"{args.config} with --set")
    check_pods_can_read(config)
    return Path(args.config), config, (pipeline_arguments(config) if args.set else None)


def _publish(args, action) -> int:
    """Resolve the package, then run `action(client, package, config, params)` unless --dry-run."""
    import tempfile

    from kftune.kube.kfp_server import connect, refusal, version_name, with_caching

    with tempfile.TemporaryDirectory() as scratch:
        package, config, params = _pipeline_source(args, Path(scratch))
        if args.cache is not None:
            package = with_caching(package, args.cache, Path(scratch) / "pipeline-caching.yaml")
        print(
            f"kftune: pipeline kftune version {version_name(package)}"
            + (", run config overridden by --set" if params else "")
        )
        if args.dry_run:
            print(f"kftune: --dry-run: nothing sent to {args.host}")
            return 0
        if args.token_file and not Path(args.token_file).is_file():
            raise KftuneError(f"--token-file {args.token_file}: no such file")
        token = Path(args.token_file).read_text(encoding="utf-8").strip() if args.token_file else None
        try:
            print(
                f"kftune: {action(connect(args.host, args.namespace, token), package, config, params)} on {args.host}"
            )
        except Exception as exc:  # urllib3 / kfp_server_api errors: name the server, not a traceback
            if type(exc).__module__.split(".")[0] not in ("urllib3", "kfp_server_api"):
                raise
            if getattr(exc, "status", None) in (401, 403):
                raise KftuneError(
                    refusal(args.host, exc.status, str(getattr(exc, "body", "") or ""), args.namespace, token)
                ) from None
            raise KftuneError(f"Kubeflow Pipelines at {args.host}: {exc}") from None
    return 0


def cmd_validate(args) -> int:
    from kftune.config import config_to_dict

    config = _load(args)
    if not args.schema_only:  # the model's architecture against the method, and the data, as `kftune run` checks them
        _preflight(config, sys.stderr)
    print(json.dumps(config_to_dict(config), indent=2))
    return 0


def cmd_promote(args) -> int:
    from kftune.registry.mlflow_registry import promote

    print(promote(args.tracking_uri, args.name, args.version, args.reason))
    return 0


def cmd_rollback(args) -> int:
    from kftune.registry.mlflow_registry import rollback

    print(rollback(args.tracking_uri, args.name, args.reason))
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

    required_options = {
        "freeze_bottom": {"layers": 2},
        "train_top": {"layers": 2},
        "layer_range": {"start": 1, "end": 3},
        "gradual_unfreeze": {"every_steps": 100},
    }
    path = resolve_model_path(args.model)
    print(f"{'method':<{width}}  {'trainable':>12}  {'%':>7}  ({args.task} on {path})")
    for name, spec in sorted(METHODS.items()):
        if args.task not in spec.tasks:
            print(f"{name:<{width}}  {'-':>12}  {'-':>7}  not for {args.task}")
            continue
        try:
            model = apply_method(
                load_base_model(path, args.task, 2, 0),
                spec.options.model_validate(required_options.get(name, {})),
                args.task,
            )
        except KftuneError as exc:
            print(f"{name:<{width}}  {'-':>12}  {'-':>7}  {exc}")
            continue
        trainable, total = trainable_parameters(model)
        print(f"{name:<{width}}  {trainable:>12,}  {100 * trainable / total:>6.2f}%  {spec.description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kftune", description="Fine-tune language models through one Kubeflow pipeline."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def with_config(name: str, help_text: str, config_help: str = "run config (YAML)") -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("config", help=config_help)
        sub.add_argument(
            "--set", action="append", metavar="KEY=VALUE", help="override a field, e.g. train.lr=5e-4 (repeatable)"
        )
        return sub

    run = with_config("run", "run the pipeline locally (kfp.local, local Ray, sqlite MLflow)")
    run.add_argument(
        "--out", help="output folder (default: runs/<config name>); MLflow's store and the step logs live here"
    )
    run.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show every step's full log as it runs (always written to <out>/logs/)",
    )
    run.set_defaults(func=cmd_run)
    sweep = with_config(
        "sweep",
        "search config fields on Ray Tune (ASHA early stopping); --set FIELD=choice(...)|grid(...)|uniform(lo,hi)|loguniform(lo,hi)|randint(lo,hi) adds a field",
    )
    sweep.add_argument(
        "--space", help="a sweep file (YAML): space, metric, samples, parallel, grace_steps, reduction_factor, seed"
    )
    sweep.add_argument("--metric", choices=["validation_loss", "validation_accuracy"], help="default: validation_loss")
    sweep.add_argument("--samples", type=int, help="trials drawn (each grid point this many times)")
    sweep.add_argument("--parallel", type=int, help="trials training at once (default 1)")
    sweep.add_argument(
        "--grace-steps", type=int, help="ASHA's grace period in optimizer steps (default: train.eval_every_steps)"
    )
    sweep.add_argument(
        "--out", help="sweep folder (default: runs/<config name>-sweep); the same command on it resumes the sweep"
    )
    sweep.add_argument(
        "--train-best",
        action="store_true",
        help="run (or resume) the sweep in the pipeline's train step, then evaluate and register its best trial's model",
    )
    sweep.add_argument("-v", "--verbose", action="store_true", help="with --train-best: every step's full log")
    sweep.set_defaults(func=cmd_sweep)
    compile_ = with_config("compile", "compile the pipeline to KFP IR YAML with this config as default")
    compile_.add_argument("-o", "--output", default="pipeline.yaml")
    compile_.set_defaults(func=cmd_compile)

    def kfp_command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = with_config(
            name,
            help_text,
            "run config (YAML), or a pipeline package from `kftune compile` (--set then overrides its config)",
        )
        sub.add_argument(
            "--host", required=True, help="Kubeflow Pipelines API endpoint, e.g. http://ml-pipeline.kubeflow:8888"
        )
        sub.add_argument("--experiment", default="kftune", help="KFP experiment (created when missing)")
        sub.add_argument("--namespace", help="KFP namespace (multi-user Kubeflow: your profile)")
        sub.add_argument(
            "--token-file",
            help="a file holding a bearer token for the KFP API (multi-user Kubeflow from outside the cluster)",
        )
        sub.add_argument(
            "--service-account", help="ServiceAccount the pipeline's pods run as (KFP's default when empty)"
        )
        sub.add_argument("--package", help="also keep the compiled pipeline here (when CONFIG is a run config)")
        sub.add_argument(
            "--cache",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="KFP's cache for every step (default: on; fingerprint_data always runs, so changed data is never served from cache)",
        )
        sub.add_argument("--dry-run", action="store_true", help="compile and name the version; contact no server")
        return sub

    submit_ = kfp_command("submit", "upload the pipeline as a new version and start a run on Kubeflow Pipelines")
    submit_.add_argument("--run-name", help="default: <model name>-<UTC time>")
    submit_.set_defaults(func=cmd_submit)
    schedule_ = kfp_command("schedule", "upload the pipeline and create or replace a recurring run")
    schedule_.add_argument("--cron", required=True, help="5-field cron, UTC, e.g. '0 3 * * *'")
    schedule_.add_argument("--name", help="recurring run name (default: kftune-<model name>)")
    schedule_.set_defaults(func=cmd_schedule)
    validate = with_config(
        "validate",
        "check a config (and, unless --schema-only, its model and data) and print it with every default filled in",
    )
    validate.add_argument(
        "--schema-only",
        action="store_true",
        help="only the config itself: for models and data that live on the cluster",
    )
    validate.set_defaults(func=cmd_validate)
    methods = commands.add_parser("methods", help="list the fine-tuning methods; with --model, what each trains on it")
    methods.add_argument(
        "--model", help="a packaged alias or model folder: print trainable parameters and % per method"
    )
    methods.add_argument(
        "--task",
        default="sequence_classification",
        choices=["sequence_classification", "causal_lm"],
        help="the task head to load with --model",
    )
    methods.set_defaults(func=cmd_methods)

    def registry_command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("name", help="registered model name")
        sub.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")
        sub.add_argument("--reason", default="", help="recorded on the version as the audit reason")
        return sub

    promote_ = registry_command("promote", "point alias champion at a version (recorded on the version)")
    promote_.add_argument("version")
    promote_.set_defaults(func=cmd_promote)
    registry_command("rollback", "move champion back to the version it was promoted from").set_defaults(
        func=cmd_rollback
    )
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
