"""Every payload model: round trips, each invalid field named, and hostile payloads."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

from schemas import (
    MAX_PAYLOAD_BYTES,
    Ack,
    AckState,
    BridgePresence,
    Command,
    DeviceConfig,
    InvalidPayload,
    OfflineReason,
    PayloadTooLarge,
    PresenceLost,
    PresenceOffline,
    PresenceOnline,
    PresenceState,
    ReconnectArgs,
    RefreshArgs,
    Status,
    TopicKind,
    WipeArgs,
    decode,
    decode_for_kind,
    decode_presence,
    encode,
)
from schemas.constants import MAX_INT64

Decoder = Callable[[bytes | str], BaseModel]
CMD_ID = uuid.UUID("6f1c2b9e-3d4a-4e5b-8c7d-0a1b2c3d4e5f")
SESSION = 1_764_331_200_000
TS = 1_764_331_200_412


def _decoder(model: type[BaseModel]) -> Decoder:
    return lambda payload: decode(model, payload)


# The presence models are decoded the way the bridge receives them: through the union.
DECODERS: dict[str, Decoder] = {
    "presence-online": decode_presence,
    "presence-offline": decode_presence,
    "presence-lost": decode_presence,
    "status": _decoder(Status),
    "command": _decoder(Command),
    "ack": _decoder(Ack),
    "config": _decoder(DeviceConfig),
    "bridge-presence": _decoder(BridgePresence),
}

#: A valid payload per kind, as a kiosk or the bridge would send it.
VALID: dict[str, dict[str, Any]] = {
    "presence-online": {
        "state": "online",
        "session": SESSION,
        "ts": TS,
        "app_version": "3.4.1",
        "android_version": "13",
        "ip_address": "192.0.2.17",
        "mac_address": "02:00:00:3a:4b:5c",
    },
    "presence-offline": {"state": "offline", "session": SESSION, "ts": TS, "reason": "reboot"},
    "presence-lost": {"state": "lost", "session": SESSION},
    "status": {
        "session": SESSION,
        "seq": 3,
        "ts": TS,
        "battery_level": 85,
        "wifi_strength": -45,
        "screen_on": True,
        "storage_available_mb": 15360,
        "storage_total_mb": 32768,
        "ram_usage_mb": 2048,
        "ram_total_mb": 4096,
        "cpu_temp": 42.5,
        "network_type": "wifi",
        "current_url": "https://cms.example.com/display/abc123",
        "config_version": 7,
    },
    "command": {
        "id": str(CMD_ID),
        "type": "refresh",
        "issued_at": TS,
        "expires_at": TS + 60_000,
        "args": {"url": "https://cms.example.com/display/abc123"},
    },
    "ack": {"id": str(CMD_ID), "state": "succeeded", "ts": TS, "detail": "reloaded"},
    "config": {
        "version": 7,
        "remote_control_enabled": True,
        "status_interval_s": 30,
        "display_url": "https://cms.example.com/display/abc123",
    },
    "bridge-presence": {"state": "online", "instance": "bridge-a", "ts": TS, "version": "0.1.0"},
}


def _dumps(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


# --- round trips ---------------------------------------------------------------------------

MODELS: list[BaseModel] = [
    PresenceOnline(session=1, ts=0),
    PresenceOnline(
        session=MAX_INT64,
        ts=TS,
        app_version="3.4.1",
        android_version="13",
        ip_address="2001:db8::1",
        mac_address="02:00:00:3a:4b:5c",
    ),
    PresenceOffline(session=SESSION, ts=TS, reason=OfflineReason.DOZE),
    PresenceLost(session=SESSION),
    PresenceLost(session=SESSION, ts=TS),
    Status(session=SESSION, seq=0, ts=TS),
    Status(**{**VALID["status"], "screen_on": False, "cpu_temp": -12.25}),
    Command(id=CMD_ID, type="refresh", issued_at=TS, expires_at=TS),
    Command(
        id=uuid.uuid4(),
        type="reconnect",
        issued_at=TS,
        expires_at=TS + 1,
        args={"delay_s": 5, "reason": "maintenance"},
    ),
    Command(
        id=uuid.uuid4(),
        type="wipe",
        issued_at=TS,
        expires_at=TS + 1,
        device_id="kiosk-0042",
        args={"reason": "returned"},
    ),
    Command(
        id=uuid.uuid4(),
        type="set_config",
        issued_at=TS,
        expires_at=TS + 1,
        args={"version": 8, "status_interval_s": 60},
    ),
    Command(
        id=uuid.uuid4(),
        type="rotate_token",
        issued_at=TS,
        expires_at=TS + 1,
        device_id="kiosk-0042",
        args={"token": "ab" * 32},
    ),
    # Unknown types pass through so that the kiosk can answer them with "rejected".
    Command(id=uuid.uuid4(), type="dance", issued_at=TS, expires_at=TS, args={"x": [1, 2]}),
    Ack(id=CMD_ID, state=AckState.RECEIVED, ts=TS),
    Ack(id=CMD_ID, state=AckState.FAILED, ts=TS, detail="page did not load"),
    DeviceConfig(version=0),
    DeviceConfig(version=3, remote_control_enabled=True, status_interval_s=5, display_url="x"),
    BridgePresence(state=PresenceState.LOST, instance="bridge-a"),
    BridgePresence(state=PresenceState.ONLINE, instance="b", ts=TS, version="0.1.0"),
    RefreshArgs(url="https://cms.example.com/"),
    ReconnectArgs(delay_s=3600),
    WipeArgs(reason="stolen"),
]


@pytest.mark.parametrize("model", MODELS, ids=lambda m: type(m).__name__)
def test_round_trip(model: BaseModel) -> None:
    wire = encode(model)
    assert decode(type(model), wire) == model
    # What is on the wire is compact JSON without nulls: absent optional fields stay absent.
    assert b" " not in wire.replace(b"page did not load", b"")
    assert b"null" not in wire


@pytest.mark.parametrize(
    "model", [m for m in MODELS if isinstance(m, PresenceOnline | PresenceOffline | PresenceLost)]
)
def test_presence_round_trip_through_the_union(model: BaseModel) -> None:
    decoded = decode_presence(encode(model))
    assert type(decoded) is type(model)
    assert decoded == model
    assert decode_for_kind(TopicKind.PRESENCE, encode(model)) == model


@pytest.mark.parametrize(
    ("kind", "model"),
    [
        (TopicKind.STATUS, Status(session=1, seq=1, ts=1)),
        (TopicKind.CMD, Command(id=CMD_ID, type="refresh", issued_at=1, expires_at=2)),
        (TopicKind.ACK, Ack(id=CMD_ID, state=AckState.REJECTED, ts=1)),
        (TopicKind.CONFIG, DeviceConfig(version=1)),
    ],
    ids=str,
)
def test_decode_for_kind(kind: TopicKind, model: BaseModel) -> None:
    assert decode_for_kind(kind, encode(model)) == model


@pytest.mark.parametrize("name", sorted(VALID))
def test_valid_payloads_decode(name: str) -> None:
    decoded = DECODERS[name](_dumps(VALID[name]))
    for key, value in VALID[name].items():
        got = getattr(decoded, key)
        assert (str(got) if isinstance(got, uuid.UUID) else got) == value, key


def test_schema_version_defaults_to_current_and_is_sent() -> None:
    decoded = decode_presence(_dumps(VALID["presence-lost"]))
    assert decoded.schema_version == 1
    assert json.loads(encode(decoded))["schema_version"] == 1


@given(
    session=st.integers(1, MAX_INT64),
    seq=st.integers(0, MAX_INT64),
    ts=st.integers(0, 9_999_999_999_999),
    battery=st.none() | st.integers(0, 100),
    wifi=st.none() | st.integers(-127, 0),
    cpu=st.none() | st.floats(-60, 200, allow_nan=False),
    url=st.none() | st.text(st.characters(exclude_characters="\x00"), max_size=50),
)
def test_status_round_trip_property(
    session: int,
    seq: int,
    ts: int,
    battery: int | None,
    wifi: int | None,
    cpu: float | None,
    url: str | None,
) -> None:
    status = Status(
        session=session,
        seq=seq,
        ts=ts,
        battery_level=battery,
        wifi_strength=wifi,
        cpu_temp=cpu,
        current_url=url,
    )
    assert decode(Status, encode(status)) == status


# --- each invalid field, named ---------------------------------------------------------------

MISSING = object()


def _with(payload: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of ``payload`` with dotted ``path`` set to ``value`` (or removed)."""
    out = json.loads(json.dumps(payload))
    *parents, leaf = path.split(".")
    target = out
    for part in parents:
        target = target.setdefault(part, {})
    if value is MISSING:
        target.pop(leaf, None)
    else:
        target[leaf] = value
    return out


