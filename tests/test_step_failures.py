"""A failing step names the exception that started it (a Ray worker's own, not the errors wrapped
around it) on one line, before its traceback; `kftune run` shows that line first (tests/test_end_to_end.py)."""

import pytest
from peft.tuners.tuners_utils import NoMatchingPeftModuleError
from ray.train import WorkerGroupError

from kftune.errors import KftuneError
from kftune.steps import ROOT_CAUSE_PREFIX, reports_root_cause, root_cause


def test_root_cause_goes_through_ray_train_and_explicit_causes():
    worker = NoMatchingPeftModuleError("No modules were targeted for adaptation.")
    group = WorkerGroupError("rank 0 failed", {1: ValueError("rank 1 saw rank 0 go"), 0: worker})
    wrapped = RuntimeError("the train step failed")
    wrapped.__cause__ = group  # what `raise ... from group` sets
    assert root_cause(wrapped) is worker
    assert root_cause(worker) is worker


def test_a_step_prints_its_root_cause_then_raises(capsys):
    @reports_root_cause
    def step():
        try:
            {}["missing"]
        except KeyError:
            raise KftuneError("data.path: no rows") from None  # `from None`: the KeyError is not the cause

    with pytest.raises(KftuneError):
        step()
    assert capsys.readouterr().out == f"{ROOT_CAUSE_PREFIX}KftuneError: data.path: no rows\n"
