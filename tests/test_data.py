import csv
import io
import json
from pathlib import Path

import pytest

from conftest import EXAMPLES
from kftune.config import parse_config
from kftune.data.prepare import prepare, read_split, write_prepared
from kftune.errors import KftuneError


def test_prepare_maps_cleans_and_splits(make_config, tmp_path):
    rows = ["sentence\tlabel", "good movie\t1", "bad movie\t0", "  \t1", "good movie\t1", "fine\t1", "awful\t0"]
    source = tmp_path / "train.tsv"
    source.write_text("\n".join(rows) + "\n")
    config = parse_config(
        make_config(data={"path": str(source), "columns": {"text": "sentence"}, "split": {"test": 0.25}})
    )
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
    source.write_text(
        "".join(json.dumps({"text": f"row {i}", "label": ["neg", "pos"][i % 2]}) + "\n" for i in range(8))
    )
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
    with pytest.raises(KftuneError, match=r"data file not found: /nonexistent\.tsv"):
        prepare(parse_config(make_config(data={"path": "/nonexistent.tsv"})))
    with pytest.raises(
        KftuneError,
        match=r"data.columns.text: column 'sentense' is not in .*train.tsv \(its columns: sentence, label\)",
    ):
        prepare(parse_config(make_config(data={"columns": {"text": "sentense"}})))


def test_empty_test_split_and_unknown_label(make_config, tmp_path):
    with pytest.raises(KftuneError, match=r"data\.split\.test: the test split is empty"):
        prepare(parse_config(make_config(data={"split": {"test": 0.0}})))
    test_file = tmp_path / "dev.tsv"
    test_file.write_text("sentence\tlabel\nok\t7\n")
    with pytest.raises(KftuneError, match=r"dev.tsv:2: label '7' in the test split never occurs in training"):
        prepare(parse_config(make_config(data={"split": {"test": str(test_file)}})))


GBK_REVIEWS = Path(__file__).parent / "fixtures" / "chnsenticorp_htl_gbk_40.csv"


def chinese_config(make_config, **data) -> dict:
    return make_config(data={"path": str(GBK_REVIEWS), "columns": {"text": "review"}, "split": {"test": 0.25}, **data})


def test_gbk_file_reads_with_data_encoding(make_config):
    with pytest.raises(KftuneError, match=r"chnsenticorp_htl_gbk_40\.csv:2: not valid utf-8 text .*set data\.encoding"):
        prepare(parse_config(chinese_config(make_config)))
    prepared = prepare(parse_config(chinese_config(make_config, encoding="gbk")))
    rows = prepared.splits["train"] + prepared.splits["test"]
    assert len(rows) == 40 and prepared.label_names == ["0", "1"]
    utf8 = {
        r["review"]
        for r in csv.DictReader(
            io.StringIO((EXAMPLES / "data" / "chnsenticorp_htl_every4th.csv").read_text(encoding="utf-8"))
        )
    }
    assert {r["text"] for r in rows} <= utf8  # the same reviews, character for character
    assert any("酒店" in r["text"] for r in rows)


def test_utf8_with_byte_order_mark_and_unknown_encoding(make_config, tmp_path):
    source = tmp_path / "bom.csv"
    source.write_bytes(("\ufeffsentence,label\n" + "".join(f"row {i},{i % 2}\n" for i in range(8))).encode("utf-8"))
    assert (
        len(prepare(parse_config(make_config(data={"path": str(source), "split": {"test": 0.25}}))).splits["train"])
        == 6
    )
    with pytest.raises(KftuneError, match=r"data\.encoding: .*unknown text encoding 'gbkk'"):
        parse_config(make_config(data={"encoding": "gbkk"}))


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        # the quote opened on line 3 runs to the end of the file
        (
            'text,label\ngood,1\n"bad movie,0\nfine,1\nawful,0\n',
            r"bad\.csv:3: a quoted field starts on this line and never closes",
        ),
        # ... or until a later quote, after which the row is not CSV any more
        (
            'text,label\ngood,1\n"bad movie,0\nfine,1\n"awful",0\n',
            r"bad\.csv:3: a quoted field starts on this line and never closes",
        ),
        ('text,label\n"a "quoted" word",1\n', r"bad\.csv:2: not valid CSV \(',' expected after '\"'\)"),
    ],
)
def test_unclosed_quote_names_the_line_it_opens(make_config, tmp_path, content, expected):
    source = tmp_path / "bad.csv"
    source.write_text(content)
    with pytest.raises(KftuneError, match=expected):
        prepare(parse_config(make_config(data={"path": str(source), "columns": {}, "split": {"test": 0.5}})))


