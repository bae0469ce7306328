"""Read tabular training data into records that remember where they came from (file and line)."""

from __future__ import annotations

import codecs
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
        raise KftuneError(
            f"data.format: cannot tell the format of {path} from its extension; set data.format to one of {', '.join(sorted(set(FORMATS.values())))}"
        )
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


def read_table(path: str, declared_format: str = "auto", max_rows: int | None = None, encoding: str = "utf-8") -> Table:
    """Every record of the file; malformed ones raise an error naming file and line. Text formats are
    decoded with `encoding` (a byte-order mark is skipped under utf-8)."""
    fmt = detect_format(path, declared_format)
    raw = _open_bytes(path)
    digest = hashlib.sha256(raw).hexdigest()
    if fmt == "parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(io.BytesIO(raw)).to_pylist()
        records = [Record(i + 1, row) for i, row in enumerate(rows[:max_rows])]
        columns = list(rows[0]) if rows else []
        return Table(path, columns, records, digest)
    text = _decode(path, raw, encoding)
    if fmt == "jsonl":
        records, columns = _read_jsonl(path, text, max_rows)
    elif fmt == "json":
        records, columns = _read_json(path, text, max_rows)
    else:
        records, columns = _read_delimited(path, text, "\t" if fmt == "tsv" else ",", max_rows)
    return Table(path, columns, records, digest)


def _decode(path: str, raw: bytes, encoding: str) -> str:
    try:
        return raw.decode("utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding)
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        hint = "set data.encoding to the file's encoding (e.g. gbk, gb18030, utf-16, latin-1)"
        raise KftuneError(f"{path}:{line}: not valid {encoding} text (byte {raw[exc.start]:#04x}); {hint}") from None


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
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting, strict=True)
    rows = _rows_with_start_lines(path, text, reader)
    header = next(rows, None)
    if header is None:
        return [], []
    columns = [name.strip() for name in header[1]]
    records: list[Record] = []
    for start, fields in rows:
        if not any(field.strip() for field in fields):
            continue
        if len(fields) != len(columns):
            spans = (
                f" (a quoted field opened on line {_unclosed_quote_line(text, start)} runs on to line {reader.line_num})"
                if reader.line_num > start
                else ""
            )
            raise KftuneError(f"{path}:{start}: {len(fields)} fields, the header has {len(columns)}{spans}")
        records.append(Record(start, dict(zip(columns, fields, strict=True))))
        if max_rows and len(records) >= max_rows:
            break
    return records, columns


def _rows_with_start_lines(path: str, text: str, reader):
    """(first line, fields) per row: a quoted field may hold line breaks, so a row can span lines."""
    start = 1
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            if reader.line_num > start or "end of data" in str(exc):  # a quote ran on past its line
                opened = _unclosed_quote_line(text, start)
                raise KftuneError(
                    f"{path}:{opened}: a quoted field starts on this line and never closes ({exc} at line {reader.line_num})"
                ) from None
            raise KftuneError(f"{path}:{reader.line_num}: not valid CSV ({exc})") from None
        yield start, fields
        start = reader.line_num + 1


def _unclosed_quote_line(text: str, start: int) -> int:
    """The first line, from `start` on, that ends inside a quoted field: where a field that runs on
    over line breaks opened (a doubled quote inside a quoted field is an escaped quote)."""
    lines = text.split("\n")
    for number in range(start, len(lines) + 1):
        if lines[number - 1].replace('""', "").count('"') % 2:
            return number
    return start