SESSION_BAD = [MISSING, "1", 0, -1, 1.5, 1.0, True, None, MAX_INT64 + 1, [1]]
TS_BAD = [MISSING, "now", -1, 10_000_000_000_000, 1.0, False]

# (payload kind, field path, bad value, extra changes to the base payload)
INVALID: list[tuple[str, str, Any, dict[str, Any]]] = [
    *[("presence-online", "session", v, {}) for v in SESSION_BAD],
    *[("presence-online", "ts", v, {}) for v in TS_BAD],
    ("presence-online", "state", MISSING, {}),
    ("presence-online", "state", "sleeping", {}),
    ("presence-online", "state", 1, {}),
    ("presence-online", "state", None, {}),
    ("presence-online", "app_version", 341, {}),
    ("presence-online", "app_version", "x" * 129, {}),
    ("presence-online", "app_version", "3.4\x001", {}),
    ("presence-online", "android_version", ["13"], {}),
    ("presence-online", "ip_address", "1" * 46, {}),
    ("presence-online", "mac_address", "0" * 18, {}),
    ("presence-online", "schema_version", 0, {}),
    ("presence-online", "schema_version", "1", {}),
    *[("presence-offline", "session", v, {}) for v in SESSION_BAD],
    *[("presence-offline", "ts", v, {}) for v in TS_BAD],
    ("presence-offline", "reason", MISSING, {}),
    ("presence-offline", "reason", "bored", {}),
    ("presence-offline", "reason", "REBOOT", {}),
    *[("presence-lost", "session", v, {}) for v in SESSION_BAD],
    ("presence-lost", "ts", "later", {}),
    ("presence-lost", "ts", -5, {}),
    *[("status", "session", v, {}) for v in SESSION_BAD],
    *[("status", "ts", v, {}) for v in TS_BAD],
    ("status", "seq", MISSING, {}),
    ("status", "seq", -1, {}),
    ("status", "seq", "3", {}),
    ("status", "battery_level", 101, {}),
    ("status", "battery_level", -1, {}),
    ("status", "battery_level", 85.5, {}),
    ("status", "battery_level", "85", {}),
    ("status", "wifi_strength", 1, {}),
    ("status", "wifi_strength", -128, {}),
    ("status", "screen_on", "true", {}),
    ("status", "screen_on", 1, {}),
    ("status", "storage_available_mb", -1, {}),
    ("status", "storage_total_mb", MAX_INT64 + 1, {}),
    ("status", "ram_usage_mb", "2048", {}),
    ("status", "ram_total_mb", 4096.0, {}),
    ("status", "cpu_temp", "42.5", {}),
    ("status", "cpu_temp", 200.5, {}),
    ("status", "cpu_temp", -60.5, {}),
    ("status", "network_type", "w" * 33, {}),
    ("status", "network_type", "wi\x00fi", {}),
    ("status", "current_url", "u" * 2049, {}),
    ("status", "config_version", -1, {}),
    ("command", "id", MISSING, {}),
    ("command", "id", "not-a-uuid", {}),
    ("command", "id", 12345, {}),
    ("command", "type", MISSING, {}),
    ("command", "type", "", {}),
    ("command", "type", "Refresh", {}),
    ("command", "type", "re fresh", {}),
    ("command", "type", "r" * 33, {}),
    ("command", "type", 1, {}),
    ("command", "issued_at", MISSING, {}),
    ("command", "issued_at", "now", {}),
    ("command", "expires_at", MISSING, {}),
    ("command", "expires_at", TS - 1, {}),
    ("command", "device_id", "kiosk/0042", {}),
    ("command", "device_id", "kiosk+", {}),
    ("command", "device_id", "_kiosk", {}),
    ("command", "device_id", "k" * 65, {}),
    ("command", "device_id", "k\x00", {}),
    ("command", "device_id", MISSING, {"type": "wipe", "device_id": "k1", "args": {}}),
    ("command", "args", "refresh now", {}),
    ("command", "args", ["url"], {}),
    ("command", "args.url", 5, {}),
    ("command", "args.url", "u" * 2049, {}),
    ("command", "args.delay_s", 3601, {"type": "reconnect", "args": {}}),
    ("command", "args.delay_s", "5", {"type": "reconnect", "args": {}}),
    ("command", "args.reason", 5, {"type": "wipe", "device_id": "k1", "args": {}}),
    (
        "command",
        "device_id",
        MISSING,
        {"type": "rotate_token", "device_id": "k1", "args": {"token": "ab" * 32}},
    ),
    *(
        (
            "command",
            "args.token",
            bad,
            {"type": "rotate_token", "device_id": "k1", "args": {"token": "ab" * 32}},
        )
        for bad in (MISSING, "AB" * 32, "ab" * 31, 5)
    ),
    ("command", "args.version", MISSING, {"type": "set_config", "args": {"version": 1}}),
    ("command", "args.status_interval_s", 4, {"type": "set_config", "args": {"version": 1}}),
    ("ack", "id", MISSING, {}),
    ("ack", "id", "6f1c2b9e", {}),
    ("ack", "state", "done", {}),
    ("ack", "state", MISSING, {}),
    ("ack", "ts", MISSING, {}),
    ("ack", "detail", "d" * 1025, {}),
    ("ack", "detail", "bad\x00", {}),
    ("config", "version", MISSING, {}),
    ("config", "version", -1, {}),
    ("config", "version", "7", {}),
    ("config", "remote_control_enabled", "yes", {}),
    ("config", "remote_control_enabled", 0, {}),
    ("config", "status_interval_s", 4, {}),
    ("config", "status_interval_s", 3601, {}),
    ("config", "display_url", 42, {}),
    ("bridge-presence", "state", MISSING, {}),
    ("bridge-presence", "state", "asleep", {}),
    ("bridge-presence", "instance", MISSING, {}),
    ("bridge-presence", "instance", "", {}),
    ("bridge-presence", "instance", "i" * 129, {}),
    ("bridge-presence", "ts", "now", {}),
]


