"""Blocking reads behind the CMS API: device lists and details, commands by id."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, and_, case, literal, select

from bridge.db.models import CommandRecord, Connectivity, HttpDevice, PresenceHistory, Remote
from bridge.db.status_store import METRICS
from bridge.db.tables import table_of
from bridge.presence.uptime import Change, uptime

REMOTES = table_of(Remote)
CONN = table_of(Connectivity)
HTTP = table_of(HttpDevice)
HIST = table_of(PresenceHistory)
CMD = table_of(CommandRecord)

_APPLIED = ("applied", "reset")
DAY_MS = 86_400_000
UPTIME_WINDOWS = {"24h": DAY_MS, "7d": 7 * DAY_MS}


def iso(value: datetime | None) -> str | None:
    """Stored naive UTC as ISO 8601 with an explicit ``Z``."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC).isoformat().replace("+00:00", "Z")


_transport = case(
    (and_(HTTP.c.session > 0, CONN.c.session == HTTP.c.session), literal("http")),
    (CONN.c.session > 0, literal("mqtt")),
    else_=literal("none"),
)


def _device_query() -> Any:
    return select(
        REMOTES.c.id,
        REMOTES.c.device_identifier,
        REMOTES.c.name,
        REMOTES.c.status,
        REMOTES.c.last_seen_at,
        REMOTES.c.remote_control_enabled,
        REMOTES.c.app_version,
        REMOTES.c.android_version,
        REMOTES.c.ip_address,
        REMOTES.c.mac_address,
        REMOTES.c.deleted_at,
        *(REMOTES.c[name] for name in METRICS),
        CONN.c.state,
        CONN.c.session,
        CONN.c.since_ms,
        CONN.c.reason,
        CONN.c.flapping,
        CONN.c.last_status_ms,
        CONN.c.config_version,
        CONN.c.needs_provisioning,
        _transport.label("transport"),
    ).select_from(
        REMOTES.outerjoin(CONN, CONN.c.device_id == REMOTES.c.device_identifier).outerjoin(
            HTTP, HTTP.c.device_id == REMOTES.c.device_identifier
        )
    )


def _summary(row: Any) -> dict[str, Any]:
    return {
        "device_id": row.device_identifier,
        "remote_id": int(row.id),
        "name": row.name,
        "status": row.status,
        "state": row.state or "unknown",
        "transport": row.transport,
        "session": int(row.session) if row.session is not None else None,
        "since_ms": int(row.since_ms) if row.since_ms is not None else None,
        "reason": row.reason,
        "flapping": bool(row.flapping) if row.flapping is not None else False,
        "last_seen_at": iso(row.last_seen_at),
        "last_status_ms": int(row.last_status_ms) if row.last_status_ms is not None else None,
        "remote_control_enabled": bool(row.remote_control_enabled),
        "app_version": row.app_version,
        "config_version": int(row.config_version) if row.config_version is not None else None,
        "needs_provisioning": bool(row.needs_provisioning or False),
    }


