"""Request and response bodies of the HTTP API, as they appear in the OpenAPI spec.

Legacy device bodies keep today's field names and accept what the old APK sends (lax
types: ``"85"`` is 85). The CMS API's bodies are new and strict about their shape.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas import DEVICE_ID_PATTERN

_NO_NUL = r"^[^\x00]*$"
Text128 = Annotated[str, Field(max_length=128, pattern=_NO_NUL)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ErrorDetail(_Body):
    field: str
    message: str
    type: str


class ErrorInfo(_Body):
    code: str = Field(description="Stable machine-readable reason, e.g. token_revoked")
    message: str
    details: list[ErrorDetail] | None = None


class ErrorBody(_Body):
    success: Literal[False] = False
    error: ErrorInfo


# --- legacy device endpoints -------------------------------------------------------------


class RegisterBody(_Body):
    device_id: Annotated[
        str,
        Field(
            pattern=DEVICE_ID_PATTERN,
            description="The Android id; it is also the MQTT client id and topic segment",
        ),
    ]
    app_version: Text128 | None = None
    android_version: Text128 | None = None
    ip_address: Annotated[str, Field(max_length=45, pattern=_NO_NUL)] | None = None
    mac_address: Annotated[str, Field(max_length=17, pattern=_NO_NUL)] | None = None


class MqttTopics(_Body):
    presence: str
    status: str
    cmd: str
    ack: str
    config: str
    bridge_presence: str = Field(
        description="Filter of every bridge's retained presence ({prefix}/_bridge/+/presence)"
    )


class MqttDetails(_Body):
    url: str | None = Field(description="Broker URL for kiosks; null when not configured")
    client_id: str
    username: str
    password: str | None = Field(
        description="The device token, as the MQTT password, when the broker takes device "
        "tokens (an open broker); null when it does not"
    )
    credentials: Literal["token", "claim"] = Field(
        description="token: connect with the password above. claim: the broker requires a "
        "credential of its own; get one with the claim flow (docs/CONTRACT.md, "
        "provisioning). Registering over HTTP never creates one: it is unauthenticated"
    )
    keepalive_s: int
    session_expiry_s: int
    prefix: str
    topics: MqttTopics


class RegisterResponse(_Body):
    remote_id: int
    token: str = Field(description="64 characters; Bearer token of the device endpoints")
    remote_control_enabled: bool
    websocket_url: str
    mqtt: MqttDetails


class HeartbeatBody(_Body):
    """Today's heartbeat metrics, all optional. A value of the wrong type or out of the
    range the MQTT status allows is ignored, named in the response's `ignored_fields`
    and counted, rather than failing the heartbeat: a bad sensor must not make a live
    kiosk look dead. A body that is not a JSON object is a 400."""

    battery_level: int | None = None
    wifi_strength: int | None = None
    screen_on: bool | None = None
    storage_available_mb: int | None = None
    storage_total_mb: int | None = None
    ram_usage_mb: int | None = None
    ram_total_mb: int | None = None
    cpu_temp: float | None = None
    network_type: str | None = None
    current_url: str | None = None


class PendingCommand(_Body):
    """A command for the kiosk, in the wire contract's ``Command`` shape."""

    id: str
    type: str
    issued_at: int
    expires_at: int
    device_id: str
    args: dict[str, Any]


class HeartbeatData(_Body):
    remote_control_enabled: bool
    should_reconnect: bool
    reconnect_delay_seconds: int | None = None
    reconnect_reason: str | None = None
    pending_commands: list[PendingCommand]
    ignored_fields: list[str] | None = None


class HeartbeatResponse(_Body):
    success: Literal[True] = True
    data: HeartbeatData


class AckResult(_Body):
    command_id: str
    state: str | None
    applied: bool = Field(description="False when the ack did not move the command on")


class AckResponse(_Body):
    success: Literal[True] = True
    data: AckResult


class RefreshAccepted(_Body):
    command_id: str
    device_id: str
    state: str
    replayed: bool = Field(description="True when the Idempotency-Key was seen before")


class RefreshResponse(_Body):
    success: Literal[True] = True
    data: RefreshAccepted


# --- CMS API ------------------------------------------------------------------------------


class DeviceSummary(_Body):
    device_id: str
    remote_id: int
    name: str | None
    status: str = Field(description="The CMS's remotes.status: Connected or Disconnected")
    state: str = Field(description="online, offline, lost or unknown")
    transport: Literal["mqtt", "http", "none"]
    session: int | None
    since_ms: int | None
    reason: str | None
    flapping: bool
    last_seen_at: str | None
    last_status_ms: int | None
    remote_control_enabled: bool
    app_version: str | None
    config_version: int | None
    needs_provisioning: bool


class DeviceList(_Body):
    devices: list[DeviceSummary]
    next_after: str | None = Field(description="Pass as ?after= for the next page")


class Liveness(_Body):
    """Whether the states in this answer are live (issue: no frozen truth)."""

    states_live: bool = Field(
        description=(
            "true while a bridge writes this database (its heartbeat is newer than "
            "KB_STALE_AFTER_S) and hears the broker; false: the states may be stale"
        )
    )
    last_writer: str | None = Field(description="The bridge instance that wrote last")
    last_heartbeat_ms: int | None = Field(description="Its last heartbeat (epoch ms)")
    broker_connected: bool
    warning: str | None = Field(description="One line for a person while not live")


class DeviceListResponse(_Body):
    success: Literal[True] = True
    data: DeviceList
    liveness: Liveness


class HistoryEntry(_Body):
    state: str
    prev_state: str | None
    session: int
    reason: str | None
    verdict: str
    received_ms: int
    committed_ms: int


class UptimeWindow(_Body):
    window_ms: int
    online_ms: int
    known_ms: int = Field(description="Time whose state the bridge knows")
    percent: float | None = Field(description="online / known; null when nothing is known")


class CommandView(_Body):
    id: str
    device_id: str
    type: str
    args: dict[str, Any]
    state: str
    created_at: str | None
    sent_at: str | None
    delivered_at: str | None
    acked_at: str | None
    finished_at: str | None
    expires_at: str | None
    attempts: int
    last_error: str | None
    requested_by: str | None
    reason: str | None
    detail: str | None


class DeviceDetail(DeviceSummary):
    telemetry: dict[str, Any]
    metadata: dict[str, str | None]
    history: list[HistoryEntry]
    uptime: dict[str, UptimeWindow]
    recent_commands: list[CommandView]


class DeviceDetailResponse(_Body):
    success: Literal[True] = True
    data: DeviceDetail
    liveness: Liveness


class CommandRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Annotated[str, Field(min_length=1, max_length=32)]
    device_ids: Annotated[
        list[Annotated[str, Field(pattern=DEVICE_ID_PATTERN)]],
        Field(min_length=1, max_length=1000),
    ]
    args: dict[str, Any] = Field(default_factory=dict)
    #: Unset: the kind's default (an hour; a wipe 600 s, its maximum).
    ttl_s: Annotated[float, Field(gt=0, le=7 * 24 * 3600)] | None = None
    reason: Annotated[str, Field(max_length=1000, pattern=_NO_NUL)] | None = None
    requested_by: Annotated[str, Field(max_length=128, pattern=_NO_NUL)] | None = None


class CommandRef(_Body):
    id: str
    device_id: str


class CommandsAccepted(_Body):
    commands: list[CommandRef]


class CommandsResponse(_Body):
    success: Literal[True] = True
    data: CommandsAccepted


class CommandResponse(_Body):
    success: Literal[True] = True
    data: CommandView
