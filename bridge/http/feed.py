"""Handing HTTP heartbeats to the bridge's ingestion, exactly where MQTT traffic goes.

Presence events join the same bounded FIFO (so fencing, grace, flap damping and history
all apply) and telemetry the same per-device coalescing buffer.
"""

from __future__ import annotations

import logging

from bridge.db.presence_store import PresenceItem
from bridge.presence import ConnState, PresenceEvent
from bridge.service.ingest import Ingest
from schemas import Status

log = logging.getLogger(__name__)


def put_presence(ingest: Ingest, event: PresenceEvent) -> bool:
    """Queue one presence event; ``False`` when the buffer is full (dropped, counted)."""
    return ingest.put_presence(PresenceItem(event))


def put_status(ingest: Ingest, device_id: str, status: Status, received_ms: int) -> None:
    """Queue telemetry under the same coalescing rule as an MQTT ``status``."""
    ingest.put_status(device_id, status, received_ms)


def online_event(device_id: str, session: int, received_ms: int) -> PresenceEvent:
    return PresenceEvent(
        device_id=device_id, state=ConnState.ONLINE, session=session, received_ms=received_ms
    )


#: ``kb_connectivity.reason`` of a device the sweeper declared lost.
HTTP_TIMEOUT_REASON = "http_timeout"


def lost_event(device_id: str, session: int, received_ms: int) -> PresenceEvent:
    return PresenceEvent(
        device_id=device_id,
        state=ConnState.LOST,
        session=session,
        received_ms=received_ms,
        reason=HTTP_TIMEOUT_REASON,
    )
