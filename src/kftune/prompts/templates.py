"""Prompt templates are data: one YAML file per template, chosen by name (`templates/`) or by path.

A template has a `prompt` format string (what the model reads) and, for causal LMs, a `target`
(what it learns to write). Fields are `{name}` slots filled from the mapped data columns. Optional
parts, each one key of the file:

- `verbalizer` (label -> words): classification as scoring those words after the prompt (PET) or at
  its `[MASK]` slot (masked LMs); the first word is the training target.
- `hypotheses` (label -> sentence) + `answers` (yes/no words): classification as entailment, one
  `{hypothesis}` per label, each scored by whether the model answers yes.
- `instruction`: the five-field task description of Natural Instructions (Title, Definition,
  Things to avoid, positive/negative examples, Prompt), rendered before every prompt.
- `target_with_rationale`: chain of thought; used when the row's optional `rationale` is not empty.
- `chat`: render through the tokenizer's own chat template; `conversation` names a field holding a
  ShareGPT-style list of turns (multi-turn; the loss covers assistant turns only).
"""

from __future__ import annotations

import functools
import string
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kftune.errors import KftuneError

TEMPLATE_DIR = Path(__file__).with_name("templates")
MASK = "[MASK]"
HYPOTHESIS = "hypothesis"  # the slot an entailment template fills per label, not a data field
RATIONALE = "rationale"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
TASKS = ("sequence_classification", "causal_lm", "masked_lm")

Segment = tuple[str, bool]
"""A piece of rendered text and whether the model learns to write it (its tokens carry the loss)."""


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Example(_Spec):
    input: str
    output: str
    explanation: str = ""


class Instruction(_Spec):
    """How a task is described to an instruction-tuned model (Natural Instructions, Mishra et al. 2022)."""

    title: str
    definition: str
    avoid: str = ""
    positive_examples: list[Example] = Field(default_factory=list)
    negative_examples: list[Example] = Field(default_factory=list)
    prompt: str = ""

    def render(self) -> str:
        lines = [f"Title: {self.title}", f"Definition: {self.definition}"]
        if self.avoid:
            lines.append(f"Things to avoid: {self.avoid}")
        for kind, examples in (("Positive", self.positive_examples), ("Negative", self.negative_examples)):
            for example in examples:
                lines += [f"{kind} example:", f"Input: {example.input}", f"Output: {example.output}"]
                if example.explanation:
                    lines.append(f"Explanation: {example.explanation}")
        if self.prompt:
            lines.append(f"Prompt: {self.prompt}")
        return "\n".join(lines) + "\n\n"


