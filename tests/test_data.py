import json

import pytest

from kftune.config import parse_config
from kftune.data.prepare import prepare, read_split, write_prepared
from kftune.errors import KftuneError


def test_prepare_maps_cleans_and_splits(make_config, tmp_path):
    rows = ["sentence\tlabel", "good movie\t1", "bad movie\t0", "  \t1", "good movie\t1", "fine\t1", "awful\t0"]
    source = tmp_path / "train.tsv"
    source.write_text("\n".join(rows) + "\n")
    config = parse_config(make_config(data={"path": str(source), "columns": {"text": "sentence"}, "split": {"test": 0.25}}))
    prepared = prepare(config)
    assert prepared.dropped == {"empty field": [f"{source}:4"], "duplicate": [f"{source}:5"]}
    assert sum(len(s) for s in prepared.splits.values()) == 4
    assert len(prepared.splits["test"]) == 1 and prepared.splits["validation"] == []
    assert prepared.label_names == ["0", "1"]
    card = write_prepared(prepared, tmp_path / "out")
    assert card["dropped"]["duplicate"]["count"] == 1
    assert [r["text"] for r in read_split(tmp_path / "out", "train")] == [r["text"] for r in prepared.splits["train"]]
    assert all(r["source"].startswith(str(source)) for r in prepared.splits["train"])


def test_split_is_deterministic_per_seed(make_config, tiny_data):
    config = make_config(data={"split": {"test": 0.25, "validation": 0.25}})
    first = prepare(parse_config(config))
    again = prepare(parse_config(config))
    other = prepare(parse_config({**config, "train": {**config["train"], "seed": 1}}))
    assert first.splits == again.splits
    assert first.splits["test"] != other.splits["test"]
    assert (len(first.splits["train"]), len(first.splits["validation"]), len(first.splits["test"])) == (32, 16, 16)


def test_separate_test_file_and_label_balance(make_config):
    prepared = prepare(parse_config(make_config()))
    assert len(prepared.splits["train"]) == 64 and len(prepared.splits["test"]) == 32
    assert {r["label"] for r in prepared.splits["test"]} == {0, 1}


def test_text_labels_become_sorted_ids(make_config, tmp_path):
    source = tmp_path / "t.jsonl"
    source.write_text("".join(json.dumps({"text": f"row {i}", "label": ["neg", "pos"][i % 2]}) + "\n" for i in range(8)))
    prepared = prepare(parse_config(make_config(data={"path": str(source), "columns": {}, "split": {"test": 0.5}})))
    assert prepared.label_names == ["neg", "pos"]
    assert {r["label"] for r in prepared.splits["train"]} <= {0, 1}


@pytest.mark.parametrize(
    ("content", "name", "expected"),
    [
        ('{"text": "a", "label": 1}\n{"text": oops}\n', "bad.jsonl", r"bad.jsonl:2: not a JSON object"),
        ('{"text": "a", "label": 1}\n{"label": 0}\n', "short.jsonl", r"short.jsonl:2: missing column 'text'"),
        ("text,label\na,1,extra\n", "wide.csv", r"wide.csv:2: 3 fields, the header has 2"),
        ("text\tlabel\n", "empty.tsv", r"data.path: the train split is empty"),
        ('[{"text": "a", "label": 1}, 3]', "arr.json", r"arr.json: record 2 is a int"),
    ],
)
def test_malformed_files_name_file_and_line(make_config, tmp_path, content, name, expected):
    source = tmp_path / name
    source.write_text(content)
    with pytest.raises(KftuneError, match=expected):
        prepare(parse_config(make_config(data={"path": str(source), "columns": {}, "split": {"test": 0.5}})))


def test_missing_file_and_column(make_config, tiny_data):
    with pytest.raises(KftuneError, match="data file not found: /nonexistent.tsv"):
        prepare(parse_config(make_config(data={"path": "/nonexistent.tsv"})))
    with pytest.raises(KftuneError, match=r"data.columns.text: column 'sentense' is not in .*train.tsv \(its columns: sentence, label\)"):
        prepare(parse_config(make_config(data={"columns": {"text": "sentense"}})))


def test_empty_test_split_and_unknown_label(make_config, tmp_path):
    with pytest.raises(KftuneError, match="data.split.test: the test split is empty"):
        prepare(parse_config(make_config(data={"split": {"test": 0.0}})))
    test_file = tmp_path / "dev.tsv"
    test_file.write_text("sentence\tlabel\nok\t7\n")
    with pytest.raises(KftuneError, match=r"dev.tsv:2: label '7' in the test split never occurs in training"):
        prepare(parse_config(make_config(data={"split": {"test": str(test_file)}})))
