"""Artefacts derived from the contract: JSON Schemas and the AsyncAPI 3.0 document.

Everything here is a pure function of the models in :mod:`schemas.payloads` and the topic
layout in :mod:`schemas.topics`, rendered deterministically (sorted keys in every schema,
a fixed order in the AsyncAPI document), so that the committed copies can be compared
byte for byte. ``kiosk-bridge schema export`` writes them with :func:`write_all`;
``kiosk-bridge schema check`` and the drift test compare them with :func:`rendered_files`.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Literal

import yaml
from pydantic import BaseModel, TypeAdapter

from schemas.constants import CONTRACT_VERSION, DEFAULT_PREFIX, MAX_PAYLOAD_BYTES
from schemas.device_id import DEVICE_ID_PATTERN
from schemas.payloads import (
    COMMAND_ARGS,
    NAMED_COMMANDS,
    Ack,
    BridgePresence,
    Command,
    CommandType,
    DeviceConfig,
    Presence,
    PresenceLost,
    PresenceOffline,
    PresenceOnline,
    Status,
)
from schemas.provisioning import (
    CLAIM_CLIENT_ID_PATTERN,
    ProvisionAccepted,
    ProvisionRefused,
    ProvisionRequest,
    provision_filter,
)
from schemas.topics import TopicKind, bridge_instances_filter, device_filter

JSON_SCHEMA_DIALECT: Final = "https://json-schema.org/draft/2020-12/schema"
ASYNCAPI_VERSION: Final = "3.0.0"
MQTT_BINDING_VERSION: Final = "0.2.0"

#: Where the artefacts are committed, relative to the repository root.
JSON_DIR: Final = Path("schemas") / "json"
ASYNCAPI_FILE: Final = Path("docs") / "asyncapi.yaml"

_LOCAL_REFS: Final = "#/$defs/{model}"
_COMPONENT_REFS: Final = "#/components/schemas/{model}"

#: The JSON Schema file stem of each payload model.
PAYLOAD_MODELS: Final[Mapping[str, type[BaseModel]]] = MappingProxyType(
    {
        "presence-online": PresenceOnline,
        "presence-offline": PresenceOffline,
        "presence-lost": PresenceLost,
        "status": Status,
        "command": Command,
        "ack": Ack,
        "config": DeviceConfig,
        "bridge-presence": BridgePresence,
        "provision-request": ProvisionRequest,
        "provision-accepted": ProvisionAccepted,
        "provision-refused": ProvisionRefused,
    }
)
PRESENCE_UNION: Final = "presence"
_PRESENCE_MODELS: Final = (PresenceOnline, PresenceOffline, PresenceLost)


def args_schema_stem(command_type: CommandType) -> str:
    return f"command-args-{command_type.value.replace('_', '-')}"


# --- JSON Schema -----------------------------------------------------------------------


def _sorted(value: Any) -> Any:
    """A deep copy with every mapping's keys sorted: one stable rendering, whatever the
    order pydantic happens to emit."""
    if isinstance(value, Mapping):
        return {key: _sorted(value[key]) for key in sorted(value)}
    if isinstance(value, list | tuple):
        return [_sorted(item) for item in value]
    return value


def _require_state(schema: dict[str, Any]) -> None:
    # ``state`` has a default in the models, so pydantic lists it as optional; on the
    # presence topic it is the discriminator and a payload without it is rejected.
    required = schema.setdefault("required", [])
    if "state" not in required:
        required.insert(0, "state")


def _merge_defs(into: dict[str, Any], defs: Mapping[str, Any]) -> None:
    for name, schema in defs.items():
        if into.setdefault(name, schema) != schema:
            raise ValueError(f"two different schemas are both named {name!r}")


def _model_schema(
    model: type[BaseModel], ref_template: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model's schema without its ``$defs``, and those defs; contract rules that
    pydantic cannot see are added here."""
    schema = model.model_json_schema(ref_template=ref_template)
    defs: dict[str, Any] = schema.pop("$defs", {})
    if model in _PRESENCE_MODELS:
        _require_state(schema)
    if model is Command:
        schema["allOf"] = _command_conditions(ref_template, defs)
    return schema, defs


