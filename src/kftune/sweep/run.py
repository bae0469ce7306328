"""`kftune sweep`: check the sweep, prepare the data once, run the trials on Ray Tune with ASHA, and
write the report and the best config.

Everything lives in one folder: `sweep.json` (what was asked, and the parent MLflow run), `prompts/`,
`tune/` (Ray Tune's experiment state), `trials/` (each trial's Ray Train run), `models/` (each finished
trial's model), `best.yaml` and `sweep_report.html`. Started again on the same folder with the same config and settings, a sweep
resumes where it stopped (`Tuner.restore`): finished trials stay finished, unfinished ones restart; a sweep that
had finished answers with what it found (kept in `sweep.json`) without starting Ray.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from kftune.config import RunConfig, config_to_dict, with_values
from kftune.errors import KftuneError
from kftune.sweep.space import SweepSettings, check_sweep, samples_per_point, trial_count

STATE_FILE = "sweep.json"
BEST_CONFIG_FILE = "best.yaml"
REPORT_FILE = "sweep_report.html"
FINISHED_KEY = "finished"
"""In `sweep.json` once every trial is done: the sweep's summary (trials, best trial, best config)."""
TUNE_FOLDER = "tune"
TUNER_STATE = "tuner.pkl"
"""Tune's state in `TUNE_FOLDER`, written before the first trial starts; `Tuner.can_restore` looks for it."""
TRIAL_ID = re.compile(r"[0-9a-f]{5}_[0-9]{5}")
"""Tune's trial id (`a1b2c_00003`), also in a trial folder's name (for a trial that failed before reporting)."""
TRIAL_DRIVER_MEMORY = 512 * 2**20
"""What a trial's own process (the driver of its Ray Train run) reserves: memory, no CPU (Tune needs some resource)."""


def available_resources() -> dict[str, float]:
    """What parallel trials must fit in: the Ray cluster's resources at $RAY_ADDRESS, else this machine's cores and GPUs."""
    if os.environ.get("RAY_ADDRESS"):
        import ray

        from kftune.train.launch import start_ray

        start_ray(0)
        return ray.cluster_resources()
    import torch

    return {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}


def checked_sweep(config: RunConfig, settings: SweepSettings) -> tuple[dict[str, Any], dict, list[RunConfig]]:
    """(the trials' base config, the domains, the checked configs): the sweep checked against the resources it
    will run on and the searched method options against the model's architecture; raises KftuneError."""
    from kftune.preflight import check_method_on_model

    # The fields as written (paths resolved): a searched method.name must not meet another method's defaults.
    base = json.loads(config.model_dump_json(exclude_unset=True, exclude_none=True))
    base.pop("sweep", None)
    domains, configs = check_sweep(base, settings, available_resources())
    for distinct in {json.dumps(config_to_dict(c)["method"], sort_keys=True): c for c in configs}.values():
        check_method_on_model(distinct)
    return base, domains, configs


def run_sweep(
    config: RunConfig,
    settings: SweepSettings,
    out: Path,
    tracking: RunConfig,
    say: Callable[[str], None] = print,
    prompts: Path | None = None,
) -> dict[str, Any]:
    """Run (or resume) the sweep of `config` in `out`; `tracking` is the config whose registry section
    names the MLflow store; `prompts`: already built for `config` (the pipeline's). Returns the trials,
    the best one and where the best config was written."""
    import ray

    from kftune.preflight import preflight
    from kftune.prompts.build import read_meta
    from kftune.sweep.trial import prompts_for

    base, domains, configs = checked_sweep(config, settings)
    for warning in preflight(config):
        say(f"kftune: warning: {warning}")
    out = out.resolve()
    state = _sweep_state(out, {"config": _spec_config(config), "settings": settings.spec()})
    if FINISHED_KEY in state:
        say(f"sweep: finished already (MLflow run {state['parent_run_id']}); folder {out}")
        return state[FINISHED_KEY]
    train_rows = read_meta(prompts_for(config, out / "prompts", prompts))["splits"]["train"]["rows"]
    client, experiment, parent = _parent_run(tracking, settings, state, out, say)
    trials = trial_count(domains, settings.samples)
    unwritten = out / TUNE_FOLDER / TUNER_STATE
    if unwritten.is_file() and unwritten.stat().st_size == 0:
        say(f"sweep: {unwritten} is empty (Tune failed while writing it, before any trial ran): starting afresh")
        unwritten.unlink()
    say(
        f"sweep: {trials} trials, {min(settings.parallel, trials)} at once, by {settings.metric}; folder {out}"
        " (the trials' own output: Ray's session logs, /tmp/ray/session_latest/logs)"
    )
    try:
        results = _tune(base, settings, domains, configs, train_rows, out, tracking, experiment, parent)
    finally:
        ray.shutdown()  # `--train-best` then trains in a pipeline step, which starts its own Ray
    rows = _trial_rows(results, client, experiment, parent, settings.metric)
    done = sum(row["outcome"] is not None for row in rows)
    if done < trials:  # interrupted (Ctrl+C): Tune saved its state; trials not yet drawn are not in `rows` at all
        say(f"sweep: interrupted with {done} of {trials} trials done; run the same command to resume")
        return {"interrupted": True, "parent_run_id": parent}
    best = _best(rows, settings.mode)
    summary = {"interrupted": False, "parent_run_id": parent, "trials": rows, "best": best}
    if best:
        best_config = with_values(base, best["values"])  # as the user wrote theirs, runnable with `kftune run`
        (out / BEST_CONFIG_FILE).write_text(yaml.safe_dump(best_config, sort_keys=False))
        summary["best_config"] = str(out / BEST_CONFIG_FILE)
    _finish_parent(client, parent, settings, domains, rows, best, out)
    state[FINISHED_KEY] = summary
    (out / STATE_FILE).write_text(json.dumps(state, indent=2))
    return summary


