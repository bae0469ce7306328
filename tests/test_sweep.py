"""`kftune sweep`: bad search spaces, metrics and parallelism refused before any trial (no Ray), the
report, the sweep section of a run config, the compiled pipeline and RayJob that carry it, and one real sweep on
Ray Tune (stories260K, three trials of four steps, MLflow in sqlite) interrupted after two trials and resumed
inside the pipeline's train step (`--train-best`), which registers the best trial's model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from conftest import CLUSTER_RUN_CONFIG, EXAMPLES, STORIES, stories_run
from kftune.cli import main
from kftune.config import config_to_dict, load_config, parse_config
from kftune.errors import KftuneError
from kftune.sweep.report import render_sweep_report
from kftune.sweep.run import TUNE_FOLDER, TUNER_STATE, run_sweep
from kftune.sweep.space import Domain, SweepSettings, check_sweep, load_sweep_settings, trial_count

TWO_CPUS = {"CPU": 2.0, "GPU": 0.0}


@pytest.fixture
def validated(make_config):
    """A tiny MiniLM classification config (dict) that validates during training."""

    def build(**train) -> dict:
        config = make_config(train={"eval_every_steps": 2, **train})
        config["data"]["split"]["validation"] = 0.25
        return config_to_dict(parse_config(config))

    return build


def refusal(base: dict, resources=TWO_CPUS, **settings) -> str:
    with pytest.raises(KftuneError) as caught:
        check_sweep(base, SweepSettings.model_validate(settings), resources)
    return str(caught.value)


def test_fields_that_do_not_exist_and_values_of_the_wrong_type_are_refused_naming_the_field(validated):
    message = refusal(
        validated(),
        space={
            "train.lrr": "loguniform(1e-5, 1e-3)",
            "train.lr": "choice(fast, slow)",
            "train.epochs": "uniform(1, 3)",  # a float where the field takes whole epochs: shown by the interior point
        },
    )
    assert "train.lrr: unknown key" in message
    assert "train.lr: Input should be a valid number" in message
    assert "train.epochs: Input should be a valid integer, got a number with a fractional part" in message
    assert "uniform(1, 3)" not in message  # each point is named by its values: train.epochs=1.76...
    assert "train.epochs=1.76" in message


def test_a_method_option_searched_with_a_method_that_lacks_it_is_refused(validated):
    message = refusal(validated(), space={"method.name": "choice(lora, ia3)"})
    assert "method.name='ia3'" in message and "method.r: unknown key" in message


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("loguniform(0, 1e-3)", "loguniform(lo, hi) needs lo > 0"),
        ("uniform(0.3, 0.1)", "takes two numbers with lo < hi"),
        ("randint(1.5, 4)", "randint(lo, hi) takes integers"),
        ("choice()", "choice() needs at least one value"),
        ("between(1, 2)", "is not a search domain"),
    ],
)
def test_malformed_domains_are_refused_naming_the_field(validated, text, problem):
    message = refusal(validated(), space={"train.warmup": text})
    assert "train.warmup:" in message and problem in message


def test_a_metric_the_runs_do_not_report_is_refused(validated, make_config):
    no_validation = config_to_dict(parse_config(make_config()))
    message = refusal(no_validation, space={"train.lr": "loguniform(1e-5, 1e-3)"})
    assert "metric: validation_loss is not reported during training: set train.eval_every_steps" in message
    causal = validated()
    causal["model"] = {"name_or_path": str(STORIES), "task": "causal_lm"}
    causal.update(
        prompt={"template": "text", "max_length": 32},
        eval={"metrics": ["perplexity"]},
        registry={**causal["registry"], "gate": {"metric": "perplexity"}},
    )
    message = refusal(causal, space={"train.lr": "loguniform(1e-5, 1e-3)"}, metric="validation_accuracy")
    assert "metric: validation_accuracy is reported by classification heads" in message and "not causal_lm" in message


def test_more_parallel_trials_than_the_resources_hold_are_refused(validated):
    space = {"train.lr": "grid(1e-4, 3e-4, 1e-3)"}
    message = refusal(validated(workers=1), space=space, parallel=3)
    assert "parallel: 3 trials at once need 3 CPUs (1 each" in message and "Ray has 2, enough for 2 at once" in message
    check_sweep(validated(workers=1), SweepSettings(space=space, parallel=2), TWO_CPUS)  # fits
    message = refusal(validated(workers=1, use_gpu=True), space=space)
    assert "parallel: 1 trial(s) at once need 1 GPUs" in message and "Ray has 0" in message


def test_the_command_refuses_a_bad_space_before_starting_ray(validated, write_config, capsys, monkeypatch):
    def no_ray(*args, **kwargs):
        raise AssertionError("a bad space must be refused before Ray starts")

    monkeypatch.setattr("kftune.train.launch.start_ray", no_ray)
    path = write_config(validated())
    assert main(["sweep", str(path), "--set", "train.lrr=loguniform(1e-5, 1e-3)", "--set", "train.max_steps=4"]) == 2
    assert "train.lrr: unknown key" in capsys.readouterr().err


def test_domains_read_their_values_as_yaml_and_count_trials():
    modules = Domain.parse("method.target_modules", "choice([query, value], all-linear)")
    assert modules.checked_values() == [["query", "value"], "all-linear"]
    assert Domain.parse("method.r", "randint(4, 17)").checked_values() == [4, 16]  # the upper bound is excluded
    domains = {"train.lr": Domain.parse("train.lr", "grid(1e-4, 1e-3)"), "method.r": modules}
    assert trial_count(domains, None) == 8 and trial_count(domains, 1) == 2
    assert trial_count({"train.lr": domains["train.lr"]}, None) == 2  # a grid alone: each point once


def test_the_report_has_a_row_per_trial_and_a_point_per_trial_and_field():
    trials = [
        {
            "trial": "trial-0",
            "values": {"train.lr": 1e-4, "method.r": 4},
            "outcome": "finished",
            "step": 8,
            "metric": 0.9,
        },
        {
            "trial": "trial-1",
            "values": {"train.lr": 1e-2, "method.r": 8},
            "outcome": "stopped by ASHA at step 2",
            "step": 2,
            "metric": 1.4,
        },
        {
            "trial": "trial-2",
            "values": {"train.lr": 1e-3, "method.r": 4},
            "outcome": "failed",
            "step": 0,
            "metric": None,
        },
    ]
    fields = {"train.lr": "loguniform(1e-4, 1e-2)", "method.r": "choice(4, 8)"}
    page = render_sweep_report("demo", fields, "validation_loss", "min", trials, "trial-0")
    assert page.count("<tr") == 4 and "stopped by ASHA at step 2" in page
    assert page.count("<circle") == 4  # two trials reported the metric, two fields
    assert "<title>trial-0: 0.0001 -&gt; 0.9000</title>" in page and "fill='#d0594a'" in page  # the best in red


def test_a_sweep_interrupted_after_two_trials_resumes_the_third_with_one_mlflow_parent(tmp_path):
    """lr 0.01 finishes; lr 1e-6 trails it at the first rung (step 2) and ASHA stops it; the third trial
    trains on the CPUs the stopped one held (each trial's worker takes every CPU of the machine); the sweep is
    interrupted then (SIGINT, as Ctrl+C), in the middle of the third trial, and the same command resumes it."""
    from mlflow import MlflowClient

    whole_machine = os.cpu_count()
    config = stories_run(
        tmp_path,
        "sweepy",
        {"name": "lora", "r": 4, "target_modules": "all-linear"},
        {"workers": 1, "cpus_per_worker": whole_machine, "max_steps": 4, "eval_every_steps": 2}
        | {"schedule": "constant", "log_every_steps": 100},
    )
    config["data"]["split"]["validation"] = 0.25
    config["registry"]["artifact_location"] = (tmp_path / "artifacts").as_uri()
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "sweep"
    command = ["sweep", str(path), "--set", "train.lr=grid(0.01, 0.000001, 0.02)", "--out", str(out)]

    first = subprocess.Popen(
        [sys.executable, "-m", "kftune.cli", *command], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = []
    deadline = threading.Timer(420, first.kill)  # a trial waiting for CPUs that never come back waits forever
    deadline.start()
    for line in first.stdout:
        lines.append(line)
        if line.startswith("sweep: trial-2 step 2/4"):  # its worker got the CPUs ASHA's stop of trial-1 freed
            os.kill(first.pid, signal.SIGINT)
    deadline.cancel()
    assert first.wait() == 130, "".join(lines)
    printed = "".join(lines)
    assert "sweep: trial-0 finished" in printed and "sweep: trial-1 stopped by ASHA at step 2" in printed
    assert "interrupted with 2 of 3 trials done" in printed

    # --train-best: the pipeline's train step resumes the sweep in the same folder and hands on the best trial's model
    resumed = subprocess.run(
        [sys.executable, "-m", "kftune.cli", *command, "--train-best"], capture_output=True, text=True, timeout=400
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming the sweep of MLflow run" in resumed.stdout
    assert "trial-2 started" in resumed.stdout and "trial-0 started" not in resumed.stdout  # finished trials stay

    client = MlflowClient(config["registry"]["tracking_uri"])
    (parent,) = client.search_runs(
        [client.get_experiment_by_name("kftune").experiment_id], "tags.`kftune.sweep` = 'parent'"
    )
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    outcomes = {run.info.run_name: run.data.tags["kftune.sweep.outcome"] for run in children}
    assert outcomes == {"trial-0": "finished", "trial-1": "stopped by ASHA at step 2", "trial-2": "finished"}
    assert all(run.info.status == "FINISHED" for run in [parent, *children])
    steps = {
        r.info.run_name: [m.step for m in client.get_metric_history(r.info.run_id, "validation_loss")] for r in children
    }
    assert steps["trial-0"] == [2, 4] and steps["trial-1"][0] == 2
    best = parent.data.tags["kftune.sweep.best_trial"]
    assert best in ("trial-0", "trial-2")
    assert parent.data.metrics["best_validation_loss"] == min(
        client.get_metric_history(r.info.run_id, "validation_loss")[-1].value
        for r in children
        if r.info.run_name in ("trial-0", "trial-2")
    )
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert artifacts == {"sweep_report.html", "best.yaml"}
    best_config = load_config(out / "best.yaml")
    assert best_config.train.lr == {"trial-0": 0.01, "trial-2": 0.02}[best]
    report = (out / "sweep_report.html").read_text()
    assert report.count("<circle") == 3 and "stopped by ASHA at step 2" in report

    # the registered version is the best trial's model, not trained again, and names the sweep
    (version,) = client.search_model_versions("name = 'sweepy'")
    assert version.tags["kftune.sweep.parent_run_id"] == parent.info.run_id
    (handed_on,) = (out / "best" / "pipeline").glob("**/train/model/train_log.json")
    trial_id = {r.info.run_name: r.data.tags["kftune.sweep.trial_id"] for r in children}[best]
    trial_log = json.loads((out / "models" / trial_id / "train_log.json").read_text())
    handed_on_log = json.loads(handed_on.read_text())
    assert handed_on_log.pop("sweep")["best_trial"] == best and handed_on_log == trial_log
    (step_report,) = (out / "best" / "pipeline").glob("**/train/sweep_report")
    assert step_report.read_text() == report

    # finished: the same command answers with what the sweep found, without Ray or Tune
    again = subprocess.run([sys.executable, "-m", "kftune.cli", *command], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "sweep: finished already" in again.stdout and "trials, 1 at once" not in again.stdout
    assert f"{best} (best)" in again.stdout and "stopped by ASHA at step 2" in again.stdout


def test_the_trial_callback_pickles_after_ray_replaced_print_in_the_driver(monkeypatch):
    """Tune pickles its callbacks when a sweep starts; Ray may have replaced `builtins.print` by then (it does once
    trials have shown progress, so the second sweep in one process failed to start)."""
    import builtins

    from ray import cloudpickle

    from kftune.sweep.tracking import TrialRuns

    monkeypatch.setattr(builtins, "print", lambda *args, **kwargs: None)
    callback = cloudpickle.loads(cloudpickle.dumps(TrialRuns("sqlite:///x.db", "0", "parent", "validation_loss")))
    assert callback.parent_run_id == "parent"


def test_a_sweep_file_is_read_and_the_flags_and_set_domains_override_it(tmp_path):
    from kftune.sweep.space import load_sweep_settings

    path = tmp_path / "space.yaml"
    path.write_text("space: {train.lr: 'loguniform(1e-5, 1e-3)'}\nmetric: validation_accuracy\nparallel: 2\n")
    settings = load_sweep_settings(str(path), {"method.r": "choice(4, 8)"}, {"parallel": 1, "samples": None})
    assert settings.space == {"train.lr": "loguniform(1e-5, 1e-3)", "method.r": "choice(4, 8)"}
    assert (settings.metric, settings.mode, settings.parallel, settings.samples) == (
        "validation_accuracy",
        "max",
        1,
        None,
    )
    in_config = SweepSettings(space={"train.batch_size": "grid(4, 8)"}, parallel=3, seed=7)  # a run config's section
    settings = load_sweep_settings(str(path), {}, {}, in_config)
    assert set(settings.space) == {"train.batch_size", "train.lr"} and (settings.parallel, settings.seed) == (2, 7)
    path.write_text("space: {train.lr: 'grid(1e-4)'}\nparalel: 2\n")
    with pytest.raises(
        KftuneError, match=r"invalid sweep settings \(.*space.yaml\):\n  paralel: Extra inputs are not permitted"
    ):
        load_sweep_settings(str(path), {}, {})


def test_the_example_sweep_file_checks_against_its_config_as_the_docs_run_it():
    from kftune.sweep.space import load_sweep_settings

    overrides = ["data.max_rows=2000", "data.split.validation=0.1", "train.max_steps=40"]
    overrides += ["train.eval_every_steps=10", "train.workers=1", "train.batch_size=16"]
    config = load_config(EXAMPLES / "sst2-minilm-lora.yaml", overrides)
    settings = load_sweep_settings(str(EXAMPLES / "sweeps" / "sst2-minilm-lora.yaml"), {}, {"samples": 4})
    domains, configs = check_sweep(config_to_dict(config), settings, TWO_CPUS)
    assert set(domains) == {"train.lr", "method.r"} and settings.parallel == 2 and len(configs) == 9


def test_a_run_configs_sweep_section_is_checked_with_the_config_every_problem_at_once(validated, write_config):
    config = {
        **validated(),
        "sweep": {"space": {"train.lrr": "grid(1e-4, 1e-3)", "data.max_rows": "grid(10, 20)"}, "parallel": 2},
    }
    with pytest.raises(KftuneError) as caught:
        load_config(write_config(config))
    message = str(caught.value)
    assert "run.yaml:" in message and "sweep: at train.lrr=0.0001, data.max_rows=10: train.lrr: unknown key" in message
    assert "sweep: space: data.max_rows shapes the data and prompts" in message  # the pipeline built them already
    config["sweep"] = {"space": {"train.lr": "grid(1e-4, 1e-3)"}, "metric": "validation_acc", "samples": 0}
    with pytest.raises(KftuneError) as caught:
        parse_config(config)
    assert "sweep.metric: Input should be" in str(caught.value) and "sweep.samples: Input should be" in str(
        caught.value
    )


def test_the_compiled_pipeline_and_the_rayjob_carry_the_sweep(tmp_path):
    from kftune.kube.rayjob import CONFIG_ENV, build_rayjob
    from kftune.pipelines.kftune_pipeline import compile_pipeline
    from kube_schema import validate_custom_resource

    sweep = {"space": {"train.lr": "loguniform(1e-4, 1e-2)", "method.r": "choice(4, 8)"}, "parallel": 2}
    overrides = ["data.split.validation=0.1", "train.eval_every_steps=50", f"sweep={sweep}"]
    config = load_config(CLUSTER_RUN_CONFIG, overrides)
    compiled = Path(compile_pipeline(config, str(tmp_path / "pipeline.yaml"))).read_text()
    ir, kubernetes = yaml.safe_load_all(compiled)
    assert ir["root"]["inputDefinitions"]["parameters"]["config"]["defaultValue"]["sweep"]["space"] == sweep["space"]
    outputs = ir["components"]["comp-train"]["outputDefinitions"]["artifacts"]
    assert outputs["sweep_report"]["artifactType"]["schemaTitle"] == "system.HTML"
    platform = kubernetes["platforms"]["kubernetes"]
    assert platform["deploymentSpec"]["executors"]["exec-train"]["secretAsEnv"][0]["secretName"] == "mlflow-s3"

    on_gpus = load_config(
        CLUSTER_RUN_CONFIG, [*overrides, "cluster.rayjob={enabled: true, nodes: 2, worker: {gpus: 2}}"]
    )
    job = build_rayjob(on_gpus, "run-1", "/data/kftune-runs/run-1")
    validate_custom_resource(job, "ray.io_rayjobs.yaml")  # KubeRay's CRD schema, the head's env included
    with pytest.raises(KftuneError, match=r"sweep.storage: /tmp/sweeps is on this machine"):
        compile_pipeline(
            load_config(CLUSTER_RUN_CONFIG, [*overrides, "sweep.storage=/tmp/sweeps"]), str(tmp_path / "p.yaml")
        )
    trainer = json.loads(yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"][CONFIG_ENV])
    assert trainer["sweep"]["space"] == sweep["space"] and trainer["train"]["workers"] == 2  # 4 GPUs, 2 trials at once
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {e["valueFrom"]["secretKeyRef"]["name"] for e in head["env"]} == {"mlflow-s3"}  # the driver logs the trials
    with pytest.raises(KftuneError, match=r"sweep.parallel: 3 trials at once cannot share the RayJob's 4 Ray workers"):
        load_config(
            CLUSTER_RUN_CONFIG,
            [
                *overrides[:2],
                "sweep={space: {train.lr: 'grid(1e-4)'}, parallel: 3}",
                "cluster.rayjob={enabled: true, nodes: 2, worker: {gpus: 2}}",
            ],
        )


def test_the_train_steps_sweep_lives_in_sweep_storage_else_beside_the_checkpoints_named_after_the_run(
    validated, tmp_path
):
    from kftune import steps
    from kftune.sweep.step import sweep_folder

    config = {
        **validated(checkpoint={"storage": str(tmp_path / "checkpoints")}),
        "sweep": {"space": {"train.lr": "grid(1e-4, 1e-3)"}},
    }
    prompts = tmp_path / "prompts"
    steps.prepare_data(config, str(tmp_path / "data"), str(tmp_path / "card.md"))
    steps.build_prompts(config, str(tmp_path / "data"), str(prompts), str(tmp_path / "preview.html"))
    folder = sweep_folder(parse_config(config), prompts, tmp_path / "scratch")
    assert folder.parent == tmp_path / "checkpoints" and folder.name.startswith(
        f"{config['registry']['model_name']}-sweep-"
    )
    assert sweep_folder(parse_config(config), prompts, tmp_path / "scratch") == folder  # a restarted step finds it
    other = {**config, "train": {**config["train"], "batch_size": 4}}
    assert sweep_folder(parse_config(other), prompts, tmp_path / "scratch") != folder  # another run, another sweep
    named = {**config, "sweep": {**config["sweep"], "storage": str(tmp_path / "mine")}}
    assert sweep_folder(parse_config(named), prompts, tmp_path / "scratch") == tmp_path / "mine"
    on_a_bucket = {**config, "train": {**config["train"], "checkpoint": {"storage": "s3://bucket/runs"}}}
    with pytest.raises(KftuneError, match=r"sweep.storage: a sweep needs a folder"):
        sweep_folder(parse_config(on_a_bucket), prompts, tmp_path / "scratch")


def test_a_sweep_refuses_a_ray_without_the_state_api_that_frees_stopped_trials():
    """Without the dashboard's State API, Ray Train cannot see that a trial ASHA stopped is gone and keeps its
    CPUs reserved: a sweep would hang at the next trial, so it refuses to start."""
    script = (  # kftune's own start of a local Ray, with the dashboard turned off
        "import functools, ray; from kftune.sweep.run import check_state_api; from kftune.train.launch import start_ray; "
        "ray.init = functools.partial(ray.init, include_dashboard=False); start_ray(1); check_state_api()"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert result.returncode != 0
    assert "sweep: Ray's State API does not answer (the dashboard is not running)" in result.stderr


def test_a_sweep_whose_tune_state_was_left_empty_starts_afresh_instead_of_failing_to_restore(tmp_path, monkeypatch):
    """Tune writes its state before any trial; when that write fails (a callback it cannot pickle), the file is left
    empty and `Tuner.restore` would fail with EOFError: the sweep starts its trials afresh instead."""
    config = stories_run(
        tmp_path, "empty-state", {"name": "lora", "r": 4}, {"workers": 1, "max_steps": 2, "eval_every_steps": 1}
    )
    config["data"]["split"]["validation"] = 0.25
    settings = load_sweep_settings(None, {"train.lr": "grid(0.01, 0.02)"}, {"parallel": 1}, None)
    out = tmp_path / "sweep"
    (out / TUNE_FOLDER).mkdir(parents=True)
    (out / TUNE_FOLDER / TUNER_STATE).write_bytes(b"")

    def stop_before_ray(*args, **kwargs):
        raise RuntimeError("stop before Ray")

    monkeypatch.setattr("kftune.train.launch.start_ray", stop_before_ray)
    said = []
    run_config = parse_config(config)
    with pytest.raises(RuntimeError, match="stop before Ray"):
        run_sweep(run_config, settings, out, run_config, say=said.append)
    assert not (out / TUNE_FOLDER / TUNER_STATE).exists()  # so `Tuner.can_restore` says no: a new Tuner starts
    assert any("is empty" in line and "starting afresh" in line for line in said)
