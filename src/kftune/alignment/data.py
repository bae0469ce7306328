"""Preference data into one row form, for the prepare_data step. Every form becomes

- pairs: `{"prompt": turns, "chosen": text, "rejected": text}`
- unpaired feedback (KTO): `{"prompt": turns, "completion": text, "label": true|false}`
- prompts (online RL): `{"prompt": turns}`

where `turns` is the dialogue before the response as `{role, content}` messages ending with a user
turn. Columns are mapped through `data.columns` like any other field. Rows that cannot be used are
dropped and counted by reason with their file and line (the data card lists them).
"""

from __future__ import annotations

from typing import Any

from kftune.alignment.config import ONLINE_STAGES
from kftune.data.readers import Table
from kftune.errors import KftuneError
from kftune.prompts.templates import _turns

HH_HUMAN, HH_ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
FORM_COLUMNS = {
    "pairs": ("prompt", "chosen", "rejected"),
    "hh_rlhf": ("chosen", "rejected"),
    "conversations": ("conversations", "chosen", "rejected"),
    "unpaired": ("prompt", "completion", "label"),
    "prompts": ("prompt",),
}
TRUE_LABELS, FALSE_LABELS = {"true", "1", "yes", "desirable"}, {"false", "0", "no", "undesirable"}


def data_form(config, table: Table) -> str:
    """The form `preference.format` names, or (auto) the one the table's columns match."""
    chosen = config.preference.format
    if chosen == "auto":
        has = {field for field in ("prompt", "conversations", "chosen") if config.columns_for(field) in table.columns}
        chosen = (
            "prompts"
            if config.stage in ONLINE_STAGES
            else "unpaired"
            if config.stage == "kto"
            else "conversations"
            if "conversations" in has
            else "pairs"
            if "prompt" in has
            else "hh_rlhf"
        )
    missing = [f for f in FORM_COLUMNS[chosen] if config.columns_for(f) not in table.columns]
    if table.records and missing:
        wanted = ", ".join(config.columns_for(f) for f in missing)
        raise KftuneError(
            f"data.columns: {table.path} has no column {wanted} for preference.format {chosen} "
            f"(its columns: {', '.join(table.columns)}; map others through data.columns)"
        )
    return chosen


def preference_rows(config, table: Table, dropped: dict[str, list[str]]) -> list[dict[str, Any]]:
    """The table's rows in the common form, without the unusable and (`data.dedupe`) duplicate ones."""
    form = data_form(config, table)
    seen: set[str] = set()
    rows = []
    for record in table.records:
        where = f"{table.path}:{record.line}"
        values = {field: record.values.get(config.columns_for(field)) for field in FORM_COLUMNS[form]}
        try:
            row = _row(form, values)
        except _Unusable as reason:
            dropped[str(reason)].append(where)
            continue
        except KftuneError as exc:
            raise KftuneError(f"{where}: {exc}") from None
        text = repr(row)
        if len(text) > config.data.max_chars:
            dropped[f"longer than data.max_chars={config.data.max_chars}"].append(where)
            continue
        if config.data.dedupe and text in seen:
            dropped["duplicate"].append(where)
            continue
        seen.add(text)
        rows.append({**row, "source": where, "_order": len(rows)})
    return rows


class _Unusable(Exception):
    """A row to drop; the message is the reason the data card counts it under."""


def _row(form: str, values: dict[str, Any]) -> dict[str, Any]:
    if any(value in (None, "", []) for value in values.values()):
        raise _Unusable("empty field")
    if form == "hh_rlhf":
        prompt, chosen = split_last_assistant_turn(str(values["chosen"]))
        rejected_prompt, rejected = split_last_assistant_turn(str(values["rejected"]))
        if rejected_prompt != prompt:
            raise _Unusable("chosen and rejected dialogues differ before the last assistant turn")
        values = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    elif form == "conversations":
        values = {
            "prompt": _turns(values["conversations"]),
            "chosen": _reply(values["chosen"]),
            "rejected": _reply(values["rejected"]),
        }
    row = {"prompt": _dialogue(values["prompt"])}
    if form == "prompts":
        return row
    if form == "unpaired":
        return {**row, "completion": _text(values["completion"]), "label": _judgement(values["label"])}
    row.update(chosen=_text(values["chosen"]), rejected=_text(values["rejected"]))
    if row["chosen"] == row["rejected"]:
        raise _Unusable("chosen and rejected are identical")
    return row


def split_last_assistant_turn(dialogue: str) -> tuple[list[dict[str, str]], str]:
    """An HH-RLHF transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") as the turns before its last
    assistant turn, and that turn's text (the response)."""
    cut = dialogue.rfind(HH_ASSISTANT)
    if cut < 0:
        raise _Unusable("no assistant turn in the dialogue")
    return _hh_turns(dialogue[:cut]), dialogue[cut + len(HH_ASSISTANT) :]


def _hh_turns(transcript: str) -> list[dict[str, str]]:
    turns: list[dict[str, str]] = []
    rest = transcript
    while rest.strip():
        starts = {role: rest.find(marker) for role, marker in (("user", HH_HUMAN), ("assistant", HH_ASSISTANT))}
        role = min((r for r in starts if starts[r] >= 0), key=starts.get, default=None)
        if role is None or (not turns and starts[role] != 0):
            raise _Unusable("not a Human/Assistant transcript")
        body = rest[starts[role] + len(HH_HUMAN if role == "user" else HH_ASSISTANT) :]
        following = [i for i in (body.find(HH_HUMAN), body.find(HH_ASSISTANT)) if i >= 0]
        end = min(following, default=len(body))
        turns.append({"role": role, "content": body[:end].strip()})
        rest = body[end:]
    return turns


def _dialogue(prompt: Any) -> list[dict[str, str]]:
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _turns(prompt)
    turns = [{**turn, "content": str(turn["content"]).strip()} for turn in turns]
    if not turns or turns[-1]["role"] != "user" or not turns[-1]["content"]:
        raise _Unusable("the dialogue before the response does not end with a user turn")
    return turns


def _reply(turn: Any) -> str:
    """A LLaMA-Factory response: one {from: gpt, value} turn (or plain text)."""
    if isinstance(turn, dict):
        return str(turn.get("value", turn.get("content", "")))
    return str(turn)


def _text(value: Any) -> str:
    text = str(value).strip()
    if not text:
        raise _Unusable("empty response")
    return text


def _judgement(label: Any) -> bool:
    """A KTO label: whether the completion is desirable."""
    if isinstance(label, bool):
        return label
    word = str(label).strip().lower()
    if word in TRUE_LABELS | FALSE_LABELS:
        return word in TRUE_LABELS
    raise KftuneError(
        f"label {label!r}: a KTO label says whether the completion is desirable "
        f"({', '.join(sorted(TRUE_LABELS))} or {', '.join(sorted(FALSE_LABELS))})"
    )
