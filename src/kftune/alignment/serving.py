"""A registered alignment model as served: a reward model takes `prompt` and `response` columns and
returns each response's scalar `reward`; a policy (dpo, kto, orpo, simpo) continues a rendered
`prompt` like any causal LM. A `prompt` is one user message, or a whole "Human: ... Assistant: ..."
transcript (HH-RLHF's layout) ending with a human turn."""

from __future__ import annotations

from collections import Counter
from typing import Any

from kftune.alignment.data import HH_HUMAN, _hh_turns, _Unusable
from kftune.alignment.encode import render_prompt, render_response
from kftune.prompts.build import encode

REWARD_INPUTS = ("prompt", "response")


def dialogue(prompt: str) -> list[dict[str, str]]:
    """A served prompt as turns: a transcript when it starts with a human turn, else one user message."""
    text = str(prompt)
    if text.lstrip().startswith(HH_HUMAN.strip()):
        try:
            turns = _hh_turns(HH_HUMAN + text.lstrip().removeprefix(HH_HUMAN.strip()))
        except _Unusable as exc:
            raise ValueError(f"prompt {text[:60]!r}: {exc}") from None
        return turns[:-1] if turns[-1] == {"role": "assistant", "content": ""} else turns  # a policy's rendered prompt
    return [{"role": "user", "content": text.strip()}]


def transcript(turns: list[dict[str, str]]) -> str:
    """Turns in the transcript form `dialogue` reads back."""
    speakers = {"user": HH_HUMAN, "assistant": "\n\nAssistant:", "system": "\n\nSystem:"}
    return "".join(f"{speakers[t['role']]} {t['content']}" for t in turns).strip()


def input_example(config, rows: list[dict[str, Any]]):
    """The first test rows as a served request has them."""
    import pandas as pd

    from kftune.models import load_tokenizer, resolve_model_path
    from kftune.prompts.templates import resolve_template

    if config.stage == "reward":
        return pd.DataFrame(
            {
                "prompt": [transcript(r["prompt"]) for r in rows],
                "response": [r.get("chosen", r.get("completion")) for r in rows],
            }
        )
    template = resolve_template(config.prompt.template)
    tokenizer = load_tokenizer(resolve_model_path(config.model.name_or_path)) if template.chat else None
    return pd.DataFrame({"prompt": [render_prompt(template, tokenizer, r["prompt"])[0][0] for r in rows]})


def reward_scores(model, tokenizer, template, frame, max_length: int, batch_size: int) -> list[float]:
    """Each row's response scored after its prompt, encoded as build_prompts encodes a pair's side."""
    from kftune.evaluate.evaluate import class_logits
    from kftune.registry.pyfunc_model import bad_request

    missing = [c for c in REWARD_INPUTS if c not in frame.columns]
    if missing:
        raise bad_request(f"a reward model needs column(s) {', '.join(missing)}")  # MLflow drops other columns
    rows, too_long = [], []
    for index, record in enumerate(frame.to_dict("records")):
        segments = render_response(template, tokenizer, dialogue(record["prompt"]), str(record["response"]).strip())
        encoded = encode("causal_lm", tokenizer, segments, max_length, template, Counter())
        if encoded is None:
            too_long.append(index)
        rows.append(encoded)
    if too_long:
        raise bad_request(f"rows {too_long} are longer than prompt.max_length={max_length} tokens once rendered")
    return class_logits(model, rows, tokenizer.pad_token_id, batch_size)[:, 0].tolist()
