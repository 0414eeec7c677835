"""docs/CONTRACT.md: its examples are accepted by the decoder and by the JSON Schemas."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from pydantic import BaseModel

from schemas import (
    DEVICE_ID_PATTERN,
    MAX_PAYLOAD_BYTES,
    TopicKind,
    bridge_presence_topic,
    decode,
    decode_presence,
)
from schemas.export import PAYLOAD_MODELS, json_schemas

CONTRACT = Path(__file__).resolve().parents[1] / "docs" / "CONTRACT.md"

# A block is ```json <schema name>; the name says which payload the example is.
_BLOCK = re.compile(r"^```json(?P<info>[^\n]*)\n(?P<body>.*?)^```$", re.DOTALL | re.MULTILINE)


def _blocks() -> list[tuple[str, str]]:
    text = CONTRACT.read_text(encoding="utf-8")
    return [(m["info"].strip(), m["body"]) for m in _BLOCK.finditer(text)]


BLOCKS = _blocks()


def test_the_document_has_examples() -> None:
    assert len(BLOCKS) >= len(PAYLOAD_MODELS)


def test_every_json_block_names_a_payload() -> None:
    unnamed = [body[:60] for name, body in BLOCKS if f"{name}.json" not in json_schemas()]
    assert not unnamed, f"```json blocks without a schema name after 'json': {unnamed}"


@pytest.mark.parametrize("name", sorted(PAYLOAD_MODELS))
def test_every_payload_has_an_example(name: str) -> None:
    assert any(block_name == name for block_name, _ in BLOCKS), f"no ```json {name} example"


def _decode(name: str, body: str) -> BaseModel:
    model = PAYLOAD_MODELS[name]
    if name.startswith("presence-"):
        decoded = decode_presence(body)
        assert type(decoded) is model
        return decoded
    return decode(model, body)


@pytest.mark.parametrize(
    ("name", "body"), BLOCKS, ids=[f"{i}-{name}" for i, (name, _) in enumerate(BLOCKS)]
)
def test_example_is_accepted_by_decoder_and_schema(name: str, body: str) -> None:
    payload: Any = json.loads(body)
    decoded = _decode(name, body)
    # Nothing in an example is silently dropped: every key is a field of the model.
    assert set(payload) <= set(type(decoded).model_fields)
    schema = json_schemas()[f"{name}.json"]
    validator = Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)
    errors = [error.message for error in validator.iter_errors(payload)]
    assert not errors
    if name.startswith("presence-"):
        assert not list(Draft202012Validator(json_schemas()["presence.json"]).iter_errors(payload))


def test_every_topic_is_documented() -> None:
    text = CONTRACT.read_text(encoding="utf-8")
    for kind in TopicKind:
        assert f"`kiosk/v1/{{id}}/{kind.value}`" in text, kind
    assert f"`{bridge_presence_topic()}`" in text


def test_the_numbers_of_the_contract_are_the_code_s() -> None:
    text = CONTRACT.read_text(encoding="utf-8")
    assert DEVICE_ID_PATTERN in text
    assert f"{MAX_PAYLOAD_BYTES:,}" in text
    assert MAX_PAYLOAD_BYTES == 16 * 1024 and "16 KiB" in text
