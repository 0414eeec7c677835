"""The wire payloads of contract v1, one pydantic model each.

Models are strict (no silent "85" -> 85 coercion: a kiosk that sends the wrong type
has a bug we want to see), frozen, and ignore unknown fields so that a newer kiosk can
add fields without breaking an older bridge.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from schemas.constants import MAX_INT64, SCHEMA_VERSION, TOKEN_PATTERN
from schemas.device_id import DeviceId

# Epoch milliseconds; the upper bound (year 2286) catches seconds-vs-ms mix-ups only on
# the far side, so the bridge checks skew separately instead of rejecting here.
EpochMs = Annotated[int, Field(ge=0, le=9_999_999_999_999, description="Unix time in ms")]
Session = Annotated[
    int,
    Field(
        gt=0,
        le=MAX_INT64,
        description="Connection session: strictly larger at every new connection of the device",
    ),
]
# Free text must not carry NUL: PostgreSQL text columns refuse it, so one such string
# from a kiosk would make every database write of its row fail.
_NO_NUL = r"^[^\x00]*$"
ShortText = Annotated[str, Field(max_length=128, pattern=_NO_NUL)]
Token = Annotated[str, Field(pattern=TOKEN_PATTERN, description="The device's MQTT password")]


class _Wire(BaseModel):
    model_config = ConfigDict(strict=True, frozen=True, extra="ignore")

    schema_version: int = Field(
        default=SCHEMA_VERSION, ge=1, description="Contract version of the sender"
    )


# --- presence ----------------------------------------------------------------------


class PresenceState(StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"
    LOST = "lost"


class OfflineReason(StrEnum):
    SHUTDOWN = "shutdown"
    REBOOT = "reboot"
    APP_UPDATE = "app_update"
    DOZE = "doze"
    NETWORK_CHANGE = "network_change"
    #: Set by the bridge when an operator revokes the device's credential.
    REVOKED = "revoked"
    #: Contract 1.1: announced by the kiosk just before it executes a ``wipe`` command,
    #: so the CMS can tell a wiped device from one that was merely switched off.
    WIPE = "wipe"


class PresenceOnline(_Wire):
    """Birth: retained on ``presence`` right after CONNACK."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "schema_version": 1,
                    "state": "online",
                    "session": 1764331200000,
                    "ts": 1764331200412,
                    "app_version": "3.4.1",
                    "android_version": "13",
                    "ip_address": "192.0.2.17",
                    "mac_address": "02:00:00:3a:4b:5c",
                }
            ]
        }
    )

    state: Literal[PresenceState.ONLINE] = PresenceState.ONLINE
    session: Session
    ts: EpochMs
    app_version: ShortText | None = None
    android_version: ShortText | None = None
    ip_address: Annotated[str, Field(max_length=45, pattern=_NO_NUL)] | None = None
    mac_address: Annotated[str, Field(max_length=17, pattern=_NO_NUL)] | None = None


class PresenceOffline(_Wire):
    """Announced offline: retained on ``presence`` just before a clean DISCONNECT."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "schema_version": 1,
                    "state": "offline",
                    "session": 1764331200000,
                    "ts": 1764334800250,
                    "reason": "app_update",
                }
            ]
        }
    )

    state: Literal[PresenceState.OFFLINE] = PresenceState.OFFLINE
    session: Session
    ts: EpochMs
    reason: OfflineReason


class PresenceLost(_Wire):
    """Last Will, set at CONNECT; published by the broker when the connection dies."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"schema_version": 1, "state": "lost", "session": 1764331200000}]
        }
    )

    state: Literal[PresenceState.LOST] = PresenceState.LOST
    session: Session
    ts: EpochMs | None = Field(
        default=None, description="Absent: a Will is written at connect time, not at loss"
    )


Presence = Annotated[PresenceOnline | PresenceOffline | PresenceLost, Field(discriminator="state")]


# --- status --------------------------------------------------------------------------


