"""Decode received bytes into models and encode models for publishing.

Decoding checks size first (before any parsing), then JSON and the model, and turns
pydantic's error into a :class:`InvalidPayload` that names the first bad field.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, TypeAdapter, ValidationError

from schemas.constants import MAX_PAYLOAD_BYTES
from schemas.errors import InvalidPayload, PayloadTooLarge
from schemas.payloads import (
    Ack,
    BridgePresence,
    Command,
    DeviceConfig,
    Presence,
    PresenceLost,
    PresenceOffline,
    PresenceOnline,
    Status,
)
from schemas.topics import TopicKind

M = TypeVar("M", bound=BaseModel)

PresenceMessage = PresenceOnline | PresenceOffline | PresenceLost
_PRESENCE: TypeAdapter[PresenceMessage] = TypeAdapter(Presence)

#: The model each device topic kind carries.
MODEL_FOR_KIND: dict[TopicKind, Any] = {
    TopicKind.PRESENCE: _PRESENCE,
    TopicKind.STATUS: Status,
    TopicKind.CMD: Command,
    TopicKind.ACK: Ack,
    TopicKind.CONFIG: DeviceConfig,
}


def _as_error(exc: ValidationError, *, tagged: bool = False) -> InvalidPayload:
    first = exc.errors(include_url=False)[0]
    loc = first["loc"]
    # A discriminated union prefixes the location with the tag ("lost.session"); the
    # kiosk developer wants the field as it is spelled in the payload.
    if tagged and len(loc) > 1:
        loc = loc[1:]
    field = ".".join(str(part) for part in loc)
    if first["type"] in ("union_tag_invalid", "union_tag_not_found"):
        # A missing or unknown tag is reported at the union's own (empty) location; the
        # bad field is the discriminator, which pydantic names only in the context, quoted.
        field = str(first.get("ctx", {}).get("discriminator", "")).strip("'")
    if first["type"] in ("json_invalid", "json_type"):
        return InvalidPayload(f"payload is not a JSON object: {first['msg']}", field="")
    where = field or "payload"
    return InvalidPayload(f"{where}: {first['msg']}", field=field)


def _check_size(payload: bytes | bytearray | str) -> bytes:
    data = payload.encode() if isinstance(payload, str) else bytes(payload)
    if len(data) > MAX_PAYLOAD_BYTES:
        raise PayloadTooLarge(
            f"payload is {len(data)} bytes, the limit is {MAX_PAYLOAD_BYTES}", field=""
        )
    if not data:
        raise InvalidPayload("payload is empty", field="")
    return data


def decode(model: type[M], payload: bytes | bytearray | str) -> M:
    """Parse ``payload`` as ``model``; raises :class:`InvalidPayload`."""
    data = _check_size(payload)
    try:
        return model.model_validate_json(data)
    except ValidationError as exc:
        raise _as_error(exc) from None


def decode_presence(payload: bytes | bytearray | str) -> PresenceMessage:
    data = _check_size(payload)
    try:
        return _PRESENCE.validate_json(data)
    except ValidationError as exc:
        raise _as_error(exc, tagged=True) from None


def decode_for_kind(kind: TopicKind, payload: bytes | bytearray | str) -> BaseModel:
    """Parse a payload received on a device topic of ``kind``."""
    if kind is TopicKind.PRESENCE:
        return decode_presence(payload)
    model: type[BaseModel] = MODEL_FOR_KIND[kind]
    return decode(model, payload)


def decode_bridge_presence(payload: bytes | bytearray | str) -> BridgePresence:
    return decode(BridgePresence, payload)


def encode(model: BaseModel) -> bytes:
    """Compact JSON without ``None`` fields, as published on the wire."""
    return model.model_dump_json(exclude_none=True).encode()
