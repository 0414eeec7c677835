"""schemas.export: the JSON Schemas agree with the models; the AsyncAPI document holds up."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator

from schemas import CONTRACT_VERSION, DEVICE_ID_PATTERN, decode, decode_presence
from schemas.export import (
    ASYNCAPI_FILE,
    PAYLOAD_MODELS,
    asyncapi_document,
    json_schemas,
    rendered_files,
)
from schemas.payloads import COMMAND_ARGS
from schemas.provisioning import CLAIM_CLIENT_ID_PATTERN

EXPECTED_FILES = {
    "presence-online.json",
    "presence-offline.json",
    "presence-lost.json",
    "presence.json",
    "status.json",
    "command.json",
    "ack.json",
    "config.json",
    "bridge-presence.json",
    "provision-request.json",
    "provision-accepted.json",
    "provision-refused.json",
    "command-args-refresh.json",
    "command-args-reconnect.json",
    "command-args-wipe.json",
    "command-args-set-config.json",
    "command-args-rotate-token.json",
}


def _validator(schema: dict[str, Any]) -> Draft202012Validator:
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def _errors(name: str, payload: Any) -> list[str]:
    return [error.message for error in _validator(json_schemas()[name]).iter_errors(payload)]


# --- JSON Schemas ------------------------------------------------------------------------


def test_one_schema_per_payload() -> None:
    assert set(json_schemas()) == EXPECTED_FILES


@pytest.mark.parametrize("name", sorted(EXPECTED_FILES))
def test_schema_is_valid_draft_2020_12(name: str) -> None:
    schema = json_schemas()[name]
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(schema)


def _examples() -> Iterator[tuple[str, dict[str, Any]]]:
    for name, schema in sorted(json_schemas().items()):
        for example in schema.get("examples", []):
            yield name, example


EXAMPLES = list(_examples())


def test_every_single_payload_schema_has_examples() -> None:
    named = {name for name, _ in EXAMPLES}
    assert {f"{stem}.json" for stem in PAYLOAD_MODELS} <= named
    assert {f"command-args-{t.value.replace('_', '-')}.json" for t in COMMAND_ARGS} <= named


@pytest.mark.parametrize(("name", "example"), EXAMPLES, ids=[n for n, _ in EXAMPLES])
def test_schema_examples_validate_and_decode(name: str, example: dict[str, Any]) -> None:
    assert not _errors(name, example)
    stem = name.removesuffix(".json")
    if stem.startswith("presence-"):
        assert type(decode_presence(json.dumps(example))) is PAYLOAD_MODELS[stem]
        assert not _errors("presence.json", example)
    elif stem in PAYLOAD_MODELS:
        decode(PAYLOAD_MODELS[stem], json.dumps(example))


# Payloads the decoder rejects and that JSON Schema can express as invalid too.
REJECTED_BY_BOTH: list[tuple[str, dict[str, Any]]] = [
    ("presence.json", {"session": 1}),
    ("presence.json", {"state": "asleep", "session": 1}),
    ("presence.json", {"state": "online", "session": 1}),
    ("presence.json", {"state": "offline", "session": 1, "ts": 1, "reason": "bored"}),
    ("presence.json", {"state": "lost", "session": 0}),
    ("presence-online.json", {"session": 1, "ts": 1}),
    ("presence-online.json", {"state": "online", "session": "1", "ts": 1}),
    ("presence-online.json", {"state": "online", "session": 1, "ts": 1, "app_version": "a\x00"}),
    ("status.json", {"session": 1, "seq": 0, "ts": 1, "battery_level": 101}),
    ("status.json", {"session": 1, "seq": 0, "ts": 1, "screen_on": "yes"}),
    ("status.json", {"session": 1, "ts": 1}),
    ("status.json", {"session": 2**63, "seq": 0, "ts": 1}),
    ("command.json", {"id": "nope", "type": "refresh", "issued_at": 1, "expires_at": 2}),
    ("command.json", {"id": "6f1c2b9e-3d4a-4e5b-8c7d-0a1b2c3d4e5f", "type": "Refresh"}),
    (
        "command.json",
        {
            "id": "6f1c2b9e-3d4a-4e5b-8c7d-0a1b2c3d4e5f",
            "type": "refresh",
            "issued_at": 1,
            "expires_at": 2,
            "args": {"url": 5},
        },
    ),
    (
        "command.json",
        {
            "id": "6f1c2b9e-3d4a-4e5b-8c7d-0a1b2c3d4e5f",
            "type": "wipe",
            "issued_at": 1,
            "expires_at": 2,
        },
    ),
    (
        "command.json",
        {
            "id": "6f1c2b9e-3d4a-4e5b-8c7d-0a1b2c3d4e5f",
            "type": "wipe",
            "issued_at": 1,
            "expires_at": 2,
            "device_id": "_bridge",
        },
    ),
    (
        "command.json",
        {
            "id": "6f1c2b9e-3d4a-4e5b-8c7d-0a1b2c3d4e5f",
            "type": "set_config",
            "issued_at": 1,
            "expires_at": 2,
            "args": {"version": 1, "status_interval_s": 1},
        },
    ),
    (
        "command.json",
        {
            "id": "6f1c2b9e-3d4a-4e5b-8c7d-0a1b2c3d4e5f",
            "type": "rotate_token",
            "issued_at": 1,
            "expires_at": 2,
            "args": {"token": "ab" * 32},
        },
    ),
    ("command-args-rotate-token.json", {"token": "ab" * 31}),
    ("ack.json", {"id": "6f1c2b9e-3d4a-4e5b-8c7d-0a1b2c3d4e5f", "state": "done", "ts": 1}),
    ("config.json", {"version": -1}),
    ("bridge-presence.json", {"state": "online", "instance": ""}),
    ("command-args-reconnect.json", {"delay_s": 3601}),
]


@pytest.mark.parametrize(("name", "payload"), REJECTED_BY_BOTH)
def test_schema_rejects_what_the_decoder_rejects(name: str, payload: dict[str, Any]) -> None:
    assert _errors(name, payload), f"{name} accepted {payload}"
    stem = name.removesuffix(".json")
    model = PAYLOAD_MODELS.get(stem)
    if stem == "presence" or stem.startswith("presence-"):
        with pytest.raises(ValueError):
            decode_presence(json.dumps(payload))
    elif model is not None:
        with pytest.raises(ValueError):
            decode(model, json.dumps(payload))


def test_schema_keeps_unknown_command_types_open() -> None:
    payload = {
        "id": "6f1c2b9e-3d4a-4e5b-8c7d-0a1b2c3d4e5f",
        "type": "dance",
        "issued_at": 1,
        "expires_at": 2,
        "args": {"style": ["tango"]},
    }
    assert not _errors("command.json", payload)


def test_schema_and_decoder_both_ignore_unknown_fields() -> None:
    payload = {"state": "lost", "session": 1, "added_in_v1_9": {"x": 1}}
    assert not _errors("presence.json", payload)
    assert decode_presence(json.dumps(payload)).session == 1


def test_rendering_is_deterministic() -> None:
    first, second = rendered_files(), rendered_files()
    assert first == second
    for path, text in first.items():
        assert text.endswith("\n") and not text.endswith("\n\n"), path
        if path.suffix == ".json":
            assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"


# --- AsyncAPI --------------------------------------------------------------------------------

# address -> (operation action from the bridge's side, qos, retain)
EXPECTED_CHANNELS = {
    "kiosk/v1/{deviceId}/presence": ("receive", 1, True),
    "kiosk/v1/{deviceId}/status": ("receive", 1, True),
    "kiosk/v1/{deviceId}/cmd": ("send", 1, False),
    "kiosk/v1/{deviceId}/ack": ("receive", 1, False),
    "kiosk/v1/{deviceId}/config": ("send", 1, True),
    "kiosk/v1/_bridge/{instance}/presence": ("send", 1, True),
    "kiosk/v1/provision/{clientId}/request": ("receive", 1, False),
    "kiosk/v1/provision/{clientId}/response": ("send", 1, False),
}


def _resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = document
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and part in node, f"dangling $ref {ref}"
        node = node[part]
    return node


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return asyncapi_document()


def test_asyncapi_header(document: dict[str, Any]) -> None:
    assert document["asyncapi"] == "3.0.0"
    assert document["info"]["version"] == CONTRACT_VERSION
    assert document["defaultContentType"] == "application/json"


def test_every_ref_resolves(document: dict[str, Any]) -> None:
    refs = list(_refs(document))
    assert len(refs) > 30
    for ref in refs:
        _resolve(document, ref)
    # Local JSON Schema refs would point into the AsyncAPI document's root.
    assert not [ref for ref in refs if ref.startswith("#/$defs")]


def test_channels_and_their_operations(document: dict[str, Any]) -> None:
    channels = document["channels"]
    assert {c["address"] for c in channels.values()} == set(EXPECTED_CHANNELS)
    operations = document["operations"]
    for key, channel in channels.items():
        ops = [op for op in operations.values() if op["channel"]["$ref"] == f"#/channels/{key}"]
        assert len(ops) == 1, key
        (operation,) = ops
        action, qos, retain = EXPECTED_CHANNELS[channel["address"]]
        assert operation["action"] == action
        assert operation["bindings"]["mqtt"]["qos"] == qos
        assert operation["bindings"]["mqtt"]["retain"] is retain
        # An operation may only carry messages of its own channel.
        for message_ref in operation["messages"]:
            assert message_ref["$ref"].startswith(f"#/channels/{key}/messages/")
            _resolve(document, message_ref["$ref"])
        assert channel["messages"], key


def test_device_channels_have_the_device_id_parameter(document: dict[str, Any]) -> None:
    for channel in document["channels"].values():
        if "{deviceId}" in channel["address"]:
            parameter = _resolve(document, channel["parameters"]["deviceId"]["$ref"])
            assert parameter["x-pattern"] == DEVICE_ID_PATTERN
            assert DEVICE_ID_PATTERN in parameter["description"]
        elif "{clientId}" in channel["address"]:
            parameter = _resolve(document, channel["parameters"]["clientId"]["$ref"])
            assert parameter["x-pattern"] == CLAIM_CLIENT_ID_PATTERN
        elif "{instance}" in channel["address"]:
            parameter = _resolve(document, channel["parameters"]["instance"]["$ref"])
            assert "--instance" in parameter["description"]
        else:
            assert "parameters" not in channel


def test_provisioning_channels_answer_on_the_response_channel(document: dict[str, Any]) -> None:
    receive = document["operations"]["receiveProvisionRequest"]
    assert receive["reply"]["channel"]["$ref"] == "#/channels/provisionResponse"
    response = document["channels"]["provisionResponse"]["messages"]
    assert set(response) == {"provisionAccepted", "provisionRefused"}
    for name in ("provisionRequest", "provisionAccepted", "provisionRefused"):
        message = document["components"]["messages"][name]
        assert message["correlationId"]["location"] == "$message.payload#/nonce"


def test_channel_messages_reference_existing_components(document: dict[str, Any]) -> None:
    components = document["components"]
    for channel in document["channels"].values():
        for message_ref in channel["messages"].values():
            ref = message_ref["$ref"]
            assert ref.startswith("#/components/messages/")
            assert ref.rsplit("/", 1)[1] in components["messages"]
    presence = document["channels"]["devicePresence"]["messages"]
    assert set(presence) == {"presenceOnline", "presenceOffline", "presenceLost"}


def test_message_examples_validate_against_their_payload(document: dict[str, Any]) -> None:
    components = document["components"]
    checked = 0
    for message in components["messages"].values():
        # The payload ref points into components; validate with the document as root.
        schema = {"$ref": message["payload"]["$ref"], "components": components}
        validator = _validator(schema)
        assert message["examples"], message["name"]
        for example in message["examples"]:
            assert not list(validator.iter_errors(example["payload"])), message["name"]
            checked += 1
        assert list(validator.iter_errors({"schema_version": "one"})), message["name"]
    assert checked >= len(components["messages"])


def test_command_message_says_how_to_reply(document: dict[str, Any]) -> None:
    send = document["operations"]["sendCommand"]
    assert send["reply"]["channel"]["$ref"] == "#/channels/deviceAck"
    binding = document["components"]["messages"]["command"]["bindings"]["mqtt"]
    assert binding["responseTopic"] == "kiosk/v1/{deviceId}/ack"
    assert document["components"]["messages"]["command"]["correlationId"]["location"] == (
        "$message.payload#/id"
    )


def test_prefix_is_applied_everywhere() -> None:
    document = asyncapi_document("acme/kiosks/v1")
    addresses = {c["address"] for c in document["channels"].values()}
    assert addresses == {a.replace("kiosk/v1", "acme/kiosks/v1") for a in EXPECTED_CHANNELS}
    assert "kiosk/v1" not in json.dumps(document)


def test_yaml_rendering_round_trips(document: dict[str, Any]) -> None:
    text = rendered_files()[ASYNCAPI_FILE]
    assert text.startswith("# Generated by `kiosk-bridge schema export`")
    assert yaml.safe_load(text) == document
    # Key order is the document's (asyncapi first), not alphabetical.
    assert text.splitlines()[1] == "asyncapi: 3.0.0"
