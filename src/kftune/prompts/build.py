"""The build_prompts step: render each row through its template and tokenize it for training.

Classification rows keep their integer label; language-model rows carry per-token labels where
everything but the trained-on text is -100 (causal LMs: the response or assistant turns; masked LMs:
the [MASK] slot). Nothing is cut silently: truncated and dropped rows are counted in
`prompts_meta.json` and in the preview.
"""

from __future__ import annotations

import html
import json
import random
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from kftune.config import RunConfig
from kftune.data.prepare import SPLITS, read_split
from kftune.errors import KftuneError
from kftune.models import load_tokenizer, resolve_model_path
from kftune.prompts.packing import IGNORE_INDEX, pack_rows
from kftune.prompts.templates import MASK, Segment, Template, resolve_template

META_FILE = "prompts_meta.json"
STREAMED_SPLITS = ("train", "validation")
"""Splits stored as Arrow files that training workers memory-map (`PromptRows`)."""
ARROW_BATCH_ROWS = 8192
PREVIEW_ROWS = 8


def build_prompts(config: RunConfig, data_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Tokenize every split of a prepared dataset into `out_dir`; returns the metadata written."""
    if config.stage != "sft":
        from kftune.alignment.encode import build_preference_prompts

        return build_preference_prompts(config, data_dir, out_dir)
    template = resolve_template(config.prompt.template)
    tokenizer = load_tokenizer(resolve_model_path(config.model.name_or_path))
    data_card = json.loads((Path(data_dir) / "data_card.json").read_text())
    label_names = data_card["label_names"]
    demos = Demonstrations(read_split(data_dir, "train"), label_names, config.prompt.few_shot, config.train.seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stats: dict[str, Counter] = {}
    preview: list[dict[str, Any]] = []
    packing = None
    for split in SPLITS:
        counts: Counter = Counter()
        encoded_rows = []
        for index, row in enumerate(read_split(data_dir, split)):
            label = label_names[row["label"]] if template.labelled else None
            examples = encode_example(
                config.model.task,
                template,
                tokenizer,
                config.prompt.max_length,
                label_names,
                index,
                row,
                counts,
                label,
                demos.for_row(split, index, row),
            )
            for segments, encoded in examples:
                if encoded is None:
                    continue
                encoded["source"] = row["source"]
                if config.model.task == "sequence_classification":
                    encoded["labels"] = row["label"]
                if template.labelled:
                    encoded["class_label"] = row["label"]
                encoded_rows.append(encoded)
                counts["rows"] += 1
                counts[f"tokens_{_bucket(len(encoded['input_ids']))}"] += 1
                if split == "train" and len(preview) < PREVIEW_ROWS:
                    classified = config.model.task == "sequence_classification"  # the head predicts the label: show it
                    shown = [*segments[:-1], (label_names[row["label"]], True)] if classified else segments
                    preview.append({"segments": shown, "tokens": len(encoded["input_ids"])})
        if split == "train" and config.prompt.packing:
            encoded_rows, packing = pack_rows(encoded_rows, config.prompt.max_length)
        write_split(out, split, encoded_rows)
        stats[split] = counts
    meta = {
        "task": config.model.task,
        "template": template.name,
        "max_length": config.prompt.max_length,
        "few_shot": config.prompt.few_shot,
        "label_names": label_names,
        "dataset_sha256": data_card["dataset_sha256"],
        "pad_token_id": tokenizer.pad_token_id,
        "splits": {split: dict(counts) for split, counts in stats.items()},
        "packing": packing,
        "preview": preview,
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False))
    return meta


class Demonstrations:
    """Few-shot demonstrations, drawn from the train split only: the same k rows for a row on every
    run (seeded by the row's split and position), as many of each label as k allows, never the row itself."""

    def __init__(self, train: list[dict[str, Any]], label_names: list[str], k: int, seed: int):
        self.k, self.seed, self.label_names = k, seed, label_names
        self.pools: dict[int | None, list[dict[str, Any]]] = defaultdict(list)
        for row in train:
            self.pools[row["label"] if label_names else None].append(row)
        if k and label_names and any(len(self.pools[i]) < -(-k // len(label_names)) for i in range(len(label_names))):
            raise KftuneError(
                f"prompt.few_shot: {k} demonstrations stratified over {len(label_names)} labels need "
                f"{-(-k // len(label_names))} training rows of every label"
            )

    def for_row(self, split: str, index: int, row: dict[str, Any]) -> list[dict[str, Any]]:
        if not self.k:
            return []
        rng = random.Random(f"{self.seed}:{split}:{index}")
        keys = sorted(self.pools, key=lambda key: -1 if key is None else key)
        wanted = Counter(keys[j % len(keys)] for j in range(self.k))  # stratified: labels take turns
        chosen = []
        for key, count in wanted.items():
            pool = [r for r in self.pools[key] if r["source"] != row["source"]]
            chosen += rng.sample(pool, min(count, len(pool)))
        rng.shuffle(chosen)  # no fixed label order right before the query
        return [{**r, "label_name": self.label_names[r["label"]] if self.label_names else None} for r in chosen]


def encode_example(
    task: str,
    template: Template,
    tokenizer,
    max_length: int,
    label_names: list[str],
    index: int,
    row: dict[str, Any],
    counts: Counter,
    label: str | None = None,
    demos: list[dict[str, Any]] = (),
) -> list[tuple[list[Segment], dict | None]]:
    """One example's rendered segments and encoded row (None: too long, counted); build_prompts and serving share it.
    Entailment gives one row per label's hypothesis, grouped by `index` so scoring picks the best one."""
    hypotheses = label_names if template.hypotheses is not None else [None]
    examples = []
    for hypothesis in hypotheses:
        segments = template.render(row, label, demos, tokenizer, hypothesis)
        encoded = encode(task, tokenizer, segments, max_length, template, counts)
        if encoded is not None and hypothesis is not None:
            encoded.update(group=index, hypothesis_label=label_names.index(hypothesis))
        examples.append((segments, encoded))
    return examples


def encode(
    task: str, tokenizer, segments: list[Segment], max_length: int, template: Template, counts: Counter
) -> dict | None:
    """Token ids and per-token labels of rendered segments; None (counted) when the row must be dropped."""
    prompt = "".join(text for text, trained in segments if not trained)
    if task == "sequence_classification":
        ids = tokenizer(prompt, truncation=False)["input_ids"]
        if len(ids) > max_length:
            counts["truncated"] += 1
            ids = tokenizer(prompt, truncation=True, max_length=max_length)["input_ids"]
        return {"input_ids": ids}
    if task == "masked_lm":
        return _encode_masked(tokenizer, prompt, segments[-1][0], max_length, counts)
    ids: list[int] = []
    labels: list[int] = []
    text = ""
    for i, (piece, trained) in enumerate(segments):
        special = not template.chat  # a chat template writes its own special tokens
        new = (
            tokenizer(piece, add_special_tokens=special)["input_ids"]
            if i == 0
            else continuation_ids(tokenizer, text, ids, piece, special)
        )
        ids += new
        labels += new if trained else [IGNORE_INDEX] * len(new)
        text += piece
    if not template.chat and tokenizer.eos_token_id is not None:  # a chat template closes each assistant turn
        ids.append(tokenizer.eos_token_id)  # itself; an encoder's tokenizer (a reward model on BERT) has no EOS
        labels.append(tokenizer.eos_token_id)
    if len(ids) > max_length:
        counts["dropped_too_long"] += 1  # cutting would remove (part of) the answer the model must learn
        return None
    return {"input_ids": ids, "labels": labels}


def _encode_masked(tokenizer, prompt: str, word: str, max_length: int, counts: Counter) -> dict | None:
    """PET for masked LMs: the label word's id at the [MASK] slot, -100 everywhere else."""
    if tokenizer.mask_token is None:
        raise KftuneError("model.task: masked_lm needs a tokenizer with a mask token")
    ids = tokenizer(prompt.replace(MASK, tokenizer.mask_token))["input_ids"]
    if len(ids) > max_length:
        counts["dropped_too_long"] += 1  # truncation could cut the [MASK] slot itself
        return None
    labels = [IGNORE_INDEX] * len(ids)
    if word:
        labels[ids.index(tokenizer.mask_token_id)] = single_token_id(tokenizer, word)
    return {"input_ids": ids, "labels": labels}


def single_token_id(tokenizer, word: str) -> int:
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise KftuneError(
            f"prompt.template: verbalizer word {word!r} is {len(ids)} tokens for this tokenizer; "
            "a masked LM scores one token at the [MASK] slot"
        )
    return ids[0]


def continuation_ids(
    tokenizer, prompt: str, prompt_ids: list[int], text: str, add_special_tokens: bool = True
) -> list[int]:
    """Token ids of `text` as it continues `prompt`. Tokenized together, so a word such as " great"
    gets the ids it has after the prompt (SentencePiece merges the leading space differently alone)."""
    if prompt:
        joint = tokenizer(prompt + text, add_special_tokens=add_special_tokens)["input_ids"]
        if joint[: len(prompt_ids)] == prompt_ids and len(joint) > len(prompt_ids):
            return joint[len(prompt_ids) :]
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _bucket(n_tokens: int, width: int = 16) -> str:
    low = (n_tokens - 1) // width * width + 1
    return f"{low:04d}-{low + width - 1:04d}"


def write_split(out: Path, split: str, rows: list[dict[str, Any]]) -> None:
    """The splits training reads as Arrow IPC files (`PromptRows`); the test split, which the evaluate
    step reads whole and fingerprints, as JSON lines."""
    if split not in STREAMED_SPLITS:
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in rows)
        return
    import pyarrow as pa

    columns = dict.fromkeys(
        key for row in rows for key in row
    )  # every row's keys (from_pylist would take the first row's only)
    table = pa.Table.from_pydict({key: [row.get(key) for row in rows] for key in columns})
    with pa.OSFile(str(out / f"{split}.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=ARROW_BATCH_ROWS)


class PromptRows:
    """A split's rows, memory-mapped from its Arrow file (as Hugging Face datasets does): a worker's
    own memory does not grow with the split. The pages of the rows it reads are page cache, shared by
    the workers on a node and dropped by the kernel under pressure, though counted in each one's RSS.
    Indexing gives one row as a dict, slicing a list of them."""

    def __init__(self, path: str | Path):
        import mmap

        import pyarrow as pa

        self.path = Path(path)
        with open(self.path, "rb") as handle:
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        mapped.madvise(mmap.MADV_RANDOM)  # rows come in shuffled order: no read-ahead of megabytes around each one
        self.table = pa.ipc.open_file(pa.py_buffer(mapped)).read_all()  # zero-copy: the buffers point into the map

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, index):
        if isinstance(index, slice):  # row by row: `take` would copy whole columns
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(f"{self.path}: row {index} of {len(self)}")
        return _present(self.table.slice(index % len(self), 1).to_pylist()[0])


def _present(row: dict[str, Any]) -> dict[str, Any]:
    """A row without the columns only other rows have (Arrow fills them with nulls)."""
    return {key: value for key, value in row.items() if value is not None}


def split_file(prompts_dir: str | Path, split: str) -> Path:
    return Path(prompts_dir) / (f"{split}.arrow" if split in STREAMED_SPLITS else f"{split}.jsonl")


def open_prompts(prompts_dir: str | Path, split: str) -> PromptRows | list[dict[str, Any]]:
    """A split for random access without reading it whole where it is stored as Arrow."""
    path = split_file(prompts_dir, split)
    return PromptRows(path) if path.suffix == ".arrow" else read_prompts(prompts_dir, split)


def read_prompts(prompts_dir: str | Path, split: str) -> list[dict[str, Any]]:
    """A split's rows as a list, read whole."""
    path = split_file(prompts_dir, split)
    if path.suffix == ".arrow":
        rows = PromptRows(path)
        return rows[0 : len(rows)]
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def read_meta(prompts_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(prompts_dir) / META_FILE).read_text())


def preview_html(meta: dict[str, Any]) -> str:
    """First rendered rows (trained-on text highlighted), token-length histogram, truncation and packing counts, for the KFP UI."""
    rows = "".join(
        "<tr><td><pre>"
        + "".join(f"<mark>{html.escape(t)}</mark>" if trained else html.escape(t) for t, trained in r["segments"])
        + f"</pre></td><td>{r['tokens']}</td></tr>"
        for r in meta["preview"]
    )
    stats = "".join(
        f"<tr><td>{split}</td><td>{c.get('rows', 0)}</td><td>{c.get('truncated', 0)}</td><td>{c.get('dropped_too_long', 0)}</td></tr>"
        for split, c in meta["splits"].items()
    )
    train = meta["splits"]["train"]
    buckets = sorted((k.removeprefix("tokens_"), v) for k, v in train.items() if k.startswith("tokens_"))
    peak = max((v for _, v in buckets), default=1)
    bars = "".join(
        f"<tr><td>{span}</td><td><div style='background:#4a7bd0;height:12px;width:{300 * v // peak}px'></div></td><td>{v}</td></tr>"
        for span, v in buckets
    )
    packing = meta.get("packing")
    packed = (
        f"<h3>Packing</h3><p>{packing['examples']} training examples in {packing['rows']} rows of at most {meta['max_length']} tokens "
        f"({packing['examples_per_row']} per row, {packing['fill']:.1%} of the row tokens are real, "
        f"{packing['padding_saved']:.1%} of the padding saved); examples never attend to each other.</p>"
        if packing
        else ""
    )
    return (
        f"<html><body style='font-family:sans-serif'><h2>Prompts: template <code>{html.escape(meta['template'])}</code>, "
        f"max {meta['max_length']} tokens, {meta.get('few_shot', 0)}-shot</h2>"
        f"<table border=1 cellpadding=4><tr><th>split</th><th>rows</th><th>truncated</th><th>dropped (too long)</th></tr>{stats}</table>"
        f"{packed}<h3>Tokens per training row</h3><table>{bars}</table>"
        f"<h3>First rows (highlighted: what the model learns to write)</h3><table border=1 cellpadding=4><tr><th>rendered</th><th>tokens</th></tr>{rows}</table>"
        "</body></html>"
    )