class Status(_Wire):
    """Telemetry, retained on ``status``; ``seq`` increases within a session."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "schema_version": 1,
                    "session": 1764331200000,
                    "seq": 42,
                    "ts": 1764332460118,
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
                }
            ]
        }
    )

    session: Session
    seq: Annotated[
        int,
        Field(ge=0, le=MAX_INT64, description="Increases with every status within a session"),
    ]
    ts: EpochMs
    battery_level: Annotated[int, Field(ge=0, le=100)] | None = None
    wifi_strength: Annotated[int, Field(ge=-127, le=0, description="dBm")] | None = None
    screen_on: bool | None = None
    storage_available_mb: Annotated[int, Field(ge=0, le=MAX_INT64)] | None = None
    storage_total_mb: Annotated[int, Field(ge=0, le=MAX_INT64)] | None = None
    ram_usage_mb: Annotated[int, Field(ge=0, le=MAX_INT64)] | None = None
    ram_total_mb: Annotated[int, Field(ge=0, le=MAX_INT64)] | None = None
    cpu_temp: Annotated[float, Field(ge=-60, le=200, description="degrees Celsius")] | None = None
    network_type: Annotated[str, Field(max_length=32, pattern=_NO_NUL)] | None = None
    current_url: Annotated[str, Field(max_length=2048, pattern=_NO_NUL)] | None = None
    config_version: Annotated[int, Field(ge=0, le=MAX_INT64)] | None = None


# --- commands --------------------------------------------------------------------------


class CommandType(StrEnum):
    REFRESH = "refresh"
    RECONNECT = "reconnect"
    WIPE = "wipe"
    SET_CONFIG = "set_config"
    ROTATE_TOKEN = "rotate_token"


class RefreshArgs(_Wire):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"url": "https://cms.example.com/display/abc123"}]}
    )

    url: Annotated[str, Field(max_length=2048, pattern=_NO_NUL)] | None = None


class ReconnectArgs(_Wire):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"delay_s": 5, "reason": "broker maintenance"}]}
    )

    delay_s: Annotated[int, Field(ge=0, le=3600)] = 0
    reason: Annotated[str, Field(max_length=256, pattern=_NO_NUL)] | None = None


class WipeArgs(_Wire):
    model_config = ConfigDict(json_schema_extra={"examples": [{"reason": "returned to vendor"}]})

    reason: Annotated[str, Field(max_length=256, pattern=_NO_NUL)] | None = None


class DeviceConfig(_Wire):
    """Desired configuration, retained on ``config``; also the args of ``set_config``."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "schema_version": 1,
                    "version": 7,
                    "remote_control_enabled": False,
                    "status_interval_s": 30,
                    "display_url": "https://cms.example.com/display/abc123",
                }
            ]
        }
    )

    version: Annotated[
        int,
        Field(
            ge=0,
            le=MAX_INT64,
            description="Bumped at every change; the kiosk echoes it as config_version",
        ),
    ]
    remote_control_enabled: bool = False
    status_interval_s: Annotated[int, Field(ge=5, le=3600)] = 30
    display_url: Annotated[str, Field(max_length=2048, pattern=_NO_NUL)] | None = None


