"""The wire payloads of contract v1, one pydantic model each.

Models are strict (no silent "85" -> 85 coercion: a kiosk that sends the wrong type
has a bug we want to see), frozen, and ignore unknown fields so that a newer kiosk can
add fields without breaking an older bridge.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.constants import MAX_INT64, SCHEMA_VERSION
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
ShortText = Annotated[str, Field(max_length=128)]


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


class PresenceOnline(_Wire):
    """Birth: retained on ``presence`` right after CONNACK."""

    state: Literal[PresenceState.ONLINE] = PresenceState.ONLINE
    session: Session
    ts: EpochMs
    app_version: ShortText | None = None
    android_version: ShortText | None = None
    ip_address: Annotated[str, Field(max_length=45)] | None = None
    mac_address: Annotated[str, Field(max_length=17)] | None = None


class PresenceOffline(_Wire):
    """Announced offline: retained on ``presence`` just before a clean DISCONNECT."""

    state: Literal[PresenceState.OFFLINE] = PresenceState.OFFLINE
    session: Session
    ts: EpochMs
    reason: OfflineReason


class PresenceLost(_Wire):
    """Last Will, set at CONNECT; published by the broker when the connection dies."""

    state: Literal[PresenceState.LOST] = PresenceState.LOST
    session: Session
    ts: EpochMs | None = Field(
        default=None, description="Absent: a Will is written at connect time, not at loss"
    )


Presence = Annotated[PresenceOnline | PresenceOffline | PresenceLost, Field(discriminator="state")]


# --- status --------------------------------------------------------------------------


class Status(_Wire):
    """Telemetry, retained on ``status``; ``seq`` increases within a session."""

    session: Session
    seq: Annotated[int, Field(ge=0, le=MAX_INT64)]
    ts: EpochMs
    battery_level: Annotated[int, Field(ge=0, le=100)] | None = None
    wifi_strength: Annotated[int, Field(ge=-127, le=0, description="dBm")] | None = None
    screen_on: bool | None = None
    storage_available_mb: Annotated[int, Field(ge=0, le=MAX_INT64)] | None = None
    storage_total_mb: Annotated[int, Field(ge=0, le=MAX_INT64)] | None = None
    ram_usage_mb: Annotated[int, Field(ge=0, le=MAX_INT64)] | None = None
    ram_total_mb: Annotated[int, Field(ge=0, le=MAX_INT64)] | None = None
    cpu_temp: Annotated[float, Field(ge=-60, le=200, description="degrees Celsius")] | None = None
    network_type: Annotated[str, Field(max_length=32)] | None = None
    current_url: Annotated[str, Field(max_length=2048)] | None = None
    config_version: Annotated[int, Field(ge=0, le=MAX_INT64)] | None = None


# --- commands --------------------------------------------------------------------------


class CommandType(StrEnum):
    REFRESH = "refresh"
    RECONNECT = "reconnect"
    WIPE = "wipe"
    SET_CONFIG = "set_config"


class RefreshArgs(_Wire):
    url: Annotated[str, Field(max_length=2048)] | None = None


class ReconnectArgs(_Wire):
    delay_s: Annotated[int, Field(ge=0, le=3600)] = 0
    reason: Annotated[str, Field(max_length=256)] | None = None


class WipeArgs(_Wire):
    reason: Annotated[str, Field(max_length=256)] | None = None


class DeviceConfig(_Wire):
    """Desired configuration, retained on ``config``; also the args of ``set_config``."""

    version: Annotated[int, Field(ge=0, le=MAX_INT64)]
    remote_control_enabled: bool = False
    status_interval_s: Annotated[int, Field(ge=5, le=3600)] = 30
    display_url: Annotated[str, Field(max_length=2048)] | None = None


COMMAND_ARGS: dict[CommandType, type[_Wire]] = {
    CommandType.REFRESH: RefreshArgs,
    CommandType.RECONNECT: ReconnectArgs,
    CommandType.WIPE: WipeArgs,
    CommandType.SET_CONFIG: DeviceConfig,
}


class Command(_Wire):
    """A command on ``cmd``. ``type`` is free text on the wire so that a kiosk can answer
    an unknown type with a ``rejected`` ack; args of known types are validated."""

    id: UUID
    type: Annotated[str, Field(min_length=1, max_length=32, pattern=r"^[a-z][a-z0-9_]*$")]
    issued_at: EpochMs
    expires_at: EpochMs
    device_id: DeviceId | None = Field(
        default=None, description="Target device; required for wipe, checked by the kiosk"
    )
    args: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> Command:
        if self.expires_at < self.issued_at:
            raise ValueError("expires_at must not be before issued_at")
        known = self.known_type
        if known is not None:
            COMMAND_ARGS[known].model_validate(self.args, strict=True)
            if known is CommandType.WIPE and self.device_id is None:
                raise ValueError("wipe requires device_id")
        return self

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

    id: UUID
    state: AckState
    ts: EpochMs
    detail: Annotated[str, Field(max_length=1024)] | None = None


# --- the bridge itself -----------------------------------------------------------------------


class BridgePresence(_Wire):
    """The bridge's retained birth and Last Will on ``{prefix}/_bridge/presence``."""

    state: PresenceState
    instance: Annotated[str, Field(min_length=1, max_length=128)]
    ts: EpochMs | None = None
    version: ShortText | None = None
