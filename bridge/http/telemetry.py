"""A legacy heartbeat's metrics as the contract's ``Status`` fields.

The contract's ranges are checked by the ``Status`` model itself; a value outside them
is left out (and named back to the kiosk) instead of failing the whole heartbeat.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from bridge.http.bodies import HeartbeatBody
from schemas import Status

_PLACEHOLDER = {"session": 1, "seq": 0, "ts": 0}


def telemetry(body: HeartbeatBody | None) -> tuple[dict[str, Any], list[str]]:
    """``(valid metric values, names of ignored fields)``."""
    values = body.model_dump(exclude_none=True) if body is not None else {}
    ignored: list[str] = []
    while values:
        try:
            Status.model_validate({**_PLACEHOLDER, **values})
        except ValidationError as exc:
            bad = {str(err["loc"][0]) for err in exc.errors(include_url=False) if err["loc"]}
            bad &= set(values)
            if not bad:
                raise
            for name in sorted(bad):
                ignored.append(name)
                del values[name]
            continue
        break
    return values, ignored


def status_for(session: int, seq: int, ts: int, values: dict[str, Any]) -> Status:
    return Status(session=session, seq=seq, ts=ts, **values)
