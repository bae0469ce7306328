"""The prepare_data step: read, map columns, clean, split deterministically, and describe the result.

Rows that are dropped are counted by reason with their line numbers in the data card, so nothing
disappears silently.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kftune.alignment.data import preference_rows
from kftune.config import RunConfig
from kftune.data.readers import Table, read_table
from kftune.errors import KftuneError
from kftune.prompts.templates import resolve_template

SPLITS = ("train", "validation", "test")
DROPPED_LINES_SHOWN = 20
MAX_SHARED_TEST_SHARE = 0.05
"""Test rows whose inputs also occur in training inflate the score; above this share of the test split
that is an error, below it a warning."""
IMBALANCE_RATIO = 10
"""A train split whose largest class has this many times the rows of its smallest gets a warning."""


@dataclass
class PreparedData:
    splits: dict[str, list[dict[str, Any]]]
    label_names: list[str]
    dataset_sha256: str
    dropped: dict[str, list[str]] = field(default_factory=dict)
    """reason -> 'file:line' of every dropped row."""
    source_rows: int = 0
    warnings: list[str] = field(default_factory=list)
    """What a user should know before training on this data (shown by preflight, kept in the data card)."""


def prepare(config: RunConfig) -> PreparedData:
    data = config.data
    train_table = read_table(data.path, data.format, data.max_rows, data.encoding)
    dropped: dict[str, list[str]] = defaultdict(list)
    clean = _clean if config.stage == "sft" else preference_rows  # alignment stages read preference data
    rows = clean(config, train_table, dropped)
    hashes = [train_table.sha256]

    rng = random.Random(config.train.seed)
    order = list(range(len(rows)))
    rng.shuffle(order)
    if isinstance(data.split.test, str):
        test_table = read_table(data.split.test, data.format, encoding=data.encoding)
        hashes.append(test_table.sha256)
        test = clean(config, test_table, dropped)
        n_test = 0
    else:
        n_test = round(len(rows) * data.split.test)
    n_validation = round(len(rows) * data.split.validation)
    shuffled = [rows[i] for i in order]
    held_test = shuffled[:n_test]
    validation = shuffled[n_test : n_test + n_validation]
    train = sorted(shuffled[n_test + n_validation :], key=lambda r: r["_order"])
    if not isinstance(data.split.test, str):
        test = held_test
    splits = {"train": train, "validation": validation, "test": test}
    _check_not_empty(config, splits, len(rows))

    warnings = _shared_rows_warnings(splits)
    label_names: list[str] = []
    if config.has_labels:
        label_names = _encode_labels(config, splits)
        _check_verbalizer(config, label_names)
        warnings += _imbalance_warnings(splits["train"], label_names)
    for split_rows in splits.values():
        for row in split_rows:
            row.pop("_order")
    digest = hashes[0] if len(hashes) == 1 else _combine(hashes)
    return PreparedData(splits, label_names, digest, dict(dropped), len(train_table.records), warnings)


def _clean(config: RunConfig, table: Table, dropped: dict[str, list[str]]) -> list[dict[str, Any]]:
    """Map columns to template fields, strip text, drop empty, over-long and duplicate rows."""
    fields = config.required_fields()
    for name in fields:
        column = config.columns_for(name)
        if table.records and column not in table.columns:
            key = f"data.columns.{name}" if name in config.data.columns else f"data.columns (field {name!r})"
            raise KftuneError(
                f"{key}: column {column!r} is not in {table.path} (its columns: {', '.join(table.columns)})"
            )
    optional = [f for f in resolve_template(config.prompt.template).optional if config.columns_for(f) in table.columns]
    seen: set[tuple] = set()
    rows = []
    for record in table.records:
        where = f"{table.path}:{record.line}"
        row: dict[str, Any] = {}
        for name in fields + optional:
            column = config.columns_for(name)
            if column not in record.values:
                raise KftuneError(f"{where}: missing column {column!r}")
            row[name] = field_value(record.values[column])
        texts = [str(row[n]) for n in fields + optional if n != "label" and row[n] is not None]
        if any(row[n] in (None, "") for n in fields):
            dropped["empty field"].append(where)
            continue
        if sum(len(t) for t in texts) > config.data.max_chars:
            dropped[f"longer than data.max_chars={config.data.max_chars}"].append(where)
            continue
        key = tuple(str(row[n]) for n in fields + optional)
        if config.data.dedupe and key in seen:
            dropped["duplicate"].append(where)
            continue
        seen.add(key)
        row["source"] = where
        row["_order"] = len(rows)
        rows.append(row)
    return rows


def field_value(value: Any) -> Any:
    """A data value as the template reads it (prepare and serving alike): text stripped."""
    return value.strip() if isinstance(value, str) else value


def _check_not_empty(config: RunConfig, splits: dict[str, list], n_rows: int) -> None:
    if not splits["train"]:
        raise KftuneError(f"data.path: the train split is empty ({n_rows} usable rows in {config.data.path})")
    if not splits["test"]:
        source = config.data.split.test
        raise KftuneError(f"data.split.test: the test split is empty ({source!r} gives no rows)")
    if config.data.split.validation > 0 and not splits["validation"]:
        raise KftuneError(f"data.split.validation: {config.data.split.validation} of {n_rows} rows is an empty split")


def _encode_labels(config: RunConfig, splits: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Labels become ids 0..n-1; integer labels keep their value, text labels are sorted."""
    present = Counter(str(row["label"]) for row in splits["train"])
    if len(present) < 2:
        label, rows = present.most_common(1)[0]
        raise KftuneError(
            f"data.path: every row of the train split has label {label!r} ({rows} rows in {config.data.path}); "
            f"classification needs two or more classes (column {config.columns_for('label')!r})"
        )
    values = sorted(present)
    if all(v.isdigit() for v in values):
        values = [str(i) for i in range(max(int(v) for v in values) + 1)]
    index = {v: i for i, v in enumerate(values)}
    for name, split_rows in splits.items():
        for row in split_rows:
            label = str(row["label"])
            if label not in index:
                raise KftuneError(
                    f"{row['source']}: label {label!r} in the {name} split never occurs in training (labels: {', '.join(values)})"
                )
            row["label"] = index[label]
    expected = config.model.num_labels
    if expected is not None and expected != len(values):
        raise KftuneError(
            f"model.num_labels: {expected}, but the training data has {len(values)} labels ({', '.join(values)})"
        )
    return values


