"""The sweep in MLflow: one parent run, and each trial a child run (MLflow's `mlflow.parentRunId` tag)
with its sampled values as params, every validation as step metrics, and how it ended as a tag.

`TrialRuns` is a Ray Tune callback, so it runs in the Tuner's process: only that process writes to
the tracking store. A resumed sweep finds the child runs it started before by their trial id tag.
"""

from __future__ import annotations

from typing import Any

from ray.tune import Callback

PARENT_TAG = "mlflow.parentRunId"
TRIAL_TAG = "kftune.sweep.trial_id"
OUTCOME_TAG = "kftune.sweep.outcome"
LOGGED_METRICS = ("validation_loss", "validation_accuracy", "loss", "lr")


def trial_name(trial_id: str) -> str:
    """`trial-3` for Tune's `a1b2c_00003`: the trial's place in the sweep."""
    return f"trial-{int(trial_id.rsplit('_', 1)[-1])}"


class TrialRuns(Callback):
    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, metric: str):
        self.tracking_uri, self.experiment_id, self.parent_run_id = tracking_uri, experiment_id, parent_run_id
        self.metric = metric
        self.runs: dict[str, str] = {}
        self._client = None

    def __getstate__(self) -> dict[str, Any]:
        """Tune pickles its callbacks with the experiment (to restore it); the client reconnects after."""
        return {**self.__dict__, "_client": None}

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def child_run(self, trial) -> str:
        """The trial's child run id: found by its tag (a resumed sweep), or created with the trial's values as params."""
        if trial.trial_id in self.runs:
            return self.runs[trial.trial_id]
        found = self.client.search_runs(
            [self.experiment_id],
            f"tags.`{PARENT_TAG}` = '{self.parent_run_id}' and tags.`{TRIAL_TAG}` = '{trial.trial_id}'",
        )
        if found:
            run_id = found[0].info.run_id
        else:
            run_id = self.client.create_run(
                self.experiment_id,
                run_name=trial_name(trial.trial_id),
                tags={PARENT_TAG: self.parent_run_id, TRIAL_TAG: trial.trial_id},
            ).info.run_id
            for field, value in trial.config.items():
                self.client.log_param(run_id, field, value)
        self.runs[trial.trial_id] = run_id
        return run_id

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self.child_run(trial)
        values = ", ".join(f"{field}={_short(value)}" for field, value in trial.config.items())
        _say(f"sweep: {trial_name(trial.trial_id)} started: {values}")

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict[str, Any], **info) -> None:
        run_id, step = self.child_run(trial), int(result["step"])
        for key in LOGGED_METRICS:
            if key in result:
                self.client.log_metric(run_id, key, float(result[key]), step=step)
        line = f"sweep: {trial_name(trial.trial_id)} step {step}/{result['total_steps']}: {self.metric} {result[self.metric]:.4f}"
        if result.get("done") and step < result["total_steps"]:  # Tune marks the result that its scheduler stopped on
            self.client.set_tag(run_id, OUTCOME_TAG, f"stopped by ASHA at step {step}")
            line += ", stopped by ASHA"
        _say(line)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        run_id = self.child_run(trial)
        outcome = self.client.get_run(run_id).data.tags.get(OUTCOME_TAG)
        if outcome is None:
            outcome = "finished"
            self.client.set_tag(run_id, OUTCOME_TAG, outcome)
        self.client.set_terminated(run_id, "FINISHED")
        _say(f"sweep: {trial_name(trial.trial_id)} {outcome}")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        run_id = self.child_run(trial)
        self.client.set_tag(run_id, OUTCOME_TAG, "failed")
        self.client.set_terminated(run_id, "FAILED")
        _say(f"sweep: {trial_name(trial.trial_id)} failed; its log: {trial.local_path}")


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _say(line: str) -> None:
    """Print a progress line. The callback does not keep `print` itself: once trials have run, Ray has replaced
    `builtins.print` in the driver (by tqdm_ray's `safe_print`), and Tune, pickling its callbacks when the next
    sweep in the same process starts, then refuses the original."""
    print(line, flush=True)
