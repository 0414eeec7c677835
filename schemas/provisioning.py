"""Provisioning by claim: the request a kiosk sends with the shared claim credential, and
the bridge's answer.

A kiosk without a credential connects with the claim credential (which may do nothing
else), publishes a :class:`ProvisionRequest` on ``{prefix}/provision/{client id}/request``
and reads the answer on ``.../response``: :class:`ProvisionAccepted` with its token (its
MQTT password from then on) or :class:`ProvisionRefused` with a reason. The ``nonce``
ties the answer to the request; sending the same request again (same nonce) gets the
same answer, never a second credential.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from enum import StrEnum
from functools import lru_cache
from types import MappingProxyType
from typing import Annotated, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from schemas.codec import _as_error, _check_size
from schemas.constants import DEFAULT_PREFIX, PROVISION_SEGMENT, TOKEN_PATTERN
from schemas.device_id import DeviceId, is_valid_device_id
from schemas.errors import InvalidDeviceId, InvalidTopic
from schemas.payloads import _NO_NUL, DeviceConfig, ShortText, Token, _Wire
from schemas.topics import _check_prefix

#: base64url or hex, at least 22 characters (128 bits of base64url): the nonce is the
#: only thing that tells one request from a replay, so it must not repeat by chance.
NONCE_PATTERN: Final = r"^[A-Za-z0-9_-]{22,128}$"

Nonce = Annotated[str, Field(pattern=NONCE_PATTERN, description="Random, fresh per request")]

#: The only client ids a claim connection may use: ``claim-`` and at least 8 random
#: characters. No device id may start with ``claim-``, so a claimant can never take over
#: (and disconnect) a device's session under its client id, and a request on a device's
#: own ``provision/{id}/request`` topic is never a claim.
CLAIM_CLIENT_ID_PREFIX: Final = "claim-"
CLAIM_CLIENT_ID_PATTERN: Final = r"^claim-[A-Za-z0-9_-]{8,58}$"
_CLAIM_CLIENT_ID_RE: Final = re.compile(CLAIM_CLIENT_ID_PATTERN)


def is_claim_client_id(client_id: str | None) -> bool:
    """Whether ``client_id`` has the reserved shape of a claim connection."""
    return client_id is not None and _CLAIM_CLIENT_ID_RE.fullmatch(client_id) is not None


class ProvisionRequest(_Wire):
    """Published by a kiosk with the claim credential."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "schema_version": 1,
                    "device_id": "kiosk-0042",
                    "nonce": "q4Ck1M1wHn9u2mA7xYt3bQ",
                    "app_version": "3.4.1",
                    "android_version": "13",
                    "ip_address": "192.0.2.17",
                    "mac_address": "02:00:00:3a:4b:5c",
                }
            ]
        }
    )

    device_id: DeviceId
    nonce: Nonce
    app_version: ShortText | None = None
    android_version: ShortText | None = None
    ip_address: Annotated[str, Field(max_length=45, pattern=_NO_NUL)] | None = None
    mac_address: Annotated[str, Field(max_length=17, pattern=_NO_NUL)] | None = None
    #: Contract 1.1: the token the device holds (current, or the one a rotation replaced),
    #: as proof that it is the device. Needed to re-provision a device whose credential
    #: is active, unless an operator opened a claim window for it.
    proof_token: Annotated[
        Token | None,
        Field(description="The device's current or previous token: proof of identity"),
    ] = None


class ProvisionResult(StrEnum):
    ACCEPTED = "accepted"
    REFUSED = "refused"


class RefusalReason(StrEnum):
    #: The request does not follow this schema (or its topic is malformed).
    INVALID_REQUEST = "invalid_request"
    #: Soft-deleted in the CMS; refused until an operator runs ``device restore``.
    DELETED = "deleted"
    #: The credential was revoked; refused until an operator runs ``device restore``.
    REVOKED = "revoked"
    #: The device is connected with a valid credential right now: a second claimant for
    #: a live device id is more likely a clone than a reinstall. Retry later.
    ONLINE = "online"
    #: This nonce was used before by another request; send a fresh one.
    NONCE_REUSED = "nonce_reused"
    #: The id is reserved for the bridge's own clients.
    RESERVED_ID = "reserved_id"
    #: The bridge could not complete the request (database or broker); retry later.
    UNAVAILABLE = "unavailable"
    #: Contract 1.1: the claim connection's client id is not ``claim-<random>``.
    INVALID_CLIENT_ID = "invalid_client_id"
    #: Contract 1.1: the device holds an active credential; the request must carry its
    #: current or previous token (``proof_token``), or an operator must open a claim
    #: window (``kiosk-bridge device allow-claim ID``). Retry after ``retry_after_s``.
    PROOF_REQUIRED = "proof_required"