def _command_conditions(ref_template: str, defs: dict[str, Any]) -> list[dict[str, Any]]:
    """``if type == X then args: XArgs``: what Command's validators check, for tools that
    only read the schema. (``expires_at >= issued_at`` cannot be said in JSON Schema.)"""
    conditions = []
    for command_type, args_model in COMMAND_ARGS.items():
        args_schema, args_defs = _model_schema(args_model, ref_template)
        _merge_defs(defs, {args_model.__name__: args_schema, **args_defs})
        then: dict[str, Any] = {
            "properties": {"args": {"$ref": ref_template.format(model=args_model.__name__)}}
        }
        if command_type.value in NAMED_COMMANDS:
            then["properties"]["device_id"] = {"type": "string"}
            then["required"] = ["device_id"]
        conditions.append(
            {
                "if": {
                    "properties": {"type": {"const": command_type.value}},
                    "required": ["type"],
                },
                "then": then,
            }
        )
    return conditions


def _standalone(schema: dict[str, Any], defs: Mapping[str, Any]) -> dict[str, Any]:
    document = {"$schema": JSON_SCHEMA_DIALECT, **schema}
    if defs:
        document["$defs"] = dict(defs)
    sorted_document: dict[str, Any] = _sorted(document)
    return sorted_document


def _presence_union_schema() -> dict[str, Any]:
    schema = TypeAdapter(Presence).json_schema(ref_template=_LOCAL_REFS)
    # pydantic emits OpenAPI's ``discriminator``, which is no JSON Schema keyword: a
    # strict validator (ajv) refuses the schema and code generators choke on it. The
    # ``oneOf`` alone already decides, since each branch requires its own ``state`` const.
    schema.pop("discriminator", None)
    for model in _PRESENCE_MODELS:
        _require_state(schema["$defs"][model.__name__])
    schema["title"] = "Presence"
    schema["description"] = (
        "Anything retained on a device's presence topic: birth, announced offline or Last "
        "Will, told apart by state."
    )
    defs = schema.pop("$defs")
    return _standalone(schema, defs)


def json_schemas() -> dict[str, dict[str, Any]]:
    """File name -> JSON Schema (draft 2020-12) for every payload of the contract."""
    out: dict[str, dict[str, Any]] = {}
    for stem, model in PAYLOAD_MODELS.items():
        out[f"{stem}.json"] = _standalone(*_model_schema(model, _LOCAL_REFS))
    out[f"{PRESENCE_UNION}.json"] = _presence_union_schema()
    for command_type, args_model in COMMAND_ARGS.items():
        out[f"{args_schema_stem(command_type)}.json"] = _standalone(
            *_model_schema(args_model, _LOCAL_REFS)
        )
    return dict(sorted(out.items()))


# --- AsyncAPI ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Message:
    model: type[BaseModel]
    title: str
    summary: str


@dataclass(frozen=True, slots=True)
class _Channel:
    #: None for the bridge's own presence and for provisioning; the rest are per device.
    kind: TopicKind | None
    title: str
    description: str
    messages: tuple[str, ...]
    #: Seen from the bridge: it ``receive``s what kiosks publish and ``send``s the rest.
    action: Literal["send", "receive"]
    operation: str
    qos: int
    retain: bool
    #: Provisioning by claim: per claim client id, not per device.
    provision: Literal["request", "response"] | None = None
    #: The channel this one's operation expects the answer on.
    reply: tuple[str, tuple[str, ...]] | None = None


_MESSAGES: Final[Mapping[str, _Message]] = MappingProxyType(
    {
        "presenceOnline": _Message(
            PresenceOnline, "Birth", "Published retained by the kiosk right after CONNACK."
        ),
        "presenceOffline": _Message(
            PresenceOffline,
            "Announced offline",
            "Published retained by the kiosk just before a clean DISCONNECT.",
        ),
        "presenceLost": _Message(
            PresenceLost,
            "Last Will",
            "Registered by the kiosk at CONNECT (retained, QoS 1); the broker publishes it "
            "when the connection dies without a clean DISCONNECT.",
        ),
        "status": _Message(Status, "Status", "Telemetry; seq increases within a session."),
        "command": _Message(
            Command, "Command", "A tracked command; the kiosk executes each id at most once."
        ),
        "ack": _Message(Ack, "Acknowledgement", "The kiosk's answer to a command id."),
        "config": _Message(DeviceConfig, "Desired configuration", "Retained by the bridge."),
        "bridgePresence": _Message(
            BridgePresence,
            "Bridge presence",
            "The bridge's retained birth, and its Last Will with state lost.",
        ),
        "provisionRequest": _Message(
            ProvisionRequest,
            "Provisioning request",
            "Sent with the shared claim credential under a claim-<random> client id; a "
            "fresh nonce per request, proof_token (1.1) when the kiosk holds a token.",
        ),
        "provisionAccepted": _Message(
            ProvisionAccepted,
            "Provisioning accepted",
            "The device's token (its MQTT password from then on) and its config.",
        ),
        "provisionRefused": _Message(
            ProvisionRefused,
            "Provisioning refused",
            "Why no credential was issued; retry after retry_after_s when it is given.",
        ),
    }
)

