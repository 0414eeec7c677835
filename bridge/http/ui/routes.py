"""The fleet page's routes: ``/`` (the page or its login form), its static files, the
login, and the read-only JSON and event stream the page runs on (``/ui/api/*``).

None of these is in the OpenAPI spec: they are the page's, not the CMS's API.
"""

from __future__ import annotations

import html
import logging
from pathlib import Path
from typing import Annotated, Any, Final, Literal
from urllib.parse import parse_qs

from fastapi import APIRouter, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import (
    FileResponse,
    HTMLResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)

from bridge.http.deps import Ctx
from bridge.http.errors import ApiError
from bridge.http.events import KINDS
from bridge.http.routes_cms import _stream as event_stream
from bridge.http.ui import queries
from bridge.http.ui.auth import (
    COOKIE,
    Session,
    make_session,
    matching_key,
    page_keys,
    same_origin_post,
    signed_in,
)
from bridge.ops.errors import NotFound
from bridge.ops.timeline import load_device
from schemas import DEVICE_ID_PATTERN

log = logging.getLogger(__name__)

STATIC: Final = Path(__file__).resolve().parent / "static"
#: The files the page is made of; nothing else under static/ is served.
ASSETS: Final = {
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
#: Only this origin's scripts, styles and connections; never inside another site's frame.
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
MAX_LOGIN_BODY: Final = 4096

router = APIRouter(include_in_schema=False)
DeviceId = Annotated[str, PathParam(pattern=DEVICE_ID_PATTERN)]


def _page(name: str, status: int = 200, **slots: str) -> HTMLResponse:
    text = (STATIC / name).read_text(encoding="utf-8")
    for slot, value in slots.items():
        text = text.replace("{{" + slot + "}}", html.escape(value))
    return HTMLResponse(text, status_code=status, headers=SECURITY_HEADERS)


def _login_page(status: int = 200, message: str = "") -> HTMLResponse:
    return _page("login.html", status, message=message)


@router.get("/")
async def index(request: Request, ctx: Ctx) -> HTMLResponse:
    """The page when signed in, else the login form; neither holds device data."""
    if signed_in(request, page_keys(ctx), ctx.settings.ui_session_s):
        return _page("index.html")
    if not page_keys(ctx):
        return _login_page(
            503, "The fleet page is off: set KB_HTTP__UI_KEYS (or KB_HTTP__API_KEYS)."
        )
    return _login_page()


@router.post("/ui/login")
async def login(request: Request, ctx: Ctx) -> Response:
    if not same_origin_post(request):
        log.warning("fleet page login refused: cross-site POST")
        return _login_page(403, "Refused: the login must come from this page.")
    if not request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        return _login_page(415, "Send the form.")
    body = await request.body()
    if len(body) > MAX_LOGIN_BODY:
        return _login_page(413, "Too long.")
    form = parse_qs(body.decode("utf-8", "replace"), max_num_fields=4)
    key = (form.get("key") or [""])[0].strip()
    keys = page_keys(ctx)
    if not key or not keys or not matching_key(key, keys):
        # A 401, so the failed-authentication limit per address counts it.
        return _login_page(401, "That key is not valid.")
    response = RedirectResponse("/", status_code=303, headers=SECURITY_HEADERS)
    response.set_cookie(
        COOKIE,
        make_session(key),
        max_age=int(ctx.settings.ui_session_s),
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


@router.post("/ui/logout")
async def logout(request: Request) -> Response:
    if not same_origin_post(request):
        return _login_page(403, "Refused: the logout must come from this page.")
    response = RedirectResponse("/", status_code=303, headers=SECURITY_HEADERS)
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
    return response


@router.get("/ui/static/{name}")
async def asset(name: str) -> FileResponse:
    media = ASSETS.get(name)
    if media is None:
        raise ApiError(404, "not_found", "no such file")
    return FileResponse(
        STATIC / name,
        media_type=media,
        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
    )


@router.get("/ui/api/fleet")
async def fleet(ctx: Ctx, _s: Session, response: Response) -> dict[str, Any]:
    response.headers.update(SECURITY_HEADERS)
    rows = await ctx.db(queries.fleet, ctx.read_engine)
    return {"now_ms": ctx.clock(), "columns": list(queries.FLEET_COLUMNS), "rows": rows}


@router.get("/ui/api/uptime")
async def uptime(ctx: Ctx, _s: Session, response: Response) -> dict[str, Any]:
    response.headers.update(SECURITY_HEADERS)
    now = ctx.clock()
    start = now - queries.DAY_MS
    bars = await ctx.db(queries.uptime_bars, ctx.read_engine, start, now)
    return {"start_ms": start, "end_ms": now, "bars": bars}


@router.get("/ui/api/devices/{device_id}")
async def device(ctx: Ctx, _s: Session, device_id: DeviceId, response: Response) -> dict[str, Any]:
    response.headers.update(SECURITY_HEADERS)
    now = ctx.clock()
    engine = ctx.read_engine
    try:
        report = await ctx.db(load_device, engine, device_id, now, commands_limit=20)
    except NotFound:
        raise ApiError(404, "unknown_device", f"no device {device_id}") from None
    bars = await ctx.db(queries.uptime_bars, engine, now - queries.DAY_MS, now, [device_id])
    c, r = report.connectivity, report.remote
    return {
        "device_id": device_id,
        "now_ms": now,
        "state": report.state,
        "why": report.why,
        "connectivity": None
        if c is None
        else {
            "state": c.state,
            "since_ms": c.since_ms,
            "reason": c.reason,
            "session": c.session,
            "flapping": c.flapping,
            "transitions": c.transitions,
            "last_status_ms": c.last_status_ms,
        },
        "remote": None
        if r is None
        else {
            "name": r.name,
            "status": r.status,
            "last_seen_ms": r.last_seen_ms,
            "app_version": r.app_version,
            "android_version": r.android_version,
            "ip_address": r.ip_address,
            "battery": r.battery,
            "wifi": r.wifi,
        },
        "timeline": [entry.to_json() for entry in reversed(report.timeline)],
        "commands": [
            {**cmd.to_json(), "created_ms": cmd.created_ms} for cmd in reversed(report.commands)
        ],
        "uptime": {name: a.to_json() for name, a in report.uptime.items()},
        "bar": {
            "start_ms": now - queries.DAY_MS,
            "end_ms": now,
            "segments": bars.get(device_id, [[now - queries.DAY_MS, queries.UNKNOWN_CODE]]),
        },
    }


@router.get("/ui/api/commands")
async def commands(
    ctx: Ctx,
    _s: Session,
    response: Response,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
    device: Annotated[str | None, Query(pattern=DEVICE_ID_PATTERN)] = None,
    state: Annotated[str | None, Query(pattern=r"^[a-z]{1,16}$")] = None,
) -> dict[str, Any]:
    response.headers.update(SECURITY_HEADERS)
    now = ctx.clock()
    data = await ctx.db(
        queries.commands, ctx.read_engine, now, limit=limit, device_id=device, state=state
    )
    return {"now_ms": now, **data}


@router.get("/ui/api/status")
async def status(ctx: Ctx, _s: Session, response: Response) -> dict[str, Any]:
    """The stale-truth banner's source: ``stale`` is the bridges' own liveness (a writer's
    heartbeat in kb_bridges, this bridge's broker link), with ``message`` saying since
    when; the newest write to the tables comes along as a detail."""
    response.headers.update(SECURITY_HEADERS)
    now = ctx.clock()
    fresh = await ctx.db(queries.freshness, ctx.read_engine, now)
    live = ctx.liveness()
    return {
        "now_ms": now,
        **fresh.to_json(),
        "stale": not live.live,
        "message": live.warning() or "",
    }


@router.get("/ui/api/events")
async def events(
    ctx: Ctx,
    _s: Session,
    types: Literal["presence", "command"] | None = None,
) -> StreamingResponse:
    """The CMS API's event stream (the same hub), for a signed-in page."""
    kinds = frozenset({types}) if types else KINDS
    return StreamingResponse(
        event_stream(ctx, kinds),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