class RotateTokenArgs(_Wire):
    """A new MQTT password for the kiosk, sent only by the bridge's credential rotation."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"token": "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"}
            ]
        }
    )

    token: Annotated[
        Token,
        Field(
            description="Store it durably, ack succeeded, then use it from the next "
            "connection on; the broker switches to it once the ack is in"
        ),
    ]


#: Commands that must name their device, which the kiosk checks: a wipe or a token
#: republished on the wrong topic must not erase, or lock out, another kiosk.
NAMED_COMMANDS: frozenset[str] = frozenset({CommandType.WIPE.value, CommandType.ROTATE_TOKEN.value})

COMMAND_ARGS: dict[CommandType, type[_Wire]] = {
    CommandType.REFRESH: RefreshArgs,
    CommandType.RECONNECT: ReconnectArgs,
    CommandType.WIPE: WipeArgs,
    CommandType.SET_CONFIG: DeviceConfig,
    CommandType.ROTATE_TOKEN: RotateTokenArgs,
}


class Command(_Wire):
    """A command on ``cmd``. ``type`` is free text on the wire so that a kiosk can answer
    an unknown type with a ``rejected`` ack; args of known types are validated."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "schema_version": 1,
                    "id": "6f1c2b9e-3d4a-4e5b-8c7d-0a1b2c3d4e5f",
                    "type": "refresh",
                    "issued_at": 1764332500000,
                    "expires_at": 1764336100000,
                    "args": {"url": "https://cms.example.com/display/abc123"},
                },
                {
                    "schema_version": 1,
                    "id": "0d9e8f7a-6b5c-4d3e-a2f1-0e9d8c7b6a59",
                    "type": "wipe",
                    "issued_at": 1764332500000,
                    "expires_at": 1764332800000,
                    "device_id": "kiosk-0042",
                    "args": {"reason": "returned to vendor"},
                },
            ]
        }
    )

    id: UUID
    type: Annotated[str, Field(min_length=1, max_length=32, pattern=r"^[a-z][a-z0-9_]*$")]
    issued_at: EpochMs
    expires_at: EpochMs = Field(
        description="Unix time in ms, not before issued_at; once it has passed the kiosk "
        "drops the command unexecuted"
    )
    device_id: DeviceId | None = Field(
        default=None,
        # validate_default: the wipe rule below must also run when device_id is absent.
        validate_default=True,
        description="Target device; required for wipe and rotate_token, checked by the kiosk",
    )
    args: dict[str, Any] = Field(default_factory=dict)

    # Field validators rather than one model validator so that an error carries the
    # field's location ("expires_at", "args.url"): the bridge logs and counts by it.
    # They read earlier fields from info.data, which holds only fields that validated.

    @field_validator("expires_at")
    @classmethod
    def _not_before_issued(cls, value: int, info: ValidationInfo) -> int:
        issued_at = info.data.get("issued_at")
        if issued_at is not None and value < issued_at:
            raise ValueError("expires_at must not be before issued_at")
        return value

    @field_validator("device_id")
    @classmethod
    def _names_device(cls, value: str | None, info: ValidationInfo) -> str | None:
        command_type = info.data.get("type")
        if value is None and command_type in NAMED_COMMANDS:
            raise ValueError(f"{command_type} requires device_id")
        return value

    @field_validator("args")
    @classmethod
    def _known_args(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        command_type = info.data.get("type")
        if command_type in COMMAND_ARGS:
            # A ValidationError raised here keeps its own locations, prefixed with "args".
            COMMAND_ARGS[CommandType(command_type)].model_validate(value, strict=True)
        return value

    @property
    def known_type(self) -> CommandType | None:
        try:
            return CommandType(self.type)
        except ValueError:
            return None

    def typed_args(self) -> _Wire:
        """The args as their model; raises ``ValueError`` for an unknown type."""
        known = self.known_type
        if known is None:
            raise ValueError(f"unknown command type {self.type!r}")
        return COMMAND_ARGS[known].model_validate(self.args, strict=True)


class AckState(StrEnum):
    RECEIVED = "received"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REJECTED = "rejected"


class Ack(_Wire):
    """The kiosk's answer to a command, on its own ``ack`` topic."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "schema_version": 1,
                    "id": "6f1c2b9e-3d4a-4e5b-8c7d-0a1b2c3d4e5f",
                    "state": "received",
                    "ts": 1764332500031,
                },
                {
                    "schema_version": 1,
                    "id": "6f1c2b9e-3d4a-4e5b-8c7d-0a1b2c3d4e5f",
                    "state": "succeeded",
                    "ts": 1764332501870,
                },
                {
                    "schema_version": 1,
                    "id": "6f1c2b9e-3d4a-4e5b-8c7d-0a1b2c3d4e5f",
                    "state": "rejected",
                    "ts": 1764332500032,
                    "detail": "unknown command type 'dance'",
                },
            ]
        }
    )

    id: UUID
    state: AckState
    ts: EpochMs
    detail: Annotated[str, Field(max_length=1024, pattern=_NO_NUL)] | None = None


# --- the bridge itself -----------------------------------------------------------------------


class BridgePresence(_Wire):
    """A bridge's retained birth and Last Will on ``{prefix}/_bridge/{instance}/presence``
    (contract 1.0: ``{prefix}/_bridge/presence``)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "schema_version": 1,
                    "state": "online",
                    "instance": "kb-host1-3fa9c2",
                    "ts": 1764331000000,
                    "version": "0.1.0",
                    "database": "9c1e4b7a20d34f58",
                    "role": "leader",
                },
                {
                    "schema_version": 1,
                    "state": "lost",
                    "instance": "kb-host1-3fa9c2",
                    "database": "9c1e4b7a20d34f58",
                },
            ]
        }
    )

    state: PresenceState
    instance: Annotated[
        str,
        Field(
            min_length=1,
            max_length=128,
            pattern=_NO_NUL,
            description="Which bridge process; several may run with a shared subscription",
        ),
    ]
    ts: EpochMs | None = None
    version: ShortText | None = None
    database: (
        Annotated[
            str,
            Field(
                min_length=1,
                max_length=64,
                pattern=r"^[0-9A-Za-z_-]+$",
                description=(
                    "The id of the database this bridge writes (random, kept in its kb_meta "
                    "table; never the URL): tools judge only the bridges of their database"
                ),
            ),
        ]
        | None
    ) = None
    role: (
        Annotated[
            str,
            Field(
                max_length=16,
                pattern=r"^[a-z]+$",
                description="leader (writes), standby (waits for the lease) or shared",
            ),
        ]
        | None
    ) = None
