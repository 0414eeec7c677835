"""The legacy device endpoints, same paths and shapes as the CMS's today."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Path, Request

from bridge.commands.lifecycle import CommandState
from bridge.db.command_store import AckOutcome
from bridge.db.device_store import Registration, Transport
from bridge.db.presence_store import PresenceItem
from bridge.http.bodies import (
    AckResponse,
    AckResult,
    HeartbeatBody,
    HeartbeatData,
    HeartbeatResponse,
    MqttDetails,
    MqttTopics,
    PendingCommand,
    RegisterBody,
    RegisterResponse,
)
from bridge.http.context import HttpContext
from bridge.http.deps import ClientAddress, Ctx, DeviceToken, RegistrationSecret
from bridge.http.errors import ApiError, MalformedBody
from bridge.http.feed import online_event
from bridge.http.responses import errors
from bridge.http.telemetry import status_for, telemetry
from schemas import Ack, AckState, TopicKind, device_topic
from schemas.topics import bridge_instances_filter

if TYPE_CHECKING:
    from bridge.settings import Settings

router = APIRouter(tags=["devices"])

#: MQTT settings handed to a kiosk switching over (docs/CONTRACT.md, "Connecting").
KEEPALIVE_S = 30
SESSION_EXPIRY_S = 86_400


class AckBody(Ack):
    """The contract's ``Ack``, lax about JSON types like the other legacy bodies."""

    model_config = {"strict": False, "frozen": True, "extra": "ignore"}


async def heartbeat_body(request: Request) -> dict[str, Any] | None:
    """The heartbeat's JSON object (``None`` when empty); anything else is a 400. Read
    by hand rather than as a model: one wrong-typed metric must not fail the others,
    as a 422 would, so that an old APK with a bad sensor still gets its 200."""
    raw = await request.body()
    if not raw.strip():
        return None
    try:
        parsed = json.loads(raw)
    except (ValueError, RecursionError):
        raise MalformedBody from None
    if parsed is None:
        return None
    if not isinstance(parsed, dict):
        raise MalformedBody
    return parsed


def epoch_ms(value: datetime) -> int:
    return int(value.replace(tzinfo=UTC).timestamp() * 1000)


def broker_takes_device_tokens(settings: Settings) -> bool:
    """Whether a kiosk can connect with its HTTP token as the MQTT password: only when
    the broker is open. The bridge's own connection tells: it connects anonymously to an
    open broker, and the embedded broker is secure unless ``--embedded-open``."""
    address = settings.broker_address
    if address is None:
        return settings.embedded_open
    return address.username is None


def mqtt_details(ctx: HttpContext, device_id: str, token: str) -> MqttDetails:
    prefix = ctx.bridge_settings.prefix
    open_broker = broker_takes_device_tokens(ctx.bridge_settings)
    return MqttDetails(
        url=ctx.settings.mqtt_url or _default_mqtt_url(ctx),
        client_id=device_id,
        username=device_id,
        password=token if open_broker else None,
        credentials="token" if open_broker else "claim",
        keepalive_s=KEEPALIVE_S,
        session_expiry_s=SESSION_EXPIRY_S,
        prefix=prefix,
        topics=MqttTopics(
            presence=device_topic(device_id, TopicKind.PRESENCE, prefix),
            status=device_topic(device_id, TopicKind.STATUS, prefix),
            cmd=device_topic(device_id, TopicKind.CMD, prefix),
            ack=device_topic(device_id, TopicKind.ACK, prefix),
            config=device_topic(device_id, TopicKind.CONFIG, prefix),
            bridge_presence=bridge_instances_filter(prefix),
        ),
    )


_WILDCARD = frozenset({"0.0.0.0", "::", ""})


def _default_mqtt_url(ctx: HttpContext) -> str | None:
    address = ctx.bridge_settings.broker_address
    # A wildcard (an embedded broker on every interface) says nothing a kiosk can use.
    if address is not None:
        return None if address.host in _WILDCARD else address.url  # without credentials
    host, port = ctx.bridge_settings.listen_address
    return None if host in _WILDCARD else f"mqtt://{host}:{port}"


