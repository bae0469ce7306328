"""Run the pipeline on this machine: the same DAG as on Kubeflow, executed by kfp.local's
SubprocessRunner, with Ray started in-process by the train step and MLflow in a sqlite file.

What the steps print (kfp's executor input and task summaries, Ray's and the libraries' logs) goes to
one log file per step in the run's folder; the terminal shows which step runs, the lines a step
addresses to the user, and on failure the step's root cause and its log."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any, TextIO

from kftune.config import RunConfig
from kftune.errors import KftuneError
from kftune.steps import ROOT_CAUSE_PREFIX

STEP_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
    "RAY_DEDUP_LOGS": "0",
}
RAY_AUTH_MODE = "token"
"""Ray's default for a new local cluster, set explicitly so that Ray does not warn that it chose it
(a user's own RAY_AUTH_MODE wins)."""
LOG_FOLDER = "logs"

ANSI = re.compile(r"\x1b\[[0-9;]*m")
TASK_STARTS = re.compile(r"Executing task '([\w-]+)'")
TASK_ENDS = re.compile(r"Task '([\w-]+)' finished with status (\w+)")
STREAM_STARTS = " - INFO - Streamed logs:"
"""kfp.local's line before a step's own output; the task's end line closes it."""
RAY_PREFIX = re.compile(r"^\((?:\w+ )?pid=\d+(?:, ip=[\d.]+)?\) ")
"""Ray's prefix on lines forwarded from its workers and actors: `(RayTrainWorker pid=123) `."""
USER_LINE = re.compile(r"^[a-z][\w-]*(?:: |(?: [a-z]+)? \[[#-]+\] )")
"""What a step addresses to the user: `train: resumed at step 40` and progress lines `train [###---] 4/8 50% ...`,
`evaluate tuned [###---] 32/64 50% ...`."""
TRACEBACK_LAST_LINE = re.compile(r"^(?:[\w.]+\.)?\w*(?:Error|Exception|Interrupt|Exit)\b.*")
KFP_INDENT = "    "


def with_local_registry(config: RunConfig, out_dir: Path) -> RunConfig:
    """Without a tracking URI, MLflow lives in `out_dir`: a sqlite store and an artifact folder."""
    if config.registry.tracking_uri:
        return config
    registry = config.registry.model_copy(
        update={
            "tracking_uri": f"sqlite:///{(out_dir / 'mlflow.db').resolve()}",
            "artifact_location": config.registry.artifact_location or (out_dir / "mlartifacts").resolve().as_uri(),
        }
    )
    return config.model_copy(update={"registry": registry})


@contextlib.contextmanager
def step_environment():
    """STEP_ENV and RAY_AUTH_MODE for the steps kfp.local starts (they inherit this process's
    environment), put back as they were afterwards: a caller's own Ray (a notebook, a test process)
    must not start with the steps' settings."""
    saved = dict(os.environ)
    os.environ.update(STEP_ENV)
    os.environ.setdefault("RAY_AUTH_MODE", RAY_AUTH_MODE)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def on_this_machine(config: RunConfig) -> RunConfig:
    """Train here even when the config hands training to a RayJob on a cluster, and fail at once: the
    step retries are for a cluster's passing faults (a lost node, a busy tracking server), and kfp.local
    would sleep out their backoff (minutes) before the failure a local user needs to see."""
    rayjob = config.cluster.rayjob.model_copy(update={"enabled": False})
    retries = config.cluster.retries.model_copy(update={"train_step": 0, "register_step": 0})
    return config.model_copy(
        update={"cluster": config.cluster.model_copy(update={"rayjob": rayjob, "retries": retries})}
    )


class StepLogs(io.TextIOBase):
    """Stands in for sys.stdout while kfp.local runs the DAG (its task logger and the child processes'
    output both write there): every line goes to `<folder>/<step>.log`; the terminal gets the step
    that starts and ends, lines matching USER_LINE, and with `verbose` every line."""

    def __init__(self, folder: Path, terminal: TextIO, verbose: bool = False):
        self.folder, self.terminal, self.verbose = folder, terminal, verbose
        self.folder.mkdir(parents=True, exist_ok=True)
        self.step, self.started, self.pending = "pipeline", time.perf_counter(), ""
        self.streaming = False
        self.root_causes: dict[str, str] = {}
        self.last_exception: dict[str, str] = {}
        self.log = open(self.log_path(self.step), "w", encoding="utf-8")  # noqa: SIM115  (open while its step runs; closed by _switch and close)

    def log_path(self, step: str) -> Path:
        return self.folder / f"{step}.log"

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            self._line(line)
        return len(text)

    def _line(self, line: str) -> None:
        plain = ANSI.sub("", line)
        started = TASK_STARTS.search(plain)
        if started:
            self._switch(started.group(1))
        self.log.write(plain + "\n")
        self.log.flush()
        ended = TASK_ENDS.search(plain)
        self.streaming = (self.streaming or STREAM_STARTS in plain) and not ended
        content = RAY_PREFIX.sub("", plain.removeprefix(KFP_INDENT))
        if content.startswith(ROOT_CAUSE_PREFIX):
            self.root_causes[self.step] = content.removeprefix(ROOT_CAUSE_PREFIX)
        elif TRACEBACK_LAST_LINE.match(content):
            self.last_exception[self.step] = content
        if self.verbose:
            self.terminal.write(line + "\n")
        elif self.streaming and USER_LINE.match(content) and not content.startswith(ROOT_CAUSE_PREFIX):
            self.terminal.write(f"  {content}\n")
        if ended and ended.group(2) == "SUCCESS":
            self.terminal.write(f"kftune: {ended.group(1)} done in {time.perf_counter() - self.started:.0f} s\n")
        self.terminal.flush()

    def _switch(self, step: str) -> None:
        self.log.close()
        self.step, self.started = step, time.perf_counter()
        self.log = open(self.log_path(step), "w", encoding="utf-8")  # noqa: SIM115
        self.terminal.write(
            f"kftune: {step} ... (log: {self.log_path(step)})\n" if self.verbose else f"kftune: {step} ...\n"
        )

    def failure(self) -> str:
        """The failing step's root cause (as the step reported it, else the last exception line of its
        log), then the path of its log."""
        cause = (
            self.root_causes.get(self.step)
            or self.last_exception.get(self.step)
            or "no exception recorded; see the log"
        )
        return f"step {self.step} failed: {cause}\n  log: {self.log_path(self.step)}"

    def close(self) -> None:
        if self.pending:
            self._line(self.pending)
            self.pending = ""
        self.log.close()
        super().close()


def run_pipeline(
    config: RunConfig, out_dir: str | Path, arguments: dict[str, Any] | None = None, verbose: bool = False
) -> dict[str, Any]:
    """Execute the DAG; returns the register step's summary plus wall time and output locations.
    `arguments` override pipeline parameters, as a run started from the Kubeflow UI's form would.
    Each step's output goes to `<out_dir>/logs/<step>.log` (and to the terminal too with `verbose`)."""
    from kfp import local

    from kftune.pipelines.kftune_pipeline import build_pipeline, pipeline_arguments

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # The local runner ignores display names and cannot tell our images hold Python; both are expected here.
    warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
    warnings.filterwarnings("ignore", message=".*custom or non-Python base image.*")
    started = time.perf_counter()
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(out / "pipeline"))
    logs = StepLogs(out / LOG_FOLDER, sys.stdout, verbose)
    try:
        with contextlib.redirect_stdout(logs), step_environment():
            here = on_this_machine(config)
            task = build_pipeline(here.cluster)(**{**pipeline_arguments(here), **(arguments or {})})
    except RuntimeError:
        raise KftuneError(logs.failure()) from None
    finally:
        logs.close()
    summary_path = Path(task.outputs["Output"].path)
    summary = json.loads(summary_path.read_text())
    summary["wall_seconds"] = round(time.perf_counter() - started, 1)
    summary["outputs"] = {"pipeline": str(summary_path.parents[1]), "run_dir": str(out)}
    return summary