def test_quoted_line_breaks_keep_the_first_line_of_the_row(make_config, tmp_path):
    source = tmp_path / "multi.csv"
    source.write_text('text,label\n"two\nlines",1\nthree,0\nfour,1\nfive,0\n')
    prepared = prepare(parse_config(make_config(data={"path": str(source), "columns": {}, "split": {"test": 0.25}})))
    sources = {r["text"]: r["source"] for split in prepared.splits.values() for r in split}
    assert sources["two\nlines"].endswith("multi.csv:2") and sources["three"].endswith("multi.csv:4")


def labelled(path, rows: list[tuple[str, str]]):
    path.write_text("sentence\tlabel\n" + "".join(f"{text}\t{label}\n" for text, label in rows))
    return str(path)


def test_a_single_class_is_an_error(make_config, tmp_path):
    one_label = labelled(tmp_path / "ones.tsv", [(f"review {i}", "1") for i in range(20)])
    with pytest.raises(
        KftuneError, match=r"data\.path: every row of the train split has label '1' \(15 rows .*two or more classes"
    ):
        prepare(parse_config(make_config(data={"path": one_label, "split": {"test": 0.25}})))


def test_rows_shared_with_the_test_split(make_config, tmp_path):
    train = labelled(tmp_path / "train.tsv", [(f"review {i}", str(i % 2)) for i in range(40)])
    one_shared = labelled(
        tmp_path / "test1.tsv", [("review 3", "1")] + [(f"new review {i}", str(i % 2)) for i in range(29)]
    )
    prepared = prepare(parse_config(make_config(data={"path": train, "split": {"test": one_shared}})))
    assert prepared.warnings == [
        f"data.split.test: 1 of 30 test rows (3.3%) also occur in the train split (first: {one_shared}:2)"
    ]
    card = write_prepared(prepared, tmp_path / "out")
    assert card["warnings"] == prepared.warnings
    two_shared = labelled(
        tmp_path / "test2.tsv",
        [("review 3", "1"), ("review 4", "0")] + [(f"new review {i}", str(i % 2)) for i in range(18)],
    )
    with pytest.raises(
        KftuneError,
        match=r"data\.split\.test: 2 of 20 test rows \(10\.0%\) also occur in the train split .*more than 5%",
    ):
        prepare(parse_config(make_config(data={"path": train, "split": {"test": two_shared}})))


def test_extreme_imbalance_is_a_warning_with_the_counts(make_config, tmp_path):
    train = labelled(tmp_path / "train.tsv", [(f"review {i}", "0" if i < 3 else "1") for i in range(40)])
    test = labelled(tmp_path / "test.tsv", [("other 1", "0"), ("other 2", "1")])
    prepared = prepare(parse_config(make_config(data={"path": train, "split": {"test": test}})))
    assert len(prepared.warnings) == 1 and prepared.warnings[0].startswith(
        "data.path: the train split is imbalanced (0: 3, 1: 37 rows)"
    )
    balanced = labelled(tmp_path / "balanced.tsv", [(f"review {i}", "0" if i < 4 else "1") for i in range(40)])
    assert prepare(parse_config(make_config(data={"path": balanced, "split": {"test": test}}))).warnings == []