class ProvisionAccepted(_Wire):
    """The bridge's answer when the device may connect: its credential and config."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "schema_version": 1,
                    "result": "accepted",
                    "nonce": "q4Ck1M1wHn9u2mA7xYt3bQ",
                    "device_id": "kiosk-0042",
                    "remote_id": 42,
                    "token": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
                    "mqtt_username": "kiosk-0042",
                    "config": {"version": 3, "status_interval_s": 30},
                }
            ]
        }
    )

    result: Literal[ProvisionResult.ACCEPTED] = ProvisionResult.ACCEPTED
    nonce: Nonce
    device_id: DeviceId
    remote_id: Annotated[int, Field(ge=1, description="The device's row id in the CMS")]
    token: Token
    mqtt_username: Annotated[str, Field(min_length=1, max_length=64, pattern=_NO_NUL)]
    config: DeviceConfig


class ProvisionRefused(_Wire):
    """The bridge's answer when it will not (or cannot now) issue a credential."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "schema_version": 1,
                    "result": "refused",
                    "nonce": "q4Ck1M1wHn9u2mA7xYt3bQ",
                    "device_id": "kiosk-0042",
                    "reason": "deleted",
                    "detail": "kiosk-0042 was deleted in the CMS; an operator must restore it",
                }
            ]
        }
    )

    result: Literal[ProvisionResult.REFUSED] = ProvisionResult.REFUSED
    #: Absent when the request was too broken to carry one.
    nonce: Nonce | None = None
    device_id: DeviceId | None = None
    reason: RefusalReason
    detail: Annotated[str, Field(max_length=512, pattern=_NO_NUL)]
    retry_after_s: Annotated[int, Field(ge=1, le=86_400)] | None = None


ProvisionResponse = Annotated[ProvisionAccepted | ProvisionRefused, Field(discriminator="result")]
_RESPONSE: TypeAdapter[ProvisionAccepted | ProvisionRefused] = TypeAdapter(ProvisionResponse)


def decode_provision_request(payload: bytes | bytearray | str) -> ProvisionRequest:
    data = _check_size(payload)
    try:
        return ProvisionRequest.model_validate_json(data)
    except ValidationError as exc:
        raise _as_error(exc) from None


def decode_provision_response(
    payload: bytes | bytearray | str,
) -> ProvisionAccepted | ProvisionRefused:
    data = _check_size(payload)
    try:
        return _RESPONSE.validate_json(data)
    except ValidationError as exc:
        raise _as_error(exc, tagged=True) from None


# --- topics --------------------------------------------------------------------------------


def provision_filter(leaf: Literal["request", "response"], prefix: str = DEFAULT_PREFIX) -> str:
    """``{prefix}/provision/+/{leaf}``: every claimant's requests or responses."""
    if leaf not in ("request", "response"):
        raise ValueError(f"provision leaf must be 'request' or 'response', not {leaf!r}")
    return f"{_check_prefix(prefix)}/{PROVISION_SEGMENT}/+/{leaf}"


def provision_request_filter(prefix: str = DEFAULT_PREFIX) -> str:
    """``{prefix}/provision/+/request``: every claimant's requests (the bridge reads it)."""
    return provision_filter("request", prefix)


@lru_cache(maxsize=16)
def _provision_re(prefix: str) -> re.Pattern[str]:
    return re.compile(
        rf"{re.escape(_check_prefix(prefix))}/{PROVISION_SEGMENT}/(?P<client_id>[^/]*)"
        r"/(?P<leaf>request|response)"
    )


def parse_provision_topic(topic: str, prefix: str = DEFAULT_PREFIX) -> tuple[str, str]:
    """``(client_id, "request"|"response")``; raises :class:`InvalidTopic` or
    :class:`InvalidDeviceId` (the client id follows the device id grammar)."""
    match = _provision_re(prefix).fullmatch(topic)
    if match is None:
        raise InvalidTopic(
            f"not a provisioning topic under {prefix!r}: {topic[:200]!r}", field="topic"
        )
    client_id = match["client_id"]
    if not is_valid_device_id(client_id):
        raise InvalidDeviceId(
            f"invalid client id {client_id[:80]!r} in topic {topic[:200]!r}", field="client_id"
        )
    return client_id, match["leaf"]


#: For the JSON Schema export: file stem -> model.
PROVISIONING_MODELS: Final[Mapping[str, type[BaseModel]]] = MappingProxyType(
    {
        "provision-request": ProvisionRequest,
        "provision-accepted": ProvisionAccepted,
        "provision-refused": ProvisionRefused,
    }
)

__all__ = [
    "CLAIM_CLIENT_ID_PATTERN",
    "CLAIM_CLIENT_ID_PREFIX",
    "NONCE_PATTERN",
    "PROVISIONING_MODELS",
    "TOKEN_PATTERN",
    "ProvisionAccepted",
    "ProvisionRefused",
    "ProvisionRequest",
    "ProvisionResponse",
    "ProvisionResult",
    "RefusalReason",
    "decode_provision_request",
    "decode_provision_response",
    "is_claim_client_id",
    "parse_provision_topic",
    "provision_filter",
    "provision_request_filter",
]