class CmsStore:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def list_devices(
        self,
        *,
        limit: int,
        after: str | None = None,
        state: str | None = None,
        transport: str | None = None,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Live devices ordered by id, keyset-paginated: ``(page, next_after)``."""
        stmt = _device_query().where(REMOTES.c.deleted_at.is_(None))
        if after is not None:
            stmt = stmt.where(REMOTES.c.device_identifier > after)
        if state == "unknown":
            stmt = stmt.where((CONN.c.state.is_(None)) | (CONN.c.state == "unknown"))
        elif state is not None:
            stmt = stmt.where(CONN.c.state == state)
        if transport is not None:
            stmt = stmt.where(_transport == transport)
        stmt = stmt.order_by(REMOTES.c.device_identifier).limit(limit + 1)
        with self._engine.connect() as conn:
            rows = conn.execute(stmt).all()
        page = [_summary(row) for row in rows[:limit]]
        next_after = page[-1]["device_id"] if len(rows) > limit else None
        return page, next_after

    def device(
        self, device_id: str, *, now_ms: int, history_limit: int
    ) -> tuple[dict[str, Any] | None, bool]:
        """``(detail, deleted)``; ``(None, False)`` for an unknown device."""
        with self._engine.connect() as conn:
            row = conn.execute(
                _device_query().where(REMOTES.c.device_identifier == device_id)
            ).first()
            if row is None:
                return None, False
            if row.deleted_at is not None:
                return None, True
            history = conn.execute(
                select(HIST)
                .where(HIST.c.device_id == device_id)
                .order_by(HIST.c.id.desc())
                .limit(history_limit)
            ).all()
            changes = self._changes(conn, device_id, now_ms - max(UPTIME_WINDOWS.values()))
            commands = conn.execute(
                select(CMD)
                .where(CMD.c.device_id == device_id)
                .order_by(CMD.c.created_at.desc())
                .limit(20)
            ).all()
        detail = _summary(row)
        detail["telemetry"] = {name: row._mapping[name] for name in METRICS}
        detail["metadata"] = {
            "android_version": row.android_version,
            "ip_address": row.ip_address,
            "mac_address": row.mac_address,
        }
        detail["history"] = [
            {
                "state": h.state,
                "prev_state": h.prev_state,
                "session": int(h.session),
                "reason": h.reason,
                "verdict": h.verdict,
                "received_ms": int(h.received_ms),
                "committed_ms": int(h.committed_ms),
            }
            for h in history
        ]
        if row.state == "unknown" and row.since_ms is not None:
            changes.append(Change(int(row.since_ms), "unknown"))
            changes.sort(key=lambda c: c.at_ms)
        detail["uptime"] = {
            name: _uptime_json(changes, now_ms - span, now_ms)
            for name, span in UPTIME_WINDOWS.items()
        }
        detail["recent_commands"] = [command_json(c) for c in commands]
        return detail, False

    def _changes(self, conn: Any, device_id: str, since_ms: int) -> list[Change]:
        applied = and_(HIST.c.device_id == device_id, HIST.c.verdict.in_(_APPLIED))
        before = conn.execute(
            select(HIST.c.state, HIST.c.received_ms)
            .where(applied, HIST.c.received_ms < since_ms)
            .order_by(HIST.c.received_ms.desc(), HIST.c.id.desc())
            .limit(1)
        ).first()
        inside = conn.execute(
            select(HIST.c.state, HIST.c.received_ms)
            .where(applied, HIST.c.received_ms >= since_ms)
            .order_by(HIST.c.received_ms, HIST.c.id)
        ).all()
        rows = ([before] if before is not None else []) + list(inside)
        return [Change(int(r.received_ms), r.state) for r in rows]

    def command(self, command_id: str) -> dict[str, Any] | None:
        with self._engine.connect() as conn:
            row = conn.execute(select(CMD).where(CMD.c.id == command_id)).first()
        return command_json(row) if row is not None else None


def _uptime_json(changes: list[Change], start_ms: int, end_ms: int) -> dict[str, Any]:
    result = uptime(changes, start_ms, end_ms)
    return {
        "window_ms": result.window_ms,
        "online_ms": result.online_ms,
        "known_ms": result.known_ms,
        "percent": result.percent,
    }


def command_json(row: Any) -> dict[str, Any]:
    try:
        args = json.loads(row.args or "{}")
    except ValueError:
        args = {}
    return {
        "id": row.id,
        "device_id": row.device_id,
        "type": row.type,
        "args": args if isinstance(args, dict) else {},
        "state": row.state,
        "created_at": iso(row.created_at),
        "sent_at": iso(row.sent_at),
        "delivered_at": iso(row.delivered_at),
        "acked_at": iso(row.acked_at),
        "finished_at": iso(row.finished_at),
        "expires_at": iso(row.expires_at),
        "attempts": int(row.attempts),
        "last_error": row.last_error,
        "requested_by": row.requested_by,
        "reason": row.reason,
        "detail": row.detail,
    }
