"""OpenAPI ``responses`` entries for the structured errors each operation may return."""

from __future__ import annotations

from typing import Any

from bridge.http.bodies import ErrorBody

_WHY = {
    400: "Malformed body: not JSON, or not a JSON object",
    401: "Missing, invalid or revoked credential",
    403: "The CMS API is disabled (no API keys configured)",
    404: "Not found",
    410: "The device is soft-deleted in the CMS",
    413: "Request body too large",
    422: "Invalid request",
    # 429 also answers every request from an address over its failed-authentication
    # budget (code auth_rate_limited), on every endpoint.
    429: "Rate limited; see Retry-After",
    503: "Database or bridge unavailable",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorBody, "description": _WHY[code]} for code in (*codes, 503)}