_CHANNELS: Final[Mapping[str, _Channel]] = MappingProxyType(
    {
        "devicePresence": _Channel(
            kind=TopicKind.PRESENCE,
            title="Device presence",
            description=(
                "Retained presence of one kiosk: birth, announced offline or Last Will. "
                "Every event carries the connection session; an event of an older session "
                "than the newest seen is stale and changes nothing."
            ),
            messages=("presenceOnline", "presenceOffline", "presenceLost"),
            action="receive",
            operation="receivePresence",
            qos=1,
            retain=True,
        ),
        "deviceStatus": _Channel(
            kind=TopicKind.STATUS,
            title="Device status",
            description=(
                "Retained telemetry, every status_interval_s and on significant change. "
                "Kiosks may publish with QoS 0 or 1; the bridge subscribes with QoS 1."
            ),
            messages=("status",),
            action="receive",
            operation="receiveStatus",
            qos=1,
            retain=True,
        ),
        "deviceCommand": _Channel(
            kind=TopicKind.CMD,
            title="Device commands",
            description=(
                "Commands to one kiosk. The bridge publishes only while the kiosk is online "
                "(its birth applied): a command for an offline kiosk stays queued in the "
                "bridge's database and is published at its next birth. On MQTT 5 the "
                "bridge sets Message Expiry to the time left until expires_at, Response "
                "Topic to the kiosk's ack topic (informative: the kiosk acks there "
                "regardless) and Correlation Data to the command id as UTF-8 text (36 "
                "bytes); on 3.1.1 the payload carries the same information."
            ),
            messages=("command",),
            action="send",
            operation="sendCommand",
            qos=1,
            retain=False,
        ),
        "deviceAck": _Channel(
            kind=TopicKind.ACK,
            title="Command acknowledgements",
            description="received, then succeeded, failed or rejected, per command id.",
            messages=("ack",),
            action="receive",
            operation="receiveAck",
            qos=1,
            retain=False,
        ),
        "deviceConfig": _Channel(
            kind=TopicKind.CONFIG,
            title="Desired configuration",
            description=(
                "Retained desired configuration; the kiosk applies it on every connect and "
                "reports the applied version as config_version in its status."
            ),
            messages=("config",),
            action="send",
            operation="sendConfig",
            qos=1,
            retain=True,
        ),
        "bridgePresence": _Channel(
            kind=None,
            title="Bridge presence",
            description=(
                "Each bridge instance's own retained birth and Last Will, naming the "
                "database it writes (contract 1.0 bridges used {prefix}/_bridge/presence)."
            ),
            messages=("bridgePresence",),
            action="send",
            operation="sendBridgePresence",
            qos=1,
            retain=True,
        ),
        "provisionRequest": _Channel(
            kind=None,
            title="Provisioning requests",
            description=(
                "A kiosk without a credential connects with the shared claim credential "
                "(username _claim) under a client id claim-<random> and publishes its "
                "request here, on its own client id; the bridge refuses any other client "
                "id (invalid_client_id). Not retained: a replay of the same nonce gets the "
                "same answer."
            ),
            messages=("provisionRequest",),
            action="receive",
            operation="receiveProvisionRequest",
            qos=1,
            retain=False,
            provision="request",
            reply=("provisionResponse", ("provisionAccepted", "provisionRefused")),
        ),
        "provisionResponse": _Channel(
            kind=None,
            title="Provisioning responses",
            description=(
                "The bridge's answer to the request of the same claim client id, tied to "
                "it by the nonce: accepted with the device's token, or refused with a "
                "reason. The kiosk subscribes before it publishes its request."
            ),
            messages=("provisionAccepted", "provisionRefused"),
            action="send",
            operation="sendProvisionResponse",
            qos=1,
            retain=False,
            provision="response",
        ),
    }
)


def _address(channel: _Channel, prefix: str) -> str:
    if channel.provision is not None:
        return provision_filter(channel.provision, prefix).replace("+", "{clientId}")
    if channel.kind is None:
        return bridge_instances_filter(prefix).replace("+", "{instance}")
    # The topic layout lives in schemas.topics; its filter has the device segment as the
    # only "+" (a prefix may not contain wildcards), which becomes the parameter.
    return device_filter(channel.kind, prefix).replace("+", "{deviceId}")


