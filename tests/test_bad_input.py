"""Bad input stops `kftune run` before any step, with one message naming the file or field,
and leaves no MLflow version behind."""

import pytest

from kftune.cli import main


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"data": {"path": "/no/such/train.tsv"}}, "data file not found: /no/such/train.tsv"),
        ({"data": {"columns": {"text": "review"}}}, "data.columns.text: column 'review' is not in"),
        ({"data": {"split": {"test": 0.0}}}, "data.split.test: the test split is empty"),
        ({"method": {"name": "loraa"}}, "method.name: unknown method 'loraa'"),
        ({"model": {"name_or_path": "WEIGHTLESS"}}, "has no weights"),
        ({"model": {"name_or_path": "/no/such/model"}}, "model.name_or_path: '/no/such/model' is not a directory"),
    ],
)
def test_bad_input_fails_before_training(make_config, write_config, tmp_path, capsys, change, expected):
    if change.get("model", {}).get("name_or_path") == "WEIGHTLESS":
        weightless = tmp_path / "weightless"
        weightless.mkdir()
        (weightless / "config.json").write_text("{}")
        change = {"model": {"name_or_path": str(weightless)}}
    config = make_config(**change)
    if change.get("method"):
        config["method"] = change["method"]
    del config["registry"]["tracking_uri"], config["registry"]["artifact_location"]
    out = tmp_path / "run"
    assert main(["run", str(write_config(config)), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert expected in error
    assert "Traceback" not in error
    assert not (out / "mlflow.db").exists() and not (out / "pipeline").exists()
