"""The data fingerprint that keys prepare_data's cache on Kubeflow Pipelines (`kftune.data.fingerprint`)."""

from __future__ import annotations

import hashlib
import os

from kftune import steps
from kftune.config import parse_config
from kftune.data import fingerprint
from kftune.data.fingerprint import data_fingerprint, file_fingerprint


def test_a_local_file_is_identified_by_its_content(tmp_path):
    data = tmp_path / "train.tsv"
    data.write_text("sentence\tlabel\ngood\t1\n")
    first = file_fingerprint(str(data))
    assert first == "sha256:" + hashlib.sha256(data.read_bytes()).hexdigest()
    os.utime(data, ns=(1, 1))
    assert file_fingerprint(str(data)) == first, "a touched but unchanged file keeps its fingerprint"
    data.write_text("sentence\tlabel\nbad\t0\n")  # same size, other content
    assert file_fingerprint(str(data)) != first


def test_a_file_above_the_hashing_limit_is_identified_by_size_and_mtime(tmp_path, monkeypatch):
    data = tmp_path / "big.tsv"
    data.write_text("sentence\tlabel\n" + "good\t1\n" * 100)
    monkeypatch.setattr(fingerprint, "FULL_HASH_BYTES", 10)
    os.utime(data, ns=(5, 7))
    assert file_fingerprint(str(data)) == f"size-mtime:{data.stat().st_size}-7"


def test_data_without_a_fingerprint_gets_a_fresh_cache_key_every_time(make_config, tmp_path):
    assert file_fingerprint("http://127.0.0.1:9/train.tsv") is None
    assert file_fingerprint("s3://no-such-bucket-here/train.tsv") is None
    config = make_config(data={"path": "http://127.0.0.1:9/train.tsv", "columns": {"text": "sentence"}})
    assert data_fingerprint(parse_config(config)) is None
    first, second = steps.fingerprint_data(config), steps.fingerprint_data(config)
    assert first.startswith("unfingerprinted-") and first != second


def test_train_and_test_files_both_count(make_config, tiny_data, tmp_path):
    config = make_config()
    before = data_fingerprint(parse_config(config))
    test_copy = tmp_path / "dev.tsv"
    test_copy.write_text(tiny_data["test"].read_text() + "an extra dev sentence\t1\n")
    after = data_fingerprint(parse_config(make_config(data={"split": {"test": str(test_copy)}})))
    assert before.startswith("sha256:") and after != before