@router.post(
    "/api/devices/register",
    summary="Register a kiosk (or re-register it): a new token and the MQTT details",
    responses=errors(400, 401, 410, 413, 422, 429),
)
async def register(
    ctx: Ctx, address: ClientAddress, _secret: RegistrationSecret, body: RegisterBody
) -> RegisterResponse:
    ctx.limit_registration(address)
    ctx.limit("register", body.device_id)
    request = Registration(
        device_id=body.device_id,
        app_version=body.app_version,
        android_version=body.android_version,
        ip_address=body.ip_address,
        mac_address=body.mac_address,
    )
    done = await ctx.db(ctx.devices.register, request, ctx.clock())
    return RegisterResponse(
        remote_id=done.remote_id,
        token=done.token,
        remote_control_enabled=done.remote_control_enabled,
        websocket_url=ctx.settings.websocket_url,
        mqtt=mqtt_details(ctx, done.device_id, done.token),
    )


@router.post(
    "/api/devices/heartbeat",
    summary="Heartbeat with metrics; answers with pending commands",
    # Today's shape: the optional reconnect fields appear only when they apply.
    response_model_exclude_none=True,
    responses=errors(400, 401, 410, 413, 422, 429),
    # The body is read by hand (see heartbeat_body); the spec still shows its fields.
    openapi_extra={
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": HeartbeatBody.model_json_schema()}},
        }
    },
)
async def heartbeat(ctx: Ctx, token: DeviceToken, request: Request) -> HeartbeatResponse:
    metrics = await heartbeat_body(request)
    ctx.limit("heartbeat", token)
    now = ctx.clock()
    plan = await ctx.db(ctx.devices.plan_heartbeat, token, now)
    device_id = plan.device.device_id
    values, ignored = telemetry(metrics)
    for name in ignored:
        ctx.metrics.ignored_fields.labels(name).inc()
    ingest = ctx.sink
    if plan.transport is Transport.HTTP:
        ctx.managed.add(device_id)
        if plan.announce:
            ingest.put_presence(PresenceItem(online_event(device_id, plan.session, now)))
        # seq: the receive time, which grows from one heartbeat to the next.
        ingest.put_status(device_id, status_for(plan.session, now, now, values), now)
    else:
        ctx.managed.discard(device_id)
        if values:
            await ctx.db(ctx.devices.write_telemetry, plan.device.remote_id, values, now)
    ctx.metrics.heartbeats.labels(plan.transport.value).inc()
    pending = await ctx.db(
        ctx.devices.pending,
        device_id,
        hand_out=plan.transport is Transport.HTTP,
        limit=ctx.settings.pending_max,
        now_ms=now,
    )
    data = HeartbeatData(
        remote_control_enabled=plan.device.remote_control_enabled,
        should_reconnect=pending.reconnect is not None,
        pending_commands=[
            PendingCommand(
                id=c.id,
                type=c.type,
                issued_at=epoch_ms(c.created_at),
                expires_at=epoch_ms(c.expires_at),
                device_id=device_id,
                args=c.args,
            )
            for c in pending.commands
        ],
        ignored_fields=ignored or None,
    )
    if pending.reconnect is not None:
        data.reconnect_delay_seconds = pending.reconnect.delay_s
        data.reconnect_reason = pending.reconnect.reason or "reconnect requested"
    return HeartbeatResponse(data=data)


@router.post(
    "/api/devices/commands/{command_id}/ack",
    summary="Acknowledge a command received in a heartbeat response",
    responses=errors(400, 401, 404, 410, 413, 422, 429),
)
async def ack_command(
    ctx: Ctx,
    token: DeviceToken,
    command_id: Annotated[uuid.UUID, Path(description="The command's id")],
    body: AckBody,
) -> AckResponse:
    ctx.limit("ack", token)
    if body.id != command_id:
        raise ApiError(422, "id_mismatch", "the body's id differs from the command id in the path")
    device = await ctx.db(ctx.devices.authenticate, token)
    ack = Ack(id=body.id, state=AckState(body.state), ts=body.ts, detail=body.detail)
    outcome = await ctx.acks.apply_ack(device.device_id, ack, ctx.clock())
    return AckResponse(data=_ack_result(ctx, outcome))


def _ack_result(ctx: HttpContext, outcome: AckOutcome) -> AckResult:
    if outcome.verdict in ("unknown_command", "wrong_device"):
        # Another device's command reads as unknown: ids are not for probing.
        ctx.metrics.refused.labels(outcome.verdict).inc()
        raise ApiError(404, "unknown_command", f"no command {outcome.command_id} for this device")
    # The dispatcher that applied it counted it, as it counts the acks over MQTT.
    applied = outcome.verdict == "applied"
    state = CommandState(outcome.state).value if outcome.state else None
    return AckResult(command_id=outcome.command_id, state=state, applied=applied)