class Template(_Spec):
    name: str = ""
    description: str
    tasks: list[str] = Field(min_length=1)
    prompt: str = ""
    target: str = ""
    prompt_without_input: str | None = None
    optional: list[str] = Field(default_factory=list)
    verbalizer: dict[str, list[str]] | None = None
    hypotheses: dict[str, str] | None = None
    answers: dict[str, list[str]] | None = None
    instruction: Instruction | None = None
    target_with_rationale: str | None = None
    demo_separator: str = "\n\n"
    """Between few-shot demonstrations and before the query (non-chat templates)."""
    chat: bool = False
    system: str | None = None
    """Chat: a system message put first (else the tokenizer's template decides)."""
    conversation: str | None = None
    """Chat: the field holding the whole conversation, a list of {from|role, value|content} turns."""

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: list[str]) -> list[str]:
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
        return tasks

    @field_validator("verbalizer", "answers")
    @classmethod
    def _words(cls, words: dict[str, list[str]] | None) -> dict[str, list[str]] | None:
        empty = [k for k, v in (words or {}).items() if not v]
        if empty:
            raise ValueError(f"label(s) {', '.join(empty)} have no words")
        return words

    @model_validator(mode="after")
    def _consistent(self) -> Template:
        for key in ("prompt", "target", "prompt_without_input", "target_with_rationale"):
            try:
                list(string.Formatter().parse(getattr(self, key) or ""))
            except ValueError as exc:
                raise ValueError(f"{key}: not a format string ({exc}); write literal braces as {{{{ }}}}") from None
        if (self.hypotheses is None) != (self.answers is None):
            raise ValueError("hypotheses and answers go together (entailment)")
        if self.answers is not None and set(self.answers) != {"yes", "no"}:
            raise ValueError(f"answers: needs exactly the keys yes and no, not {', '.join(self.answers)}")
        if self.hypotheses is not None and HYPOTHESIS not in self._slots(self.prompt):
            raise ValueError(f"prompt: an entailment template needs a {{{HYPOTHESIS}}} slot")
        if "masked_lm" in self.tasks and (self.prompt.count(MASK) != 1 or self.verbalizer is None):
            raise ValueError(f"prompt: a masked_lm template needs one {MASK} slot and a verbalizer")
        if self.conversation and not self.chat:
            raise ValueError("conversation: only chat templates render conversations (set chat: true)")
        return self

    @staticmethod
    def _slots(text: str | None) -> list[str]:
        return [name for _, name, _, _ in string.Formatter().parse(text or "") if name]

    @property
    def fields(self) -> list[str]:
        """Required data fields, in order of first appearance."""
        names: list[str] = [self.conversation] if self.conversation else []
        for text in (self.prompt, self.target, self.target_with_rationale):
            for name in self._slots(text):
                if name not in names and name not in self.optional and name != HYPOTHESIS:
                    names.append(name)
        return names

    @property
    def labelled(self) -> bool:
        """Rows need a label: the template classifies through a verbalizer or entailment hypotheses."""
        return self.verbalizer is not None or self.hypotheses is not None

    @property
    def label_names(self) -> list[str]:
        """The labels the template has words (or hypotheses) for."""
        return list(self.verbalizer or self.hypotheses or {})

    def render(
        self,
        row: dict[str, Any],
        label: str | None = None,
        demos: list[dict[str, Any]] = (),
        tokenizer=None,
        hypothesis: str | None = None,
    ) -> list[Segment]:
        """The row as segments (text, trained-on). `label` is the row's label name; `demos` are few-shot
        rows (each with its `label_name`) rendered before it; `hypothesis` is the label whose hypothesis an
        entailment template asks about. Chat templates need the tokenizer."""
        pairs = [self._pair(demo, demo.get("label_name"), None) for demo in demos]
        if self.chat:
            if self.conversation:
                messages = _turns(row[self.conversation])
            else:
                messages = [
                    {"role": role, "content": text}
                    for pair in [*pairs, self._pair(row, label, hypothesis)]
                    for role, text in zip(("user", "assistant"), pair, strict=False)
                ]
            if self.system and messages[0]["role"] != "system":
                messages.insert(0, {"role": "system", "content": self.system})
            return chat_segments(tokenizer, messages)
        header = self.instruction.render() if self.instruction else ""
        context = "".join(prompt + target + self.demo_separator for prompt, target in pairs)
        prompt, target = self._pair(row, label, hypothesis)
        return [(header + context + prompt, False), (target, True)]

    def _pair(self, row: dict[str, Any], label: str | None, hypothesis: str | None) -> tuple[str, str]:
        """(prompt, target) of one row."""
        values = {name: row.get(name, "") for name in self.fields + self.optional}
        prompt = self.prompt
        if self.prompt_without_input is not None and not str(values.get("input", "")).strip():
            prompt = self.prompt_without_input
        if self.hypotheses is not None:
            values[HYPOTHESIS] = self.hypotheses[hypothesis if hypothesis is not None else label]
            target = self.answers["yes" if hypothesis in (None, label) else "no"][0]
        elif self.verbalizer is not None and label is not None:
            target = self.verbalizer[label][0]
        elif self.target_with_rationale is not None and str(values.get(RATIONALE, "")).strip():
            target = self.target_with_rationale.format_map(values)
        else:
            target = self.target.format_map(values)
        return prompt.format_map(values), target


