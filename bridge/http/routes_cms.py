"""The CMS API (``/api/v2``, API key): devices, commands and a live event stream."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query
from fastapi.responses import StreamingResponse

from bridge.http.bodies import (
    CommandRef,
    CommandRequest,
    CommandResponse,
    CommandsAccepted,
    CommandsResponse,
    CommandView,
    DeviceDetail,
    DeviceDetailResponse,
    DeviceList,
    DeviceListResponse,
    DeviceSummary,
    Liveness,
)
from bridge.http.context import HttpContext
from bridge.http.deps import ApiKey, Ctx
from bridge.http.errors import ApiError
from bridge.http.events import KINDS, Event, Subscription, liveness_data
from bridge.http.responses import errors
from bridge.outbox.api import CommandRequestError, Targets, enqueue, resolve_targets
from bridge.service.ports import StatesLiveness
from schemas import DEVICE_ID_PATTERN

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api/v2", tags=["cms"])

#: A comment line this often keeps proxies from closing an idle stream.
KEEPALIVE_S = 15.0
#: How often a stream looks whether the states turned stale or live again.
_LIVENESS_CHECK_S = 1.0
#: Longest wait for the command poller before the stream starts anyway.
_CATCH_UP_S = 5.0
DeviceId = Annotated[str, Path(pattern=DEVICE_ID_PATTERN, description="The device id")]


@router.get(
    "/devices", summary="Devices with their connectivity", responses=errors(401, 403, 422, 429)
)
async def list_devices(
    ctx: Ctx,
    _key: ApiKey,
    state: Literal["online", "offline", "lost", "unknown"] | None = None,
    transport: Literal["mqtt", "http", "none"] | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after: Annotated[
        str | None,
        Query(max_length=191, pattern=r"^[^\x00]*$", description="Device id to continue after"),
    ] = None,
) -> DeviceListResponse:
    page, next_after = await ctx.db(
        ctx.cms.list_devices, limit=limit, after=after, state=state, transport=transport
    )
    return DeviceListResponse(
        data=DeviceList(
            devices=[DeviceSummary.model_validate(d) for d in page], next_after=next_after
        ),
        liveness=_liveness(ctx),
    )


@router.get(
    "/devices/{device_id}",
    summary="One device: connectivity, history, uptime, recent commands",
    responses=errors(401, 403, 404, 410, 422, 429),
)
async def get_device(
    ctx: Ctx,
    _key: ApiKey,
    device_id: DeviceId,
    history_limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> DeviceDetailResponse:
    detail, deleted = await ctx.db(
        ctx.cms.device, device_id, now_ms=ctx.clock(), history_limit=history_limit
    )
    if deleted:
        raise ApiError(410, "device_deleted", f"device {device_id} was deleted")
    if detail is None:
        raise ApiError(404, "unknown_device", f"no device {device_id}")
    return DeviceDetailResponse(data=DeviceDetail.model_validate(detail), liveness=_liveness(ctx))


def _liveness(ctx: HttpContext) -> Liveness:
    return Liveness.model_validate(liveness_data(ctx.liveness()))


@router.post(
    "/commands",
    status_code=202,
    summary="Queue a command for one or many devices",
    responses=errors(400, 401, 403, 413, 422, 429),
)
async def create_commands(ctx: Ctx, _key: ApiKey, body: CommandRequest) -> CommandsResponse:
    devices = list(dict.fromkeys(body.device_ids))
    try:
        await ctx.db(resolve_targets, ctx.engine, Targets(devices=tuple(devices)))
        ids = await ctx.db(
            enqueue,
            ctx.engine,
            body.type,
            devices,
            body.args,
            ttl_s=body.ttl_s,
            requested_by=body.requested_by or "cms-api",
            reason=body.reason,
        )
    except CommandRequestError as exc:
        raise ApiError(422, "invalid_command", str(exc)) from None
    ctx.outbox.poke()
    return CommandsResponse(
        data=CommandsAccepted(
            commands=[
                CommandRef(id=cid, device_id=device)
                for cid, device in zip(ids, devices, strict=True)
            ]
        )
    )


@router.get(
    "/commands/{command_id}",
    summary="One command's state",
    responses=errors(401, 403, 404, 422, 429),
)
async def get_command(
    ctx: Ctx, _key: ApiKey, command_id: Annotated[uuid.UUID, Path()]
) -> CommandResponse:
    view = await ctx.db(ctx.cms.command, str(command_id))
    if view is None:
        raise ApiError(404, "unknown_command", f"no command {command_id}")
    return CommandResponse(data=CommandView.model_validate(view))


@router.get(
    "/events",
    summary="Server-sent events: presence transitions and command updates",
    description=(
        "A `text/event-stream`. It starts with the comment `: connected` and a `liveness` "
        "event; every change after that line is sent. Events: `presence` (a committed "
        "transition), `command` (a state change) and `liveness` (the states turned stale "
        "or live again: `states_live`, `last_writer`, `warning`). A comment every 15 s "
        "keeps the stream alive. A "
        "client that falls behind gets `overflow` and the stream ends: reconnect and "
        "re-read the devices."
    ),
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}},
        **errors(401, 403, 422, 429),
    },
)
async def events(
    ctx: Ctx,
    _key: ApiKey,
    types: Annotated[
        str | None,
        Query(
            pattern=r"^(presence|command|liveness)(,(presence|command|liveness))*$",
            description="Comma-separated: presence, command, liveness (default all)",
        ),
    ] = None,
) -> StreamingResponse:
    kinds = frozenset(types.split(",")) if types else KINDS
    return StreamingResponse(
        _stream(ctx, kinds),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _stream(ctx: HttpContext, kinds: frozenset[str]) -> AsyncIterator[bytes]:
    async with ctx.hub.subscribe(kinds) as sub:
        if "command" in kinds:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_CATCH_UP_S):
                    await ctx.poller.caught_up()
        yield b": connected\n\n"
        liveness = ctx.liveness if "liveness" in kinds else None
        async for chunk in _events(sub, liveness):
            yield chunk


async def _events(
    sub: Subscription, liveness: Callable[[], StatesLiveness] | None
) -> AsyncIterator[bytes]:
    """The subscription's events; with ``liveness``, first the current liveness and then
    each change of it as this stream last told it (looked at every second)."""
    told: bool | None = None
    quiet_since = time.monotonic()
    while True:
        if liveness is not None:
            current = liveness()
            if current.live != told:
                told = current.live
                yield Event(0, "liveness", liveness_data(current)).encode()
        try:
            async with asyncio.timeout(_LIVENESS_CHECK_S if liveness else KEEPALIVE_S):
                event = await sub.queue.get()
        except TimeoutError:
            if time.monotonic() - quiet_since >= KEEPALIVE_S:
                quiet_since = time.monotonic()
                yield b": keepalive\n\n"
            continue
        if event is None:
            return
        quiet_since = time.monotonic()
        yield event.encode()
        if sub.overflowed and sub.queue.empty():
            yield b'event: overflow\ndata: {"reason":"client too slow"}\n\n'
            return
