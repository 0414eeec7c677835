"""Availability from ``kb_presence_history``: online vs announced offline vs lost time.

:func:`availability` is pure: it walks the applied transitions of one device over a
window. Time before the first known transition, and time after reconciliation found no
retained presence, is *unknown* and left out of the availability ratio.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from sqlalchemy import Engine, func, select

from bridge.db.models import Connectivity, PresenceHistory, Remote
from bridge.db.tables import table_of

HIST = table_of(PresenceHistory)
CONN = table_of(Connectivity)
REMOTES = table_of(Remote)

#: History verdicts that changed the stored state.
APPLIED: Final = ("applied", "reset")
ONLINE: Final = "online"
OFFLINE: Final = "offline"
LOST: Final = "lost"
UNKNOWN: Final = "unknown"


@dataclass(frozen=True, slots=True)
class Transition:
    at_ms: int
    state: str
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class Availability:
    start_ms: int
    end_ms: int
    online_ms: int = 0
    #: Offline with a reason the device announced (reboot, app_update, ...).
    announced_ms: int = 0
    #: The broker published the Last Will: the connection died.
    lost_ms: int = 0
    unknown_ms: int = 0
    announced_by_reason: dict[str, int] = field(default_factory=dict)
    #: Transitions inside the window.
    transitions: int = 0

    @property
    def window_ms(self) -> int:
        return self.end_ms - self.start_ms

    @property
    def known_ms(self) -> int:
        return self.window_ms - self.unknown_ms

    @property
    def ratio(self) -> float | None:
        """Online share of the known time; ``None`` when nothing is known."""
        return self.online_ms / self.known_ms if self.known_ms > 0 else None

    @property
    def percent(self) -> float | None:
        ratio = self.ratio
        return None if ratio is None else 100.0 * ratio

    def to_json(self) -> dict[str, Any]:
        return {
            "start_ms": self.start_ms,
            "end_ms": self.end_ms,
            "availability_percent": None if self.percent is None else round(self.percent, 4),
            "online_ms": self.online_ms,
            "announced_offline_ms": self.announced_ms,
            "lost_ms": self.lost_ms,
            "unknown_ms": self.unknown_ms,
            "announced_by_reason": dict(sorted(self.announced_by_reason.items())),
            "transitions": self.transitions,
        }


def availability(transitions: Iterable[Transition], start_ms: int, end_ms: int) -> Availability:
    """Split ``[start_ms, end_ms)`` by the state each transition started.

    ``transitions`` may include ones before the window (the last of those gives the state
    at ``start_ms``) and after it (ignored); they need not be sorted.
    """
    if end_ms < start_ms:
        raise ValueError("the window ends before it starts")
    ordered = sorted(transitions, key=lambda t: t.at_ms)
    current = Transition(start_ms, UNKNOWN)
    inside: list[Transition] = []
    for transition in ordered:
        if transition.at_ms <= start_ms:
            current = Transition(start_ms, transition.state, transition.reason)
        elif transition.at_ms < end_ms:
            inside.append(transition)
    totals: dict[str, int] = defaultdict(int)
    reasons: dict[str, int] = defaultdict(int)
    for nxt in [*inside, Transition(end_ms, UNKNOWN)]:
        span = nxt.at_ms - current.at_ms
        totals[_bucket(current.state)] += span
        if _bucket(current.state) == OFFLINE:
            reasons[current.reason or "unspecified"] += span
        current = nxt
    return Availability(
        start_ms=start_ms,
        end_ms=end_ms,
        online_ms=totals[ONLINE],
        announced_ms=totals[OFFLINE],
        lost_ms=totals[LOST],
        unknown_ms=totals[UNKNOWN],
        announced_by_reason={k: v for k, v in reasons.items() if v},
        transitions=len(inside),
    )


def _bucket(state: str) -> str:
    return state if state in (ONLINE, OFFLINE, LOST) else UNKNOWN


def parse_percent(text: str) -> float:
    """``99%``, ``99.5`` -> a percentage in [0, 100]; raises ``ValueError``."""
    raw = text.strip().removesuffix("%").strip()
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"invalid percentage {text!r}: use e.g. 99% or 99.5") from None
    if not 0 <= value <= 100:
        raise ValueError(f"percentage {text!r} must be between 0 and 100")
    return value


# --- queries ------------------------------------------------------------------------


def load_transitions(
    engine: Engine, since_ms: int, until_ms: int, device_ids: Sequence[str] | None = None
) -> dict[str, list[Transition]]:
    """Per device: the last applied transition before ``since_ms`` (the state the window
    starts in), every applied one inside the window, and the current ``unknown`` state
    that reconciliation stores without a history row."""
    applied = HIST.c.verdict.in_(APPLIED)
    last_before = (
        select(HIST.c.device_id, func.max(HIST.c.id).label("id"))
        .where(applied, HIST.c.received_ms < since_ms)
        .group_by(HIST.c.device_id)
    )
    inside = select(HIST.c.id).where(
        applied, HIST.c.received_ms >= since_ms, HIST.c.received_ms <= until_ms
    )
    unknown = select(CONN.c.device_id, CONN.c.since_ms, CONN.c.reason).where(
        CONN.c.state == UNKNOWN, CONN.c.since_ms <= until_ms
    )
    if device_ids is not None:
        last_before = last_before.where(HIST.c.device_id.in_(device_ids))
        inside = inside.where(HIST.c.device_id.in_(device_ids))
        unknown = unknown.where(CONN.c.device_id.in_(device_ids))
    before = last_before.subquery()
    rows_stmt = (
        select(HIST.c.device_id, HIST.c.state, HIST.c.reason, HIST.c.received_ms)
        .select_from(HIST.join(before, before.c.id == HIST.c.id))
        .union_all(
            select(HIST.c.device_id, HIST.c.state, HIST.c.reason, HIST.c.received_ms).where(
                HIST.c.id.in_(inside)
            )
        )
    )
    out: dict[str, list[Transition]] = defaultdict(list)
    with engine.connect() as conn:
        for row in conn.execute(rows_stmt):
            out[row.device_id].append(Transition(int(row.received_ms), row.state, row.reason))
        for gap in conn.execute(unknown):
            out[gap.device_id].append(Transition(int(gap.since_ms), UNKNOWN, gap.reason))
    for transitions in out.values():
        transitions.sort(key=lambda t: t.at_ms)
    return dict(out)


@dataclass(frozen=True, slots=True)
class DeviceUptime:
    device_id: str
    availability: Availability

    def to_json(self) -> dict[str, Any]:
        return {"device": self.device_id, **self.availability.to_json()}


def fleet_devices(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return sorted(
            row.device_identifier
            for row in conn.execute(
                select(REMOTES.c.device_identifier).where(REMOTES.c.deleted_at.is_(None))
            )
        )


def uptime_report(
    engine: Engine, since_ms: int, now_ms: int, device_ids: Sequence[str] | None = None
) -> list[DeviceUptime]:
    """Availability of every (not soft-deleted) CMS device over ``[since_ms, now_ms)``."""
    devices = list(device_ids) if device_ids is not None else fleet_devices(engine)
    transitions = load_transitions(engine, since_ms, now_ms, devices if device_ids else None)
    return [
        DeviceUptime(device, availability(transitions.get(device, []), since_ms, now_ms))
        for device in devices
    ]
