"""One received MQTT message, decoded against the contract and described for a human.

Pure: :func:`describe` turns (topic, payload) into a :class:`WatchEvent`; the renderers
turn that into one coloured line or one JSON object. The tailing loop is :func:`tail`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import aiomqtt
from pydantic import BaseModel
from rich.text import Text

from bridge.ops.errors import UsageError
from bridge.ops.mqtt import payload_bytes, read_retained
from bridge.ops.timefmt import iso_utc
from schemas import (
    Ack,
    BridgePresence,
    Command,
    ContractError,
    DeviceConfig,
    PresenceLost,
    PresenceOffline,
    PresenceOnline,
    Status,
    decode,
    decode_for_kind,
    is_valid_device_id,
    parse_topic,
)
from schemas.topics import bridge_sync_topic, is_bridge_topic, provision_topic

BRIDGE: Final = "bridge"
SYNC: Final = "sync"
#: A topic outside the contract's prefix: shown raw, not judged.
OTHER: Final = "other"
PROVISION: Final = "provision"
UNKNOWN: Final = "unknown"
_BRIDGE_DEVICE: Final = "_bridge"
_RAW_SHOWN: Final = 300

_STATE_STYLE: Final = {"online": "green", "offline": "yellow", "lost": "red"}
_KIND_STYLE: Final = {
    "presence": "bold",
    "status": "cyan",
    "cmd": "magenta",
    "ack": "blue",
    "config": "bright_blue",
    BRIDGE: "bold bright_white",
}


class SubscriptionRefused(UsageError):
    """The broker refused the filter (its ACL): a silent tail would wait forever."""

    def __init__(self, filter_: str) -> None:
        super().__init__(
            f"the broker refused the subscription to {filter_!r}: this user may not read it",
            hint="pass --broker with a user allowed to read those topics",
        )


@dataclass(frozen=True, slots=True)
class WatchEvent:
    received_ms: int
    topic: str
    retained: bool
    #: ``_bridge`` for the bridge's own topics; ``None`` when the topic names no device.
    device_id: str | None
    #: A :class:`schemas.TopicKind` value, or ``bridge``, ``sync``, ``provision``,
    #: ``unknown`` (under the prefix but not a contract topic: invalid), ``other`` (outside
    #: the prefix: shown raw).
    kind: str
    valid: bool
    summary: str
    error: str | None
    payload: bytes
    #: The decoded payload as JSON-ready data (``None`` when invalid or not decoded).
    data: dict[str, Any] | None = None
    #: Presence state (device or bridge) for colouring; ``None`` otherwise.
    state: str | None = None


def _is_sync_topic(topic: str, prefix: str) -> bool:
    nonce = topic.rpartition("/")[2]
    return is_valid_device_id(nonce) and topic == bridge_sync_topic(nonce, prefix)


def _provision_client(topic: str, prefix: str) -> str | None:
    parts = topic.rsplit("/", 2)
    if len(parts) != 3 or not is_valid_device_id(parts[1]):
        return None
    try:
        return parts[1] if topic == provision_topic(parts[1], parts[2], prefix) else None
    except ValueError:
        return None


def describe(
    topic: str, payload: bytes, *, retained: bool, received_ms: int, prefix: str
) -> WatchEvent:
    """Decode and validate one message; never raises."""

    def event(**fields: Any) -> WatchEvent:
        return WatchEvent(
            received_ms=received_ms, topic=topic, retained=retained, payload=payload, **fields
        )

    if not topic.startswith(prefix.rstrip("/") + "/"):
        # Not the contract's: nothing to check it against.
        return event(
            device_id=None,
            kind=OTHER,
            valid=True,
            summary="(empty)" if not payload else _raw_text(payload),
            error=None,
        )
    if not payload:
        # A zero-length publish is how a retained message is deleted, not a bad payload.
        device = _device_of(topic, prefix)
        kind = device[1] if device else UNKNOWN
        return event(
            device_id=device[0] if device else None,
            kind=kind,
            valid=True,
            summary="(retained message cleared)",
            error=None,
        )
    if is_bridge_topic(topic, prefix):
        return _decoded(event, _BRIDGE_DEVICE, BRIDGE, lambda: decode(BridgePresence, payload))
    if _is_sync_topic(topic, prefix):
        return event(
            device_id=_BRIDGE_DEVICE,
            kind=SYNC,
            valid=True,
            summary="snapshot marker",
            error=None,
        )
    client = _provision_client(topic, prefix)
    if client is not None:
        return event(
            device_id=client,
            kind=PROVISION,
            valid=True,
            summary=_raw_text(payload),
            error=None,
        )
    try:
        parsed = parse_topic(topic, prefix)
    except ContractError as exc:
        return event(device_id=None, kind=UNKNOWN, valid=False, summary="", error=str(exc))
    return _decoded(
        event, parsed.device_id, parsed.kind.value, lambda: decode_for_kind(parsed.kind, payload)
    )


def _device_of(topic: str, prefix: str) -> tuple[str, str] | None:
    if is_bridge_topic(topic, prefix):
        return _BRIDGE_DEVICE, BRIDGE
    try:
        parsed = parse_topic(topic, prefix)
    except ContractError:
        return None
    return parsed.device_id, parsed.kind.value


def _decoded(
    event: Callable[..., WatchEvent],
    device_id: str,
    kind: str,
    decoder: Callable[[], BaseModel],
) -> WatchEvent:
    try:
        model = decoder()
    except ContractError as exc:
        return event(device_id=device_id, kind=kind, valid=False, summary="", error=str(exc))
    state = getattr(model, "state", None)
    return event(
        device_id=device_id,
        kind=kind,
        valid=True,
        summary=summarize(model),
        error=None,
        data=model.model_dump(mode="json", exclude_none=True),
        state=str(state.value) if kind in ("presence", BRIDGE) and state is not None else None,
    )


def summarize(model: BaseModel) -> str:
    """The few fields of a payload an operator reads first."""
    if isinstance(model, PresenceOnline):
        return _fields(
            "online",
            session=model.session,
            app=model.app_version,
            android=model.android_version,
            ip=model.ip_address,
        )
    if isinstance(model, PresenceOffline):
        return _fields("offline", reason=model.reason.value, session=model.session)
    if isinstance(model, PresenceLost):
        return _fields("lost (Last Will)", session=model.session)
    if isinstance(model, Status):
        return _fields(
            None,
            session=model.session,
            seq=model.seq,
            battery=None if model.battery_level is None else f"{model.battery_level}%",
            wifi=None if model.wifi_strength is None else f"{model.wifi_strength}dBm",
            screen=None if model.screen_on is None else ("on" if model.screen_on else "off"),
            net=model.network_type,
            config=model.config_version,
        )
    if isinstance(model, Command):
        return _fields(
            model.type,
            id=str(model.id),
            device=model.device_id,
            expires=iso_utc(model.expires_at),
            args=json.dumps(model.args, separators=(",", ":")) if model.args else None,
        )
    if isinstance(model, Ack):
        return _fields(model.state.value, id=str(model.id), detail=model.detail)
    if isinstance(model, DeviceConfig):
        return _fields(
            None,
            version=model.version,
            interval=f"{model.status_interval_s}s",
            remote_control="on" if model.remote_control_enabled else "off",
            url=model.display_url,
        )
    if isinstance(model, BridgePresence):
        return _fields(model.state.value, instance=model.instance, version=model.version)
    return model.model_dump_json(exclude_none=True)


def _fields(head: str | None, **fields: object) -> str:
    parts = [head] if head else []
    parts += [f"{key}={value}" for key, value in fields.items() if value is not None]
    return " ".join(parts)


def _raw_text(payload: bytes) -> str:
    text = payload.decode("utf-8", errors="replace")
    return text if len(text) <= _RAW_SHOWN else text[:_RAW_SHOWN] + "..."


def _clock(ms: int) -> str:
    stamp = datetime.fromtimestamp(ms / 1000, UTC)
    return stamp.strftime("%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}"


def render_line(event: WatchEvent, *, raw: bool = False) -> Text:
    """``12:03:05.123 R lobby-1  presence  online session=7 app=2.4.1``, coloured."""
    line = Text()
    line.append(_clock(event.received_ms), style="dim")
    line.append(" R " if event.retained else "   ", style="dim")
    if raw or event.kind == OTHER:
        line.append(event.topic, style="bold")
        line.append(" ")
        line.append(_raw_text(event.payload))
        return line
    line.append(f"{event.device_id or '?':<20} ", style="bold" if event.device_id else "dim")
    line.append(f"{event.kind:<9} ", style=_KIND_STYLE.get(event.kind, "dim"))
    if not event.valid:
        line.append("INVALID ", style="bold white on red")
        line.append(event.error or "", style="red")
        line.append("  ")
        line.append(f"topic={event.topic} payload={_raw_text(event.payload)}", style="dim")
        return line
    head, _, rest = event.summary.partition(" ")
    if event.state is not None:
        line.append(head, style=f"bold {_STATE_STYLE.get(event.state, '')}".strip())
        if rest:
            line.append(" " + rest)
    else:
        line.append(event.summary)
    return line


def payload_data(event: WatchEvent) -> Any | None:
    """The payload as JSON data for ``--pretty``: the decoded contract payload, else the
    raw payload when it parses as JSON; ``None`` otherwise."""
    if event.data is not None:
        return event.data
    try:
        return json.loads(event.payload)
    except ValueError:
        return None


def subscription_refused(granted: Sequence[Any]) -> bool:
    """Whether a SUBACK refused the subscription: paho reports 3.1.1's 0x80 and MQTT 5's
    failure reason codes alike as ``ReasonCode`` (an ``int`` in older paho)."""
    for code in granted:
        failure = getattr(code, "is_failure", None)
        if failure if failure is not None else int(code) >= 0x80:
            return True
    return False


def to_json(event: WatchEvent, *, raw: bool = False) -> dict[str, Any]:
    """One line of ``watch --json``: stable keys, the payload decoded when valid."""
    out: dict[str, Any] = {
        "received_ms": event.received_ms,
        "received_at": iso_utc(event.received_ms),
        "topic": event.topic,
        "retained": event.retained,
        "device": event.device_id,
        "kind": event.kind,
        "valid": event.valid,
        "error": event.error,
        "summary": event.summary,
    }
    if raw or event.data is None:
        out["payload"] = event.payload.decode("utf-8", errors="replace")
    else:
        out["payload"] = event.data
    return out


async def tail(
    client: aiomqtt.Client,
    filter_: str,
    on_event: Callable[[WatchEvent], None],
    *,
    prefix: str,
    count: int | None,
    clock: Callable[[], int],
) -> int:
    """Deliver every message on ``filter_`` (retained ones first) until ``count``;
    returns how many were delivered. Snapshot markers of other observers are skipped."""
    granted = await client.subscribe(filter_, qos=1)
    if subscription_refused(granted):
        raise SubscriptionRefused(filter_)
    seen = 0
    if count is not None and count <= 0:
        return 0
    async for message in client.messages:
        topic = message.topic.value
        if _is_sync_topic(topic, prefix):
            continue
        on_event(
            describe(
                topic,
                payload_bytes(message.payload),
                retained=bool(message.retain),
                received_ms=clock(),
                prefix=prefix,
            )
        )
        seen += 1
        if count is not None and seen >= count:
            break
    return seen


async def retained_snapshot(
    client: aiomqtt.Client, filter_: str, *, prefix: str, clock: Callable[[], int]
) -> tuple[list[WatchEvent], bool]:
    """The retained messages under ``filter_``, decoded, sorted by topic; and whether the
    snapshot is known complete."""
    # Asked apart first: read_retained does not look at the SUBACK, and a refused filter
    # would read as an empty snapshot.
    if subscription_refused(await client.subscribe(filter_, qos=1)):
        raise SubscriptionRefused(filter_)
    snapshot = await read_retained(client, [filter_], prefix=prefix)
    now = clock()
    events = [
        describe(m.topic, m.payload, retained=True, received_ms=now, prefix=prefix)
        for m in snapshot.messages
        if not _is_sync_topic(m.topic, prefix)
    ]
    return events, snapshot.complete