def _spec_config(config: RunConfig) -> dict[str, Any]:
    """The config as far as it makes the sweep: not where it is tracked or deployed, so that the pipeline's train
    step (`sweep.storage`) resumes or takes over a sweep that `kftune sweep` started in that folder."""
    return {key: value for key, value in config_to_dict(config).items() if key not in ("registry", "cluster", "sweep")}


def _sweep_state(out: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """The folder's sweep: a new one, or the same one again (resumed); a different one is refused."""
    path = out / STATE_FILE
    if path.is_file():
        state = json.loads(path.read_text())
        if state["spec"] != spec:
            changed = sorted(k for k in ("config", "settings") if state["spec"][k] != spec[k])
            raise KftuneError(
                f"{out} holds a sweep with a different {' and '.join(changed)}; "
                "resume it with the same ones, or give another --out"
            )
        return state
    out.mkdir(parents=True, exist_ok=True)
    state = {"spec": spec}
    path.write_text(json.dumps(state, indent=2))
    return state


def _parent_run(tracking: RunConfig, settings: SweepSettings, state: dict, out: Path, say) -> tuple[Any, str, str]:
    """(client, experiment id, parent run id): the run created on the first start, or the one recorded."""
    from kftune.registry.mlflow_registry import connect, experiment_id

    registry = tracking.registry
    client = connect(registry.tracking_uri, registry.retries, registry.backoff_seconds)
    experiment = experiment_id(tracking)
    if "parent_run_id" in state:
        say(f"sweep: resuming the sweep of MLflow run {state['parent_run_id']}")
        return client, experiment, state["parent_run_id"]
    run = client.create_run(experiment, run_name=f"{registry.model_name}-sweep", tags={"kftune.sweep": "parent"})
    parent = run.info.run_id
    for key, value in settings.model_dump(exclude={"space"}).items():
        client.log_param(parent, f"sweep.{key}", value)
    for field, domain in settings.space.items():
        client.log_param(parent, f"space.{field}", domain)
    state["parent_run_id"] = parent
    (out / STATE_FILE).write_text(json.dumps(state, indent=2))
    return client, experiment, parent


def _tune(base, settings, domains, configs, train_rows, out: Path, tracking, experiment, parent):
    """Ray Tune over `run_trial`, ASHA on the optimizer step; restored when the folder holds the experiment."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    from kftune.sweep.tracking import TrialRuns
    from kftune.sweep.trial import run_trial
    from kftune.train.launch import start_ray

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0 below: Tune prints nothing; TrialRuns does
    start_ray(settings.parallel * max(c.train.workers * c.train.cpus_per_worker for c in configs), log_to_driver=False)
    check_state_api()
    trainable = tune.with_resources(  # a trial only drives its Ray Train run: its workers reserve the CPUs and GPUs
        tune.with_parameters(run_trial, base=base, work_dir=str(out), metric=settings.metric),
        {"cpu": 0, "memory": TRIAL_DRIVER_MEMORY},
    )
    path = out / TUNE_FOLDER
    if tune.Tuner.can_restore(str(path)):
        return tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=True).fit()
    grace = settings.grace_steps or min(c.train.eval_every_steps for c in configs)
    longest = max(c.train.max_steps or c.train.epochs * train_rows for c in configs)
    scheduler = ASHAScheduler(  # max_t only places the rungs: with stop_last_trials off, no trial is cut at it
        time_attr="step",
        max_t=max(longest, grace),
        grace_period=grace,
        reduction_factor=settings.reduction_factor,
        stop_last_trials=False,
    )
    tuner = tune.Tuner(
        trainable,
        param_space={field: domain.to_tune() for field, domain in domains.items()},
        tune_config=tune.TuneConfig(
            metric=settings.metric,
            mode=settings.mode,
            scheduler=scheduler,
            search_alg=BasicVariantGenerator(max_concurrent=settings.parallel, random_state=settings.seed),
            num_samples=samples_per_point(domains, settings.samples),
        ),
        run_config=tune.RunConfig(
            name=TUNE_FOLDER,
            storage_path=str(out),
            verbose=0,
            callbacks=[TrialRuns(tracking.registry.tracking_uri, experiment, parent, settings.metric)],
        ),
    )
    return tuner.fit()


def check_state_api() -> None:
    """A trial ASHA stops gives its workers' CPUs back only when Ray Train's placement group cleaner can ask Ray's
    State API (served by the dashboard) that the trial's controller is gone (ray-project/ray#54305); without it
    the next trial that needs those CPUs waits forever, so the sweep refuses to start."""
    from ray.util.state import list_actors
    from ray.util.state.exception import RayStateApiException

    try:
        list_actors(limit=1, timeout=30)
    except (RayStateApiException, ConnectionError, ValueError) as error:  # no server; none found; none registered
        raise KftuneError(
            "sweep: Ray's State API does not answer (the dashboard is not running), so the CPUs of a trial ASHA "
            "stops would never be freed for the next one; install ray[default] (kftune's own requirements do) or "
            f"start the cluster's dashboard ({str(error).splitlines()[0][:200]})"
        ) from error


def _trial_rows(results, client, experiment: str, parent: str, metric: str) -> list[dict[str, Any]]:
    """Each trial: its name, values, how it ended (its MLflow child run's tag; None: not yet), last step and metric."""
    from kftune.sweep.tracking import OUTCOME_TAG, PARENT_TAG, TRIAL_TAG, trial_name

    outcomes = {
        run.data.tags.get(TRIAL_TAG): run.data.tags.get(OUTCOME_TAG)
        for run in client.search_runs([experiment], f"tags.`{PARENT_TAG}` = '{parent}'")
    }
    rows = []
    for result in results:
        trial_id = result.metrics.get("trial_id") or TRIAL_ID.search(Path(result.path).name).group(0)
        rows.append(
            {
                "trial": trial_name(trial_id),
                "trial_id": trial_id,
                "values": dict(result.config),
                "outcome": "failed" if result.error else outcomes.get(trial_id),
                "step": result.metrics.get("step", 0),
                "metric": result.metrics.get(metric),
            }
        )
    return sorted(rows, key=lambda row: int(row["trial"].split("-")[1]))


def _best(rows: list[dict[str, Any]], mode: str) -> dict[str, Any] | None:
    """The best metric at the last validation among the trials that finished (ASHA's stopped ones only
    trained part of the way), or among all that reported one when none finished."""
    scored = [row for row in rows if row["metric"] is not None]
    finished = [row for row in scored if row["outcome"] == "finished"] or scored
    if not finished:
        return None
    return (min if mode == "min" else max)(finished, key=lambda row: row["metric"])


def _finish_parent(client, parent: str, settings: SweepSettings, domains, rows, best, out: Path) -> None:
    from kftune.sweep.report import render_sweep_report

    report = out / REPORT_FILE
    report.write_text(
        render_sweep_report(
            out.name,
            {field: str(domain) for field, domain in domains.items()},
            settings.metric,
            settings.mode,
            rows,
            best and best["trial"],
        ),
        encoding="utf-8",
    )
    client.log_artifact(parent, str(report))
    if best:
        client.log_artifact(parent, str(out / BEST_CONFIG_FILE))
        client.log_metric(parent, f"best_{settings.metric}", best["metric"])
        client.set_tag(parent, "kftune.sweep.best_trial", best["trial"])
    client.set_terminated(parent, "FINISHED")