def _case_id(case: tuple[str, str, Any, dict[str, Any]]) -> str:
    kind, field, value, _ = case
    shown = "MISSING" if value is MISSING else repr(value)[:20]
    return f"{kind}-{field}-{shown}"


@pytest.mark.parametrize("case", INVALID, ids=[_case_id(c) for c in INVALID])
def test_invalid_field_is_named(case: tuple[str, str, Any, dict[str, Any]]) -> None:
    kind, field, value, base_changes = case
    payload = _with({**VALID[kind], **base_changes}, field, value)
    with pytest.raises(InvalidPayload) as caught:
        DECODERS[kind](_dumps(payload))
    assert type(caught.value) is InvalidPayload
    assert caught.value.field == field
    assert caught.value.reason == "bad_payload"
    # The field is also in the message, for a log line that is read without the field.
    assert field in str(caught.value)


def test_base_payloads_of_the_table_are_valid() -> None:
    # Guards the table above: each case must fail because of its one change only.
    for kind, _, _, base_changes in INVALID:
        DECODERS[kind](_dumps({**VALID[kind], **base_changes}))


# --- forward compatibility ------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(VALID))
def test_unknown_fields_are_ignored(name: str) -> None:
    plain = DECODERS[name](_dumps(VALID[name]))
    extended = {
        **VALID[name],
        "future_field": {"nested": [1, "two", None]},
        "schema_version": 2,
        "x\x00": "\x00",
    }
    decoded = DECODERS[name](_dumps(extended))
    assert decoded.model_dump(exclude={"schema_version"}) == plain.model_dump(
        exclude={"schema_version"}
    )
    assert decoded.schema_version == 2
    assert "future_field" not in decoded.model_dump()
    assert b"future_field" not in encode(decoded)


