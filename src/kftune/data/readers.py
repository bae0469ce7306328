"""Read tabular training data into records that remember where they came from (file and line)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kftune.errors import KftuneError

FORMATS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}


@dataclass
class Record:
    line: int
    """1-based line in the file (csv/tsv/jsonl), or 1-based record index (json/parquet)."""
    values: dict[str, Any]


@dataclass
class Table:
    path: str
    columns: list[str]
    records: list[Record]
    sha256: str


def detect_format(path: str, declared: str = "auto") -> str:
    if declared != "auto":
        return declared
    suffix = Path(path.removesuffix(".gz")).suffix.lower()
    if suffix not in FORMATS:
        raise KftuneError(f"data.format: cannot tell the format of {path} from its extension; set data.format to one of {', '.join(sorted(set(FORMATS.values())))}")
    return FORMATS[suffix]


def _open_bytes(path: str) -> bytes:
    if "://" in path:
        import fsspec

        with fsspec.open(path, "rb", compression="infer") as handle:
            return handle.read()
    local = Path(path)
    if not local.is_file():
        raise KftuneError(f"data file not found: {path}")
    raw = local.read_bytes()
    if path.endswith(".gz"):
        import gzip

        raw = gzip.decompress(raw)
    return raw


def read_table(path: str, declared_format: str = "auto", max_rows: int | None = None) -> Table:
    """Every record of the file; malformed ones raise an error naming file and line."""
    fmt = detect_format(path, declared_format)
    raw = _open_bytes(path)
    digest = hashlib.sha256(raw).hexdigest()
    if fmt == "parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(io.BytesIO(raw)).to_pylist()
        records = [Record(i + 1, row) for i, row in enumerate(rows[:max_rows])]
        columns = list(rows[0]) if rows else []
        return Table(path, columns, records, digest)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise KftuneError(f"{path}:{line}: not valid UTF-8 text") from None
    if fmt == "jsonl":
        records, columns = _read_jsonl(path, text, max_rows)
    elif fmt == "json":
        records, columns = _read_json(path, text, max_rows)
    else:
        records, columns = _read_delimited(path, text, "\t" if fmt == "tsv" else ",", max_rows)
    return Table(path, columns, records, digest)


def _read_jsonl(path: str, text: str, max_rows: int | None) -> tuple[list[Record], list[str]]:
    records: list[Record] = []
    columns: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise KftuneError(f"{path}:{number}: not a JSON object ({exc.msg})") from None
        if not isinstance(value, dict):
            raise KftuneError(f"{path}:{number}: expected a JSON object, got {type(value).__name__}")
        columns.extend(k for k in value if k not in columns)
        records.append(Record(number, value))
        if max_rows and len(records) >= max_rows:
            break
    return records, columns


def _read_json(path: str, text: str, max_rows: int | None) -> tuple[list[Record], list[str]]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise KftuneError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(value, list):
        raise KftuneError(f"{path}: expected a JSON array of objects")
    records: list[Record] = []
    columns: list[str] = []
    for index, item in enumerate(value[:max_rows], start=1):
        if not isinstance(item, dict):
            raise KftuneError(f"{path}: record {index} is a {type(item).__name__}, not an object")
        columns.extend(k for k in item if k not in columns)
        records.append(Record(index, item))
    return records, columns


def _read_delimited(path: str, text: str, delimiter: str, max_rows: int | None) -> tuple[list[Record], list[str]]:
    # GLUE-style TSV files are not quoted: a '"' inside a sentence is text, not a quote.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
    header = next(reader, None)
    if header is None:
        return [], []
    columns = [name.strip() for name in header]
    records: list[Record] = []
    for fields in reader:
        if not any(field.strip() for field in fields):
            continue
        if len(fields) != len(columns):
            raise KftuneError(f"{path}:{reader.line_num}: {len(fields)} fields, the header has {len(columns)}")
        records.append(Record(reader.line_num, dict(zip(columns, fields))))
        if max_rows and len(records) >= max_rows:
            break
    return records, columns
