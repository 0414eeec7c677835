"""Request dependencies: the shared context, the credentials, the client address."""

from __future__ import annotations

import hmac
import logging
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from bridge.http.clients import scope_client
from bridge.http.context import HttpContext
from bridge.http.errors import ApiError

_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="DeviceToken",
    description="The 64-character token from POST /api/devices/register",
)
_api_key = APIKeyHeader(
    name="X-API-Key",
    auto_error=False,
    scheme_name="ApiKey",
    description="One of the keys in KB_HTTP__API_KEYS",
)


_registration_secret = APIKeyHeader(
    name="X-Registration-Secret",
    auto_error=False,
    scheme_name="RegistrationSecret",
    description="KB_HTTP__REGISTRATION_SECRET, when the bridge is configured with one",
)

log = logging.getLogger(__name__)


def get_ctx(request: Request) -> HttpContext:
    ctx = getattr(request.app.state, "ctx", None)
    if ctx is None:
        # Only an app built for rendering the OpenAPI spec has no bridge behind it.
        raise ApiError(503, "not_running", "the bridge behind this API is not running")
    assert isinstance(ctx, HttpContext)
    return ctx


Ctx = Annotated[HttpContext, Depends(get_ctx)]


def device_token(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> str:
    if credentials is None or not credentials.credentials:
        raise ApiError(
            401,
            "missing_token",
            "send the device token as 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return credentials.credentials


DeviceToken = Annotated[str, Depends(device_token)]


def api_key(ctx: Ctx, key: Annotated[str | None, Security(_api_key)]) -> str:
    keys = ctx.settings.api_key_list
    if not keys:
        raise ApiError(
            403, "api_disabled", "the CMS API is disabled: no KB_HTTP__API_KEYS configured"
        )
    if not key:
        raise ApiError(401, "missing_api_key", "send an API key in the X-API-Key header")
    presented = key.encode("utf-8", "surrogatepass")
    # Compare against every key, so timing does not tell which one nearly matched.
    matched = [hmac.compare_digest(presented, k.encode()) for k in keys]
    if not any(matched):
        raise ApiError(401, "invalid_api_key", "the API key is not valid")
    return key


ApiKey = Annotated[str, Depends(api_key)]


def client_address(request: Request) -> str:
    """The address the request is limited by (resolved by ``limits.FailedAuthLimit``)."""
    return scope_client(request.scope)


ClientAddress = Annotated[str, Depends(client_address)]


def registration_secret(
    ctx: Ctx,
    address: ClientAddress,
    secret: Annotated[str | None, Security(_registration_secret)],
) -> None:
    """With ``KB_HTTP__REGISTRATION_SECRET`` set, registration needs it: missing (in
    ``require`` mode) or wrong is a 401, and so counts as a failed authentication."""
    expected = ctx.settings.registration_secret
    if expected is None:
        return
    if not secret:
        if ctx.settings.registration_secret_mode == "warn":
            ctx.metrics.registrations_without_secret.inc()
            log.warning("registration from %s without X-Registration-Secret accepted", address)
            return
        ctx.metrics.refused.labels("registration_secret_required").inc()
        raise ApiError(
            401,
            "registration_secret_required",
            "send the registration secret in the X-Registration-Secret header",
        )
    presented = secret.encode("utf-8", "surrogatepass")
    if not hmac.compare_digest(presented, expected.get_secret_value().encode()):
        ctx.metrics.refused.labels("invalid_registration_secret").inc()
        raise ApiError(401, "invalid_registration_secret", "the registration secret is not valid")


RegistrationSecret = Annotated[None, Depends(registration_secret)]