# --- hostile payloads ----------------------------------------------------------------------


def _padded(size: int) -> bytes:
    """A valid status payload of exactly ``size`` bytes (padding in an ignored field)."""
    head = _dumps({**VALID["status"], "pad": ""})
    pad = size - len(head)
    assert pad >= 0
    return head[:-2] + b"p" * pad + b'"}'


def test_payload_at_the_limit_is_accepted() -> None:
    payload = _padded(MAX_PAYLOAD_BYTES)
    assert len(payload) == MAX_PAYLOAD_BYTES
    assert decode(Status, payload).seq == VALID["status"]["seq"]


@pytest.mark.parametrize("size", [MAX_PAYLOAD_BYTES + 1, 1024 * 1024])
@pytest.mark.parametrize("name", sorted(VALID))
def test_oversized_payload_is_rejected(name: str, size: int) -> None:
    head = _dumps({**VALID[name], "pad": ""})
    payload = head[:-2] + b"p" * (size - len(head)) + b'"}'
    assert len(payload) == size
    with pytest.raises(PayloadTooLarge) as caught:
        DECODERS[name](payload)
    assert caught.value.reason == "too_large"
    assert caught.value.field == ""
    assert isinstance(caught.value, InvalidPayload)


def test_size_counts_utf8_bytes_not_characters() -> None:
    # 8,200 two-byte characters: under the limit in characters, over it in bytes.
    text = json.dumps({**VALID["status"], "pad": "é" * 8_200}, ensure_ascii=False)
    assert len(text) < MAX_PAYLOAD_BYTES < len(text.encode())
    with pytest.raises(PayloadTooLarge):
        decode(Status, text)


