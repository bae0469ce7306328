"""Prompt templates are data: one YAML file per template in `templates/`, chosen by name.

A template has a `prompt` format string (what the model reads) and, for causal LMs, a `target`
(what it learns to write). Fields are `{name}` slots filled from the mapped data columns. A
`verbalizer` (label -> words) turns classification into scoring those words after the prompt.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from pathlib import Path

import yaml

TEMPLATE_DIR = Path(__file__).with_name("templates")


@dataclass(frozen=True)
class Template:
    name: str
    description: str
    tasks: tuple[str, ...]
    prompt: str
    target: str = ""
    prompt_without_input: str | None = None
    optional: tuple[str, ...] = field(default_factory=tuple)
    verbalizer: dict[str, tuple[str, ...]] | None = None
    """Label name -> words; the first word is the training target."""

    @property
    def fields(self) -> list[str]:
        """Required data fields, in order of first appearance."""
        names: list[str] = []
        for text in (self.prompt, self.target):
            for _, name, _, _ in string.Formatter().parse(text):
                if name and name not in names and name not in self.optional:
                    names.append(name)
        return names

    @property
    def labelled(self) -> bool:
        """Rows need a label: the template classifies through its verbalizer."""
        return self.verbalizer is not None

    def render(self, row: dict[str, str], label_name: str | None = None) -> tuple[str, str]:
        """(prompt, target) for one row; `prompt_without_input` is used when the optional input is empty.
        With a verbalizer, the target is the first word of the row's label."""
        values = {name: row.get(name, "") for name in self.fields + list(self.optional)}
        prompt = self.prompt
        if self.prompt_without_input is not None and not str(values.get("input", "")).strip():
            prompt = self.prompt_without_input
        if self.verbalizer is not None and label_name is not None:
            return prompt.format_map(values), self.verbalizer[label_name][0]
        return prompt.format_map(values), self.target.format_map(values)


def _load(path: Path) -> Template:
    spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    return Template(
        name=path.stem,
        description=spec["description"],
        tasks=tuple(spec["tasks"]),
        prompt=spec["prompt"],
        target=spec.get("target", ""),
        prompt_without_input=spec.get("prompt_without_input"),
        optional=tuple(spec.get("optional", ())),
        verbalizer={str(k): tuple(v) for k, v in spec["verbalizer"].items()} if "verbalizer" in spec else None,
    )


TEMPLATES: dict[str, Template] = {p.stem: _load(p) for p in sorted(TEMPLATE_DIR.glob("*.yaml"))}


def template_fields(name: str) -> list[str]:
    return TEMPLATES[name].fields
