"""The ASGI app: routers, structured errors, the body size limit."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from bridge.db.device_store import AuthFailure, DeviceGone
from bridge.http import routes_cms, routes_devices, routes_legacy
from bridge.http.context import AUTH_FAILURES, HttpContext
from bridge.http.errors import (
    ApiError,
    auth_blocked,
    error_response,
    install_error_handlers,
    too_large,
    too_slow,
)
from bridge.http.limits import BodySizeLimit, BodyTimeout, FailedAuthLimit
from bridge.http.settings import HttpSettings
from bridge.http.ui import router as ui_router

TITLE = "kiosk-bridge HTTP API"
#: Version of this HTTP API (not of the package), so the committed spec does not drift
#: with every release.
API_VERSION = "1.0.0"
DESCRIPTION = (
    "Legacy kiosk endpoints (same paths and shapes as the CMS's) and the CMS API under "
    "/api/v2, served by the bridge on the same tables as its MQTT side. Every error is "
    '`{"success": false, "error": {"code": ..., "message": ...}}`.'
)


def create_app(ctx: HttpContext | None, settings: HttpSettings | None = None) -> FastAPI:
    """The app; ``ctx`` is ``None`` only to render the OpenAPI spec."""
    settings = settings or (ctx.settings if ctx else HttpSettings())
    app = FastAPI(
        title=TITLE,
        version=API_VERSION,
        description=DESCRIPTION,
        docs_url=None,
        redoc_url=None,
    )
    app.state.ctx = ctx
    app.include_router(routes_devices.router)
    app.include_router(routes_legacy.router)
    app.include_router(routes_cms.router)
    app.include_router(ui_router)  # the fleet page at / (issue 21)
    install_error_handlers(app)

    async def on_auth(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, AuthFailure)
        if ctx is not None:
            ctx.metrics.refused.labels(exc.reason).inc()
        return error_response(
            ApiError(401, exc.reason, str(exc), headers={"WWW-Authenticate": "Bearer"})
        )

    async def on_gone(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, DeviceGone)
        if ctx is not None:
            ctx.metrics.refused.labels("device_deleted").inc()
        return error_response(ApiError(410, "device_deleted", str(exc)))

    app.add_exception_handler(AuthFailure, on_auth)
    app.add_exception_handler(DeviceGone, on_gone)
    # The last added runs first: the failed-authentication block, then the body's time
    # and size limits, then the app.
    app.add_middleware(BodySizeLimit, limit=settings.max_body_bytes, respond=too_large)
    app.add_middleware(
        BodyTimeout,
        timeout_s=settings.body_timeout_s,
        respond=too_slow,
        on_cut=(lambda: ctx.metrics.slow_clients.labels("body").inc()) if ctx else lambda: None,
    )
    if ctx is not None:
        refused = ctx.metrics.refused
        app.add_middleware(
            FailedAuthLimit,
            limiter=ctx.limiters[AUTH_FAILURES],
            proxies=settings.trusted_proxy_networks,
            respond=auth_blocked,
            on_limited=lambda: refused.labels("auth_rate_limited").inc(),
        )
    return app