HOSTILE: dict[str, bytes] = {
    "empty": b"",
    "whitespace": b"  \n",
    "not-json": b"hello kiosk",
    "truncated": b'{"state":"online","session":1',
    "single-quotes": b"{'state': 'lost', 'session': 1}",
    "json-array": b"[]",
    "array-of-valid-object": b'[{"state":"lost","session":1}]',
    "json-null": b"null",
    "json-number": b"42",
    "json-string": b'"online"',
    "json-true": b"true",
    "trailing-garbage": b'{"state":"lost","session":1} x',
    "two-objects": b'{"state":"lost","session":1}{"state":"lost","session":2}',
    "utf8-bom": b'\xef\xbb\xbf{"state":"lost","session":1}',
    "invalid-utf8-in-string": b'{"state":"lost","session":1,"x":"\xff\xfe"}',
    "invalid-utf8-outside": b'{"state":"lost",\xc3"session":1}',
    "lone-surrogate-escape": b'{"state":"online","session":1,"ts":1,"app_version":"\\ud800"}',
    "raw-nul-in-string": b'{"state":"online","session":1,"ts":1,"app_version":"a\x00b"}',
    "raw-nul-outside": b'{"state":"lost",\x00"session":1}',
    "deep-within-limit": b"[" * 8_000 + b"]" * 8_000,
    "deep-object-in-ignored-field": b'{"state":"lost","session":1,"x":'
    + b'{"a":' * 2_000
    + b"1"
    + b"}" * 2_000
    + b"}",
    "deep-10000": b"[" * 10_000 + b"]" * 10_000,
}


@pytest.mark.parametrize("payload", HOSTILE.values(), ids=HOSTILE.keys())
@pytest.mark.parametrize("name", sorted(DECODERS))
def test_hostile_payload_is_rejected_cleanly(name: str, payload: bytes) -> None:
    # Only InvalidPayload may escape: never RecursionError, UnicodeDecodeError, ValueError.
    with pytest.raises(InvalidPayload) as caught:
        DECODERS[name](payload)
    assert isinstance(caught.value, InvalidPayload)
    assert caught.value.field in ("", "state")


def test_deep_nesting_within_the_limit_is_not_mistaken_for_too_large() -> None:
    payload = HOSTILE["deep-within-limit"]
    assert len(payload) <= MAX_PAYLOAD_BYTES
    with pytest.raises(InvalidPayload) as caught:
        decode(Command, payload)
    assert not isinstance(caught.value, PayloadTooLarge)


def test_deep_nesting_in_free_form_command_args_is_rejected() -> None:
    nested = "[" * 5_000 + "]" * 5_000
    payload = (
        f'{{"id":"{CMD_ID}","type":"dance","issued_at":1,"expires_at":2,"args":{{"a":{nested}}}}}'
    )
    assert len(payload) <= MAX_PAYLOAD_BYTES
    with pytest.raises(InvalidPayload):
        decode(Command, payload)


def test_modest_nesting_in_free_form_command_args_is_kept() -> None:
    nested: Any = 1
    for _ in range(50):
        nested = [nested]
    command = decode(
        Command,
        _dumps({**VALID["command"], "type": "dance", "args": {"a": nested}}),
    )
    assert command.args == {"a": nested}


@pytest.mark.parametrize(
    ("kind", "field"),
    [
        ("presence-online", "app_version"),
        ("presence-online", "android_version"),
        ("presence-online", "ip_address"),
        ("presence-online", "mac_address"),
        ("status", "network_type"),
        ("status", "current_url"),
        ("config", "display_url"),
        ("ack", "detail"),
        ("bridge-presence", "instance"),
        ("bridge-presence", "version"),
        ("command", "args.url"),
    ],
)
def test_escaped_nul_in_text_is_rejected(kind: str, field: str) -> None:
    # "\u0000" is valid JSON, but PostgreSQL text cannot hold it: refused at the edge.
    payload = _with(VALID[kind], field, "before\x00after")
    wire = _dumps(payload)
    assert b"\\u0000" in wire
    with pytest.raises(InvalidPayload) as caught:
        DECODERS[kind](wire)
    assert caught.value.field == field


def test_unicode_text_is_kept() -> None:
    payload = {**VALID["presence-online"], "app_version": "3.4.1-ß😀"}
    decoded = decode_presence(_dumps(payload))
    assert isinstance(decoded, PresenceOnline)
    assert decoded.app_version == "3.4.1-ß😀"


def test_duplicate_keys_last_one_wins() -> None:
    # Documented in CONTRACT.md: the parser keeps the last value; kiosks must not repeat keys.
    decoded = decode(Status, b'{"session":1,"seq":1,"ts":1,"seq":9}')
    assert decoded.seq == 9
