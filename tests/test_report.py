"""The HTML report draws what training recorded: the training loss and, when the run evaluated during
training (train.eval_every_steps), the validation loss on the same step axis."""

from __future__ import annotations

from kftune.evaluate.report import render_report

EVALUATION = {"rows": 4, "label_names": ["neg", "pos"], "tuned": {"accuracy": 0.75}, "base": {"accuracy": 0.5}}


def train_log(history: list[dict]) -> dict:
    return {
        "trainable_parameters": 10,
        "total_parameters": 100,
        "steps": history[-1]["step"],
        "seconds": 1.0,
        "seconds_per_step": 0.1,
        "workers": 1,
        "history": history,
    }


def test_validation_loss_is_drawn_beside_the_training_loss():
    history = [{"step": s, "loss": 1.0 / s} | ({"validation_loss": 1.2 / s} if s % 2 == 0 else {}) for s in range(1, 7)]
    page = render_report("run", EVALUATION, train_log(history), ["accuracy"])
    assert page.count("<polyline") == 2 and "validation" in page and "(steps 1-6)" in page


def test_without_validation_only_the_training_curve():
    page = render_report(
        "run", EVALUATION, train_log([{"step": s, "loss": 1.0 / s} for s in range(1, 4)]), ["accuracy"]
    )
    assert page.count("<polyline") == 1 and "validation" not in page
