"""Bad input stops `kftune run` before any step, with one message naming the file or field,
and leaves no MLflow version behind."""

from pathlib import Path

import pytest
import torch

from conftest import STORIES
from kftune.cli import main

GBK_REVIEWS = str(Path(__file__).parent / "fixtures" / "chnsenticorp_htl_gbk_40.csv")
LLAMA = {
    "model": {"name_or_path": str(STORIES), "task": "causal_lm"},
    "prompt": {"template": "text"},  # bias-free, q_proj/v_proj
    "eval": {"metrics": ["perplexity"]},
    "registry": {"gate": {"metric": "perplexity"}},
}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"data": {"path": "/no/such/train.tsv"}}, "data file not found: /no/such/train.tsv"),
        ({"data": {"columns": {"text": "review"}}}, "data.columns.text: column 'review' is not in"),
        ({"data": {"split": {"test": 0.0}}}, "data.split.test: the test split is empty"),
        ({"method": {"name": "loraa"}}, "method.name: unknown method 'loraa'"),
        ({"model": {"name_or_path": "WEIGHTLESS"}}, "has no weights"),
        ({"model": {"name_or_path": "/no/such/model"}}, "model.name_or_path: '/no/such/model' is not a directory"),
        # the method built on the model's architecture (meta device): the field, and what the model offers
        (
            {"method": {"name": "lora", "target_modules": ["q_proj"]}},
            "method.target_modules: ['q_proj'] does not fit the bert model at",
        ),
        (
            {"method": {"name": "lora", "target_modules": ["q_proj"]}},
            "the model (bert, 6 layers) has linear layers named: classifier, dense, key, query, value",
        ),
        ({"method": {"name": "layer_range", "start": 2, "end": 9}}, "method.end: 9 but the model has 6 layers"),
        (
            {"method": {"name": "attention_only", "heads": [12]}},
            "method.heads: [12] out of range; the model has 12 heads",
        ),
        (
            {**LLAMA, "method": {"name": "bitfit"}},
            "method.name: bitfit trains bias terms and this llama model has none",
        ),
        (
            {**LLAMA, "method": {"name": "lora", "target_modules": ["query", "value"]}},
            "the model (llama, 5 layers) has linear layers named: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj",
        ),
        # the data: one class, an unclosed quote, an encoding
        ({"data": {"path": "ONE_LABEL"}}, "data.path: every row of the train split has label '1'"),
        (
            {"data": {"path": "UNCLOSED_QUOTE", "columns": {}}},
            "bad.csv:3: a quoted field starts on this line and never closes",
        ),
        (
            {"data": {"path": GBK_REVIEWS, "columns": {"text": "review"}, "split": {"test": 0.25}}},
            "chnsenticorp_htl_gbk_40.csv:2: not valid utf-8 text",
        ),
        # where evaluation runs
        pytest.param(
            {"eval": {"device": "cuda"}},
            "eval.device: cuda, but no CUDA GPU is visible here",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU"),
        ),
    ],
)
def test_bad_input_fails_before_training(make_config, write_config, tmp_path, capsys, change, expected):
    if change.get("model", {}).get("name_or_path") == "WEIGHTLESS":
        weightless = tmp_path / "weightless"
        weightless.mkdir()
        (weightless / "config.json").write_text("{}")
        change = {"model": {"name_or_path": str(weightless)}}
    files = {
        "ONE_LABEL": "sentence\tlabel\n" + "".join(f"review {i}\t1\n" for i in range(20)),
        "UNCLOSED_QUOTE": 'text,label\ngood,1\n"bad movie,0\nfine,1\nawful,0\n',
    }
    if change.get("data", {}).get("path") in files:
        data_file = tmp_path / ("bad.csv" if change["data"]["path"] == "UNCLOSED_QUOTE" else "train.tsv")
        data_file.write_text(files[change["data"]["path"]])
        change = {"data": {**change["data"], "path": str(data_file), "split": {"test": 0.25}}}
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


def test_data_warnings_are_shown_before_training(make_config, write_config, tmp_path, capsys):
    train, test = tmp_path / "train.tsv", tmp_path / "test.tsv"
    train.write_text("sentence\tlabel\n" + "".join(f"review {i}\t{i % 2}\n" for i in range(40)))
    test.write_text("sentence\tlabel\nreview 3\t1\n" + "".join(f"new review {i}\t{i % 2}\n" for i in range(29)))
    config = make_config(data={"path": str(train), "split": {"test": str(test)}})
    assert main(["validate", str(write_config(config))]) == 0
    assert (
        f"kftune: warning: data.split.test: 1 of 30 test rows (3.3%) also occur in the train split (first: {test}:2)"
        in capsys.readouterr().err
    )