def _inputs(row: dict[str, Any]) -> tuple[str, ...]:
    """What the model sees of a row: every field but the label (and bookkeeping)."""
    return tuple(str(value) for name, value in row.items() if name not in ("label", "source", "_order"))


def _shared_rows_warnings(splits: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Test rows whose inputs also occur in training: a warning with their count, an error above
    MAX_SHARED_TEST_SHARE of the test split (the score would measure memory, not generalisation)."""
    seen = {_inputs(row) for row in splits["train"]}
    shared = [row["source"] for row in splits["test"] if _inputs(row) in seen]
    if not shared:
        return []
    test = splits["test"]
    message = (
        f"{len(shared)} of {len(test)} test rows ({100 * len(shared) / len(test):.1f}%) also occur in the train split "
        f"(first: {', '.join(shared[:3])})"
    )
    if len(shared) > MAX_SHARED_TEST_SHARE * len(test):
        raise KftuneError(
            f"data.split.test: {message}; more than {MAX_SHARED_TEST_SHARE:.0%} would make the test score "
            "measure memorisation: remove them from one of the files"
        )
    return [f"data.split.test: {message}"]


def _imbalance_warnings(train: list[dict[str, Any]], label_names: list[str]) -> list[str]:
    counts = Counter(label_names[row["label"]] for row in train)
    largest, smallest = max(counts.values()), min(counts.get(name, 0) for name in label_names)
    if smallest and largest < IMBALANCE_RATIO * smallest:
        return []
    shown = ", ".join(f"{name}: {counts.get(name, 0)}" for name in label_names)
    return [
        f"data.path: the train split is imbalanced ({shown} rows); a model can score well by predicting "
        f"{counts.most_common(1)[0][0]!r} alone: compare macro_f1 with accuracy"
    ]


def _check_verbalizer(config: RunConfig, label_names: list[str]) -> None:
    template = resolve_template(config.prompt.template)
    covered = template.label_names
    missing = [name for name in label_names if template.labelled and name not in covered]
    if missing:
        what = "verbalizer" if template.verbalizer is not None else "hypotheses"
        raise KftuneError(
            f"prompt.template: the {what} of {template.name!r} has no words for label(s) {', '.join(missing)} (it covers: {', '.join(covered)})"
        )


def _combine(hashes: list[str]) -> str:
    return hashlib.sha256("".join(hashes).encode()).hexdigest()


def data_card(prepared: PreparedData) -> dict[str, Any]:
    """Counts, label balance and length histogram per split: what a reviewer checks before training."""
    card: dict[str, Any] = {
        "dataset_sha256": prepared.dataset_sha256,
        "source_rows": prepared.source_rows,
        "label_names": prepared.label_names,
        "splits": {},
        "dropped": {
            reason: {"count": len(lines), "first": lines[:DROPPED_LINES_SHOWN]}
            for reason, lines in prepared.dropped.items()
        },
        "warnings": prepared.warnings,
    }
    for name, rows in prepared.splits.items():
        lengths = [sum(len(str(v)) for k, v in row.items() if k not in ("label", "source")) for row in rows]
        entry: dict[str, Any] = {"rows": len(rows), "length_histogram": _histogram(lengths)}
        if prepared.label_names:
            counts = Counter(row["label"] for row in rows)
            entry["labels"] = {prepared.label_names[i]: counts.get(i, 0) for i in range(len(prepared.label_names))}
        card["splits"][name] = entry
    return card


def _histogram(values: list[int], bins: int = 10) -> dict[str, int]:
    if not values:
        return {}
    low, high = min(values), max(values)
    width = max(1, -(-(high - low + 1) // bins))
    counts = Counter((v - low) // width for v in values)
    return {
        f"{low + i * width}-{low + (i + 1) * width - 1}": counts.get(i, 0)
        for i in range(bins)
        if low + i * width <= high
    }


def data_card_markdown(card: dict[str, Any]) -> str:
    lines = ["# Data card", "", f"sha256 `{card['dataset_sha256'][:16]}…` · {card['source_rows']} source rows", ""]
    if card.get("source_fingerprint"):
        lines[-1:-1] = [f"source files: `{card['source_fingerprint']}`"]
    labels = card["label_names"]
    header = "| split | rows |" + "".join(f" {label} |" for label in labels)
    lines += [header, "|---|---:|" + "---:|" * len(labels)]
    for name, entry in card["splits"].items():
        lines.append(f"| {name} | {entry['rows']} |" + "".join(f" {entry['labels'][label]} |" for label in labels))
    if card["warnings"]:
        lines += ["", "## Warnings", ""] + [f"- {warning}" for warning in card["warnings"]]
    if card["dropped"]:
        lines += ["", "## Dropped rows", "", "| reason | rows | first lines |", "|---|---:|---|"]
        for reason, entry in card["dropped"].items():
            lines.append(f"| {reason} | {entry['count']} | {', '.join(entry['first'][:5])} |")
    lines += ["", "## Text length (characters), train", "", "| range | rows |", "|---|---:|"]
    lines += [f"| {span} | {count} |" for span, count in card["splits"]["train"]["length_histogram"].items()]
    return "\n".join(lines) + "\n"


def write_prepared(prepared: PreparedData, out_dir: str | Path, source_fingerprint: str = "") -> dict[str, Any]:
    """Write one JSONL per split plus data_card.json; returns the card. `source_fingerprint` identifies the
    source files as read (`kftune.data.fingerprint`), `dataset_sha256` the rows kept."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in SPLITS:
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as handle:
            for row in prepared.splits[name]:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    card = {**data_card(prepared), "source_fingerprint": source_fingerprint}
    (out / "data_card.json").write_text(json.dumps(card, indent=2, ensure_ascii=False))
    return card


def read_split(data_dir: str | Path, name: str) -> list[dict[str, Any]]:
    with open(Path(data_dir) / f"{name}.jsonl", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]
