"""Tracked refresh commands for the CMS's ``RefreshDisplayJob``, idempotent by key.

With an ``Idempotency-Key`` the command id is derived from the device and the key
(UUID v5), and the command table's primary key makes a second insert fail: the same key
always names the same command, even when two retries race each other or run on two
bridge instances.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError

from bridge.clock import now_ms
from bridge.db.command_store import CommandStore, NewCommand
from bridge.outbox.api import enqueue, validate_args

#: Namespace of refresh ids derived from an Idempotency-Key (fixed: ids must be stable).
REFRESH_NAMESPACE = uuid.UUID("6b1e0f9c-31a5-4c55-9d0b-6a3f1e2c8b71")
REQUESTED_BY = "cms:send_refresh_device"


@dataclass(frozen=True, slots=True)
class RefreshOutcome:
    command_id: str
    state: str
    replayed: bool


def refresh_id(device_id: str, key: str) -> str:
    return str(uuid.uuid5(REFRESH_NAMESPACE, f"{device_id}\n{key}"))


def request_refresh(
    engine: Engine,
    device_id: str,
    *,
    url: str | None,
    ttl_s: float,
    idempotency_key: str | None,
) -> RefreshOutcome:
    args: dict[str, Any] = {"url": url} if url else {}
    if idempotency_key is None:
        [command_id] = enqueue(
            engine, "refresh", [device_id], args, ttl_s=ttl_s, requested_by=REQUESTED_BY
        )
        return RefreshOutcome(command_id, "queued", replayed=False)
    command_id = refresh_id(device_id, idempotency_key)
    store = CommandStore(engine, clock=now_ms)
    try:
        store.enqueue(
            [
                NewCommand(
                    device_id,
                    "refresh",
                    validate_args("refresh", args),
                    ttl_s,
                    requested_by=REQUESTED_BY,
                    id=command_id,
                )
            ]
        )
    except IntegrityError:
        [row] = store.get([command_id])
        return RefreshOutcome(command_id, str(row.state), replayed=True)
    return RefreshOutcome(command_id, "queued", replayed=False)
