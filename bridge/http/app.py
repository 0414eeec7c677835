"""The ASGI app: routers, structured errors, the body size limit."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from bridge.http import routes_cms, routes_devices, routes_legacy
from bridge.http.context import HttpContext
from bridge.http.device_store import AuthFailure, DeviceGone
from bridge.http.errors import ApiError, error_response, install_error_handlers, too_large
from bridge.http.limits import BodySizeLimit
from bridge.http.settings import HttpSettings

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
    limit = (settings or (ctx.settings if ctx else HttpSettings())).http_max_body_bytes
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
    app.add_middleware(BodySizeLimit, limit=limit, respond=too_large)
    return app