def _message_object(key: str, message: _Message, prefix: str) -> dict[str, Any]:
    examples = message.model.model_json_schema().get("examples", [])
    binding: dict[str, Any] = {
        "payloadFormatIndicator": 1,
        "contentType": "application/json",
        "bindingVersion": MQTT_BINDING_VERSION,
    }
    out: dict[str, Any] = {
        "name": key,
        "title": message.title,
        "summary": message.summary,
        "contentType": "application/json",
        "payload": {"$ref": _COMPONENT_REFS.format(model=message.model.__name__)},
    }
    if message.model in (Command, Ack):
        out["correlationId"] = {
            "description": "The command id; an ack echoes the id of its command.",
            "location": "$message.payload#/id",
        }
    if message.model in (ProvisionRequest, ProvisionAccepted, ProvisionRefused):
        out["correlationId"] = {
            "description": "The request's nonce; the answer echoes it.",
            "location": "$message.payload#/nonce",
        }
    if message.model is Command:
        binding["correlationData"] = {
            "type": "string",
            "format": "uuid",
            "description": (
                "MQTT 5 only: the command id as UTF-8 text (36 bytes, the canonical "
                "lowercase UUID form), not 16 raw bytes. A kiosk echoes it unchanged."
            ),
        }
        binding["responseTopic"] = device_filter(TopicKind.ACK, prefix).replace("+", "{deviceId}")
    out["bindings"] = {"mqtt": binding}
    out["examples"] = [
        {"name": f"{key}{index + 1}", "payload": example} for index, example in enumerate(examples)
    ]
    return out


def _component_schemas() -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    for message in _MESSAGES.values():
        schema, defs = _model_schema(message.model, _COMPONENT_REFS)
        _merge_defs(schemas, {message.model.__name__: schema, **defs})
    sorted_schemas: dict[str, Any] = _sorted(schemas)
    return sorted_schemas


def _operation(key: str, channel: _Channel) -> dict[str, Any]:
    binding: dict[str, Any] = {"qos": channel.qos, "retain": channel.retain}
    operation: dict[str, Any] = {
        "action": channel.action,
        "channel": {"$ref": f"#/channels/{key}"},
        "title": channel.title,
        "messages": [{"$ref": f"#/channels/{key}/messages/{name}"} for name in channel.messages],
    }
    if channel.kind is TopicKind.CMD:
        binding["messageExpiryInterval"] = {
            "type": "integer",
            "minimum": 1,
            "description": "MQTT 5 only: seconds left until the command's expires_at.",
        }
        operation["reply"] = {
            "channel": {"$ref": "#/channels/deviceAck"},
            "messages": [{"$ref": "#/channels/deviceAck/messages/ack"}],
        }
    if channel.reply is not None:
        reply_channel, reply_messages = channel.reply
        operation["reply"] = {
            "channel": {"$ref": f"#/channels/{reply_channel}"},
            "messages": [
                {"$ref": f"#/channels/{reply_channel}/messages/{name}"} for name in reply_messages
            ],
        }
    binding["bindingVersion"] = MQTT_BINDING_VERSION
    operation["bindings"] = {"mqtt": binding}
    return operation


