"""Structured JSON errors: ``{"success": false, "error": {"code", "message"}}``, always.

Every path out of the app that is not a success goes through here, so a client never
sees a stack trace or an HTML page, whatever failed.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from bridge.http.limits import retry_after_header

log = logging.getLogger(__name__)

_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    408: "request_timeout",
    409: "conflict",
    410: "gone",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "too_many_requests",
    503: "unavailable",
}
#: Shown instead of a pydantic error's free text, which may quote the input at length.
_MAX_MESSAGE = 300


class ApiError(Exception):
    """An error answer: status, a stable machine ``code`` and words for a person."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        details: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.details = details


def error_body(
    code: str, message: str, details: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message[:_MAX_MESSAGE]}
    if details:
        error["details"] = details
    return {"success": False, "error": error}


def error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(
        error_body(exc.code, exc.message, exc.details), status_code=exc.status, headers=exc.headers
    )


def raw_error(
    status: int, code: str, message: str, *, close: bool, headers: dict[str, str] | None = None
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """A structured error as raw ASGI parts, for middleware answering before the app."""
    body = json.dumps(error_body(code, message)).encode()
    raw = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    if close:
        raw.append((b"connection", b"close"))
    return status, raw, body


def too_large(limit: int) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """The raw 413 the body-size middleware sends before the app runs."""
    return raw_error(
        413, "payload_too_large", f"request body is over the {limit}-byte limit", close=True
    )


def too_slow(timeout_s: float) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """The raw 408 for a body that did not arrive in time; the connection is closed."""
    return raw_error(
        408,
        "request_timeout",
        f"the request body did not arrive within {timeout_s:g} s",
        close=True,
    )


def auth_blocked(wait_s: float) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """The raw 429 for an address over its failed-authentication budget."""
    return raw_error(
        429,
        "auth_rate_limited",
        "too many failed authentications from this address; retry after Retry-After",
        close=False,
        headers={"Retry-After": retry_after_header(wait_s)},
    )


class MalformedBody(Exception):
    """The body is not JSON, or not a JSON object: 400, not a field-by-field 422."""


#: Validation errors about the body as a whole (not one of its fields): a malformed body.
_NOT_AN_OBJECT = {"model_attributes_type", "dict_type", "model_type"}


def _malformed(exc: RequestValidationError) -> bool:
    for err in exc.errors():
        loc = tuple(err.get("loc", ()))
        if loc[:1] == ("body",) and err.get("type") == "json_invalid":  # loc: body, offset
            return True
        if loc == ("body",) and err.get("type") in _NOT_AN_OBJECT:
            return True
    return False


def malformed_response() -> JSONResponse:
    return error_response(ApiError(400, "malformed_body", "the request body must be a JSON object"))


def _validation_details(exc: RequestValidationError) -> list[dict[str, Any]]:
    details = []
    for err in exc.errors()[:10]:
        details.append(
            {
                "field": ".".join(str(part) for part in err.get("loc", ())),
                "message": str(err.get("msg", ""))[:_MAX_MESSAGE],
                "type": str(err.get("type", "")),
            }
        )
    return details


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return error_response(exc)

    async def on_validation(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        if _malformed(exc):
            return malformed_response()
        details = _validation_details(exc)
        first = details[0] if details else {"field": "", "message": "invalid request"}
        where = first["field"] or "request"
        return error_response(
            ApiError(422, "invalid_request", f"{where}: {first['message']}", details=details)
        )

    async def on_http(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = _STATUS_CODES.get(exc.status_code, "error")
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        return error_response(
            ApiError(exc.status_code, code, message, headers=dict(exc.headers or {}))
        )

    async def on_database(request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, OperationalError):
            log.error(
                "database unavailable during %s %s: %s",
                request.method,
                request.url.path,
                str(exc).splitlines()[0][:200],
            )
            return error_response(
                ApiError(
                    503,
                    "database_unavailable",
                    "the database is not answering; try again shortly",
                    headers={"Retry-After": "5"},
                )
            )
        return await on_unexpected(request, exc)

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, ClientDisconnect):
            # The client went away, or its body was too slow (``limits.BodyTimeout``
            # answered it already): nobody is left to read this.
            return error_response(ApiError(400, "client_disconnected", "client disconnected"))
        log.error(
            "unhandled error in %s %s: %r", request.method, request.url.path, exc, exc_info=exc
        )
        return error_response(ApiError(500, "internal_error", "internal error; see bridge logs"))

    async def on_malformed(_request: Request, _exc: Exception) -> JSONResponse:
        return malformed_response()

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(MalformedBody, on_malformed)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(SQLAlchemyError, on_database)
    app.add_exception_handler(Exception, on_unexpected)
