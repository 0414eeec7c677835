"""The JSON Schemas pass strict validators, and every example validates against them.

Two third-party checks (issue 18, point 7): ajv (draft 2020-12, ``strict: true``) run by
Node on ``tests/js/check_schemas.mjs``, and the ``jsonschema`` package's meta-schema
check plus a walk for what strict tools refuse and ``check_schema`` lets through (a
keyword no JSON Schema vocabulary defines, such as OpenAPI's ``discriminator``; a
``pattern`` or ``minimum`` on a schema that does not say it is a string or a number).
Code generators (Java, Kotlin, TypeScript) trip over the same things.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from schemas.export import JSON_DIR, json_schemas
from tests.support.node import require_node_packages

ROOT = Path(__file__).resolve().parents[1]
JS_DIR = ROOT / "tests" / "js"
CONTRACT = ROOT / "docs" / "CONTRACT.md"
_BLOCK = re.compile(r"^```json(?P<info>[^\n]*)\n(?P<body>.*?)^```$", re.DOTALL | re.MULTILINE)

# Every keyword of the draft 2020-12 vocabularies (core, applicator, unevaluated,
# validation, meta-data, format-annotation, content).
KEYWORDS = frozenset(
    {
        "$schema", "$id", "$ref", "$anchor", "$dynamicRef", "$dynamicAnchor", "$vocabulary",
        "$comment", "$defs",
        "allOf", "anyOf", "oneOf", "not", "if", "then", "else", "dependentSchemas",
        "prefixItems", "items", "contains", "properties", "patternProperties",
        "additionalProperties", "propertyNames", "unevaluatedItems", "unevaluatedProperties",
        "type", "enum", "const", "multipleOf", "maximum", "exclusiveMaximum", "minimum",
        "exclusiveMinimum", "maxLength", "minLength", "pattern", "maxItems", "minItems",
        "uniqueItems", "maxContains", "minContains", "maxProperties", "minProperties",
        "required", "dependentRequired",
        "title", "description", "default", "deprecated", "readOnly", "writeOnly", "examples",
        "format", "contentEncoding", "contentMediaType", "contentSchema",
    }
)  # fmt: skip
_MAP_OF_SCHEMAS = frozenset({"$defs", "properties", "patternProperties", "dependentSchemas"})
_LIST_OF_SCHEMAS = frozenset({"allOf", "anyOf", "oneOf", "prefixItems"})
_ONE_SCHEMA = frozenset(
    {"not", "if", "then", "else", "items", "contains", "additionalProperties", "propertyNames"}
)
_NEEDS_TYPE = {
    "string": frozenset({"pattern", "minLength", "maxLength", "format"}),
    "number": frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}),
}


def _subschemas(schema: dict[str, Any], where: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema object in ``schema`` (itself included), with its JSON pointer."""
    yield where, schema
    for key, value in schema.items():
        if key in _MAP_OF_SCHEMAS:
            for name, sub in value.items():
                yield from _subschemas(sub, f"{where}/{key}/{name}")
        elif key in _LIST_OF_SCHEMAS:
            for index, sub in enumerate(value):
                yield from _subschemas(sub, f"{where}/{key}/{index}")
        elif key in _ONE_SCHEMA and isinstance(value, dict):
            yield from _subschemas(value, f"{where}/{key}")


def _types(schema: dict[str, Any]) -> set[str]:
    declared = schema.get("type", [])
    types = {declared} if isinstance(declared, str) else set(declared)
    if "integer" in types:
        types.add("number")
    return types


def strict_problems(schema: dict[str, Any]) -> list[str]:
    """What a strict validator would refuse in ``schema`` (empty when clean)."""
    problems = []
    for where, sub in _subschemas(schema, "#"):
        unknown = sorted(set(sub) - KEYWORDS)
        if unknown:
            problems.append(f"{where}: unknown keywords {unknown}")
        for type_, keywords in _NEEDS_TYPE.items():
            used = sorted(keywords & set(sub))
            if used and type_ not in _types(sub):
                problems.append(f"{where}: {used} without type {type_!r}")
    return problems


SCHEMAS = json_schemas()


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_schema_passes_the_meta_schema_and_the_strict_walk(name: str) -> None:
    Draft202012Validator.check_schema(SCHEMAS[name])
    assert strict_problems(SCHEMAS[name]) == []


@pytest.mark.parametrize(
    ("schema", "problem"),
    [
        # The two faults issue 18 found, as they were.
        (
            {"properties": {"device_id": {"anyOf": [{"type": "string"}], "pattern": "^a$"}}},
            "#/properties/device_id: ['pattern'] without type 'string'",
        ),
        (
            {"oneOf": [{"type": "object"}], "discriminator": {"propertyName": "state"}},
            "#: unknown keywords ['discriminator']",
        ),
        ({"type": "string", "minimum": 1}, "#: ['minimum'] without type 'number'"),
    ],
)
def test_the_strict_walk_catches_what_check_schema_lets_through(
    schema: dict[str, Any], problem: str
) -> None:
    Draft202012Validator.check_schema(schema)
    assert strict_problems(schema) == [problem]


def _examples() -> list[tuple[str, Any]]:
    """(schema file, payload): every example in the schemas and in CONTRACT.md."""
    out = []
    for name, schema in SCHEMAS.items():
        out += [(name, example) for example in schema.get("examples", [])]
        for sub_name, sub in schema.get("$defs", {}).items():
            # An args model's examples belong to its own file, not to command.json.
            if sub_name.endswith("Args"):
                continue
            if name == "presence.json":
                out += [(name, example) for example in sub.get("examples", [])]
    text = CONTRACT.read_text(encoding="utf-8")
    for match in _BLOCK.finditer(text):
        out.append((f"{match['info'].strip()}.json", json.loads(match["body"])))
        if match["info"].strip().startswith("presence-"):
            out.append(("presence.json", json.loads(match["body"])))
    return out


def test_there_are_examples_for_every_schema() -> None:
    assert {name for name, _ in _examples()} == set(SCHEMAS)


def test_committed_files_are_what_ajv_reads() -> None:
    # ajv reads the committed copies; the drift test ties them to the models.
    for name, schema in SCHEMAS.items():
        assert json.loads((ROOT / JSON_DIR / name).read_text(encoding="utf-8")) == schema


def test_ajv_strict_mode_compiles_every_schema_and_accepts_every_example(
    tmp_path: Path,
) -> None:
    node = require_node_packages(JS_DIR, "ajv")
    examples = tmp_path / "examples.json"
    examples.write_text(json.dumps(_examples()), encoding="utf-8")
    done = subprocess.run(
        [node, str(JS_DIR / "check_schemas.mjs"), str(ROOT / JSON_DIR), str(examples)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["errors"] == []
    assert sorted(report["compiled"]) == sorted(SCHEMAS)


def test_ajv_strict_mode_would_have_refused_the_old_schemas(tmp_path: Path) -> None:
    # The check is only worth something if it fails on what issue 18 reported.
    node = require_node_packages(JS_DIR, "ajv")
    broken = dict(SCHEMAS["presence.json"])
    broken["discriminator"] = {"propertyName": "state"}
    (tmp_path / "presence.json").write_text(json.dumps(broken), encoding="utf-8")
    done = subprocess.run(
        [node, str(JS_DIR / "check_schemas.mjs"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert "discriminator" in json.loads(done.stdout)["errors"][0]["error"]
