"""``GET /send_refresh_device``: what the CMS's refresh job calls, now tracked."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query

from bridge.http.bodies import RefreshAccepted, RefreshResponse
from bridge.http.deps import Ctx
from bridge.http.errors import ApiError
from bridge.http.refresh import request_refresh
from bridge.http.responses import errors
from bridge.outbox.api import CommandRequestError

router = APIRouter(tags=["cms-legacy"])


@router.get(
    "/send_refresh_device",
    status_code=202,
    summary="Queue a tracked refresh for the device holding this token",
    responses=errors(401, 410, 422, 429),
)
async def send_refresh_device(
    ctx: Ctx,
    token: Annotated[str, Query(min_length=1, max_length=512, description="The device token")],
    url: Annotated[
        str | None,
        Query(max_length=2048, pattern=r"^[^\x00]*$", description="Reload from this URL"),
    ] = None,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=255,
            description="Same key, same command: a retried job never refreshes twice",
        ),
    ] = None,
) -> RefreshResponse:
    ctx.limit("refresh", token)
    device = await ctx.db(ctx.devices.authenticate, token)
    try:
        outcome = await ctx.db(
            request_refresh,
            ctx.engine,
            device.device_id,
            url=url,
            ttl_s=ctx.settings.refresh_ttl_s,
            idempotency_key=idempotency_key,
        )
    except CommandRequestError as exc:
        raise ApiError(422, "invalid_command", str(exc)) from None
    ctx.outbox.poke()
    return RefreshResponse(
        data=RefreshAccepted(
            command_id=outcome.command_id,
            device_id=device.device_id,
            state=outcome.state,
            replayed=outcome.replayed,
        )
    )
