"""Presence events of HTTP-only kiosks. They go into ``Ingest.put_presence``, the same
bounded FIFO as MQTT presence, so fencing, grace, flap damping and history all apply.
"""

from __future__ import annotations

from bridge.presence import ConnState, PresenceEvent


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