def _turns(conversation: Any) -> list[dict[str, str]]:
    """ShareGPT ({from, value}) or OpenAI-style ({role, content}) turns as {role, content}."""
    if not isinstance(conversation, list) or not conversation:
        raise KftuneError(f"a conversation must be a non-empty list of turns, not {str(conversation)[:80]!r}")
    turns = []
    for turn in conversation:
        role = ROLES.get(str(turn.get("from", turn.get("role"))))
        if role is None:
            raise KftuneError(f"conversation turn {str(turn)[:80]!r}: role must be one of {', '.join(ROLES)}")
        turns.append({"role": role, "content": turn.get("value", turn.get("content", ""))})
    return turns


def chat_segments(tokenizer, messages: list[dict[str, str]]) -> list[Segment]:
    """Split the tokenizer's chat rendering of `messages` into user/system text and assistant replies.
    Each reply is what the template adds after the generation prompt, end-of-turn marker included,
    so the model learns to stop."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise KftuneError(
            "prompt.template: a chat template needs a tokenizer with a chat template (tokenizer_config.json chat_template)"
        )
    segments: list[Segment] = []
    done = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        after = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (after.startswith(before) and before.startswith("".join(text for text, _ in segments))):
            raise KftuneError(
                "prompt.template: the tokenizer's chat template renders earlier turns differently once later ones follow; "
                "loss masking per turn needs a prefix-stable template"
            )
        segments += [(before[done:], False), (after[len(before) :], True)]
        done = len(after)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if full[done:]:
        segments.append((full[done:], False))
    return segments


def _load(path: Path, name: str) -> Template:
    """Read and validate one template file; every problem names the file and the field."""
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise KftuneError(f"prompt.template: {path}: cannot read it as YAML: {exc}") from None
    if not isinstance(spec, dict):
        raise KftuneError(f"prompt.template: {path}: the top level must be a mapping (description, tasks, prompt, ...)")
    try:
        return Template.model_validate({**spec, "name": name})
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"])
            message = err["msg"].removeprefix("Value error, ")
            problems.append(
                f"{path}: {where + ': ' if where else ''}{'unknown key' if err['type'] == 'extra_forbidden' else message}"
            )
        raise KftuneError("prompt.template: invalid template:\n  " + "\n  ".join(problems)) from None


PACKAGED = {p.stem: p for p in sorted(TEMPLATE_DIR.glob("*.yaml"))}


@functools.cache
def get_template(name_or_path: str) -> Template:
    """A packaged template by name, or a user's YAML file by path."""
    path = template_file(name_or_path)
    return _load(path, name_or_path if name_or_path in PACKAGED else str(path))


def resolve_template(value: str | dict[str, Any]) -> Template:
    """The run's template: its contents inline (what a compiled config carries), a packaged name, or a file."""
    if isinstance(value, str):
        return get_template(value)
    try:
        return Template.model_validate(value)
    except ValidationError as exc:
        problems = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()]
        raise KftuneError("prompt.template: invalid inline template: " + "; ".join(problems)) from None


def template_contents(path: str | Path) -> dict[str, Any]:
    """A user's template file, read and validated, as the mapping a config carries inline: the pods of a
    compiled pipeline render with it without the file, which exists only where the run was submitted."""
    return get_template(str(path)).model_dump(exclude_defaults=True) | {"name": Path(path).name}


def write_template(template: Template, path: Path) -> Path:
    """The template as a YAML file (what a registered model carries, so serving renders rows as training did)."""
    path.write_text(yaml.safe_dump(template.model_dump(exclude_defaults=True), allow_unicode=True, sort_keys=False))
    return path


def template_file(name_or_path: str) -> Path:
    """The YAML file behind a template name or path."""
    if name_or_path in PACKAGED:
        return PACKAGED[name_or_path]
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise KftuneError(f"prompt.template: template file {path} does not exist")
        return path
    raise KftuneError(
        f"prompt.template: unknown template {name_or_path!r}; choose from: {', '.join(PACKAGED)}, or give a path to a .yaml file"
    )