def asyncapi_document(prefix: str = DEFAULT_PREFIX) -> dict[str, Any]:
    """The contract as an AsyncAPI 3.0.0 document, operations seen from the bridge.

    MQTT QoS and retain are on each channel's single operation: the MQTT binding puts
    them there (its channel binding object has no fields).
    """
    channels: dict[str, Any] = {}
    for key, channel in _CHANNELS.items():
        entry: dict[str, Any] = {
            "address": _address(channel, prefix),
            "title": channel.title,
            "description": channel.description,
            "messages": {
                name: {"$ref": f"#/components/messages/{name}"} for name in channel.messages
            },
        }
        if channel.kind is not None:
            entry["parameters"] = {"deviceId": {"$ref": "#/components/parameters/deviceId"}}
        elif channel.provision is not None:
            entry["parameters"] = {"clientId": {"$ref": "#/components/parameters/clientId"}}
        else:
            entry["parameters"] = {"instance": {"$ref": "#/components/parameters/instance"}}
        channels[key] = entry
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "kiosk-bridge wire contract",
            "version": CONTRACT_VERSION,
            "description": (
                "Kiosks hold persistent MQTT sessions and publish presence, status and "
                "acks; the bridge maps them into the CMS and sends commands and config. "
                f"Payloads are UTF-8 JSON objects of at most {MAX_PAYLOAD_BYTES} bytes with "
                "strict types; unknown fields are ignored. Everything works on MQTT 3.1.1; "
                "MQTT 5 features are optional. See docs/CONTRACT.md."
            ),
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": {
            channel.operation: _operation(key, channel) for key, channel in _CHANNELS.items()
        },
        "components": {
            "schemas": _component_schemas(),
            "messages": {
                key: _message_object(key, message, prefix) for key, message in _MESSAGES.items()
            },
            "parameters": {
                "deviceId": {
                    "description": (
                        f"The device id, also the kiosk's MQTT client id and username: "
                        f"`{DEVICE_ID_PATTERN}` (1-64 letters, digits, '_' or '-', not "
                        "starting with '_' or '-')."
                    ),
                    "examples": ["kiosk-0042", "8f14e45fceea167a"],
                    # AsyncAPI 3 parameters have no schema; the grammar as an extension
                    # lets tools check it all the same.
                    "x-pattern": DEVICE_ID_PATTERN,
                },
                "instance": {
                    "description": (
                        "A bridge instance's name (`kiosk-bridge run --instance`, unique per "
                        "running process; by default kb-<host>-<random>)."
                    ),
                    "examples": ["kb-host1-3fa9c2"],
                },
                "clientId": {
                    "description": (
                        "The claim connection's MQTT client id: "
                        f"`{CLAIM_CLIENT_ID_PATTERN}` (claim- and 8 to 58 random "
                        "characters). Never a device id."
                    ),
                    "examples": ["claim-3f9c2a7e1b4d6c08"],
                    "x-pattern": CLAIM_CLIENT_ID_PATTERN,
                },
            },
        },
    }


# --- rendering and writing -------------------------------------------------------------


def _render_json(schema: Mapping[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _render_yaml(document: Mapping[str, Any]) -> str:
    header = "# Generated by `kiosk-bridge schema export` from schemas/; do not edit.\n"
    body = yaml.safe_dump(
        document, sort_keys=False, allow_unicode=True, default_flow_style=False, width=100
    )
    return header + body


def rendered_files() -> dict[Path, str]:
    """Repository-relative path -> exact text of every generated file."""
    files = {JSON_DIR / name: _render_json(schema) for name, schema in json_schemas().items()}
    files[ASYNCAPI_FILE] = _render_yaml(asyncapi_document())
    return files


def committed_files(root: Path) -> set[Path]:
    """The generated files present under ``root`` (relative paths), stale ones included."""
    present = {path.relative_to(root) for path in (root / JSON_DIR).glob("*.json")}
    if (root / ASYNCAPI_FILE).is_file():
        present.add(ASYNCAPI_FILE)
    return present


def write_all(root: Path) -> list[Path]:
    """Write every generated file under ``root`` and delete stale JSON Schemas; returns
    the paths written."""
    files = rendered_files()
    for stale in committed_files(root) - files.keys():
        (root / stale).unlink()
    written = []
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        # newline="": the files are compared byte for byte, never with "\r\n" on Windows.
        with path.open("w", encoding="utf-8", newline="") as handle:
            handle.write(text)
        written.append(path)
    return written


@dataclass(frozen=True, slots=True)
class Drift:
    """One generated file whose committed copy differs from the models."""

    path: Path
    problem: Literal["missing", "changed", "unexpected"]
    #: A unified diff of committed -> generated, cut to a few lines; empty unless changed.
    diff: str = ""


def find_drift(root: Path, *, diff_lines: int = 20) -> list[Drift]:
    """Compare the generated files under ``root`` with a fresh rendering."""
    expected = rendered_files()
    drift = [Drift(path, "unexpected") for path in sorted(committed_files(root) - expected.keys())]
    for relative, text in sorted(expected.items()):
        path = root / relative
        if not path.is_file():
            drift.append(Drift(relative, "missing"))
            continue
        committed = path.read_bytes().decode("utf-8", errors="replace")
        if committed != text:
            lines = difflib.unified_diff(
                committed.splitlines(keepends=True),
                text.splitlines(keepends=True),
                fromfile=f"committed/{relative.as_posix()}",
                tofile=f"generated/{relative.as_posix()}",
            )
            shown = list(lines)[:diff_lines]
            drift.append(Drift(relative, "changed", "".join(shown)))
    return drift
