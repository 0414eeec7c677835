"""``devices --watch``: each change of the fleet as it is committed, like ``kubectl get -w``.

It polls the database (no database the bridge supports pushes changes to another
process without extra setup). Presence transitions come from ``kb_presence_history``
by id, so a device that went down and up between two polls shows both steps with the
time each was committed; everything else that the table holds (CMS status, flapping,
the re-provisioning mark, devices added or soft-deleted in the CMS) is found by
comparing two reads of the fleet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import Engine, func, select

from bridge.db.models import PresenceHistory
from bridge.db.tables import table_of
from bridge.ops.fleet import FleetRow, load_fleet
from bridge.ops.timefmt import iso_utc
from bridge.ops.uptime import APPLIED

HIST = table_of(PresenceHistory)

#: The fleet row's fields whose change is printed, with the word shown for each.
WATCHED: Final = (
    ("state", "state"),
    ("legacy_status", "cms"),
    ("flapping", "flapping"),
    ("needs_provisioning", "provisioning"),
)


@dataclass(frozen=True, slots=True)
class Change:
    #: When it was committed (history) or first seen by this poll (other fields).
    at_ms: int
    device_id: str
    #: ``state``, ``cms``, ``flapping``, ``provisioning``, ``added``, ``removed``
    what: str
    old: str | None
    new: str | None
    detail: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "at": iso_utc(self.at_ms),
            "device": self.device_id,
            "what": self.what,
            "old": self.old,
            "new": self.new,
            "detail": self.detail,
        }


def _text(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


class FleetWatch:
    """Two reads apart, what changed. Blocking; one thread at a time."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._rows: dict[str, FleetRow] = {}
        self._last_history_id = 0

    def start(self) -> list[FleetRow]:
        """The fleet now; later :meth:`poll` calls report changes after this read."""
        with self._engine.connect() as conn:
            self._last_history_id = int(conn.execute(select(func.max(HIST.c.id))).scalar() or 0)
        rows = load_fleet(self._engine)
        self._rows = {row.device_id: row for row in rows}
        return rows

    def poll(self, now_ms: int) -> list[Change]:
        """Changes committed since the previous read, oldest first."""
        with self._engine.connect() as conn:
            history = conn.execute(
                select(HIST)
                .where(HIST.c.id > self._last_history_id, HIST.c.verdict.in_(APPLIED))
                .order_by(HIST.c.id)
            ).all()
            newest = conn.execute(select(func.max(HIST.c.id))).scalar()
        rows = {row.device_id: row for row in load_fleet(self._engine)}
        changes = [
            Change(
                int(h.committed_ms),
                h.device_id,
                "state",
                h.prev_state,
                h.state,
                h.reason or (None if h.verdict == "applied" else h.verdict),
            )
            for h in history
        ]
        from_history = {c.device_id for c in changes}
        changes += diff(self._rows, rows, now_ms, skip_state=from_history)
        self._rows = rows
        self._last_history_id = max(self._last_history_id, int(newest or 0))
        return sorted(changes, key=lambda c: c.at_ms)


def diff(
    before: dict[str, FleetRow],
    after: dict[str, FleetRow],
    now_ms: int,
    *,
    skip_state: set[str] | frozenset[str] = frozenset(),
) -> list[Change]:
    """Field changes between two reads; the state of ``skip_state`` devices is already
    reported from the history."""
    out: list[Change] = []
    for device_id in sorted(before.keys() | after.keys()):
        old, new = before.get(device_id), after.get(device_id)
        if old is None and new is not None:
            out.append(Change(now_ms, device_id, "added", None, new.state))
            continue
        if new is None:
            out.append(Change(now_ms, device_id, "removed", _text(old and old.state), None))
            continue
        assert old is not None
        for field_name, what in WATCHED:
            if field_name == "state" and device_id in skip_state:
                continue
            a, b = getattr(old, field_name), getattr(new, field_name)
            if a != b:
                out.append(Change(now_ms, device_id, what, _text(a), _text(b)))
    return out
