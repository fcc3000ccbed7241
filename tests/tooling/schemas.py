"""docs/schema loaded as validators, for tests that check real messages against the contract."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from referencing import Registry, Resource

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "docs" / "schema"
NAMES = ("request", "answer", "progress", "status")


def load(name: str) -> dict:
    return json.loads((SCHEMA_DIR / f"{name}.schema.json").read_text())


def _registry() -> Registry:
    resources = [(load(n)["$id"], Resource.from_contents(load(n))) for n in NAMES]
    return Registry().with_resources(resources)


def validator(name: str, pointer: str = "") -> Draft202012Validator:
    """A validator for schema `name`, or for the sub-schema at `pointer` (e.g. $defs/tasks/asr)."""
    schema: dict[str, Any] = load(name)
    if pointer:
        schema = {"$ref": f"{schema['$id']}#/{pointer}"}
    return Draft202012Validator(schema, registry=_registry(),
                                format_checker=Draft202012Validator.FORMAT_CHECKER)


def errors(name: str, doc: Any, pointer: str = "") -> list[str]:
    """Every way `doc` breaks the schema (empty: it conforms)."""
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in validator(name, pointer).iter_errors(doc)]
