"""Offline validation of custom resources against the CRDs in tests/fixtures/crds (see SOURCES.md there)."""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path

import jsonschema
import yaml

CRDS = Path(__file__).parent / "fixtures" / "crds"


def strict(schema: dict) -> dict:
    """Unknown fields become errors, as with `kubectl apply --validate=strict` (the API server would prune them silently)."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


@cache
def crd_schema(file: str, version: str = "v1") -> dict:
    crd = yaml.load((CRDS / file).read_text(), Loader=yaml.CSafeLoader)  # 1.4 MB: the C loader is 10x faster
    served = {v["name"]: v for v in crd["spec"]["versions"]}
    return strict(served[version]["schema"]["openAPIV3Schema"])


def validate_custom_resource(manifest: dict, file: str) -> None:
    jsonschema.Draft7Validator(crd_schema(file)).validate(manifest)
