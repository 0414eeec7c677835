"""What the fleet page reads: the fleet, uptime bars, the command ledger, freshness.

Read-only. The fleet and the uptime come from ``bridge/ops`` (``load_fleet``,
``load_transitions``); what ops has no query for (the ``noisy`` mark, the ledger with
its fan-outs, the newest write) is here. The shaping is pure and tested without a
database.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from sqlalchemy import Engine, case, func, select

from bridge.commands.lifecycle import CommandState
from bridge.db.models import CommandRecord, Connectivity, PresenceHistory
from bridge.db.rows import utc_naive
from bridge.db.tables import table_of
from bridge.ops.fleet import load_fleet
from bridge.ops.timefmt import naive_utc_to_ms
from bridge.ops.uptime import LOST, OFFLINE, ONLINE, Transition, load_transitions

CONN = table_of(Connectivity)
HIST = table_of(PresenceHistory)
CMD = table_of(CommandRecord)

DAY_MS: Final = 24 * 3600 * 1000
#: One letter per state in the bars: online, announced offline, lost, unknown.
STATE_CODES: Final = {ONLINE: "o", OFFLINE: "f", LOST: "l"}
UNKNOWN_CODE: Final = "u"
FLEET_COLUMNS: Final = (
    "device_id",
    "name",
    "state",
    "since_ms",
    "reason",
    "cms_status",
    "flapping",
    "noisy",
    "battery",
    "last_seen_ms",
)
#: With devices online, no write for this long means no bridge is writing: the states
#: shown may be stale (ten status intervals at the default 30 s).
STALE_AFTER_MS: Final = 300_000
OPEN_STATES: Final = tuple(s.value for s in CommandState if not s.terminal)
#: Fan-outs are looked for among the commands created this far back.
FANOUT_WINDOW_MS: Final = DAY_MS


# --- the fleet ------------------------------------------------------------------------


def fleet(engine: Engine) -> list[list[Any]]:
    """Every (not soft-deleted) device as a row of :data:`FLEET_COLUMNS`, by id."""
    rows = load_fleet(engine)
    with engine.connect() as conn:
        noisy = {r.device_id for r in conn.execute(select(CONN.c.device_id).where(CONN.c.noisy))}
    rows.sort(key=lambda r: r.device_id)
    return [
        [
            r.device_id,
            r.name,
            r.state,
            r.since_ms,
            r.reason,
            r.legacy_status,
            r.flapping,
            r.device_id in noisy,
            r.battery,
            r.last_seen_ms,
        ]
        for r in rows
    ]


# --- uptime bars ------------------------------------------------------------------------


def segments(transitions: Iterable[Transition], start_ms: int, end_ms: int) -> list[list[Any]]:
    """``[[start_ms, code], ...]`` covering ``[start_ms, end_ms)``, merged where the
    code repeats. Codes: :data:`STATE_CODES`, else ``u`` (unknown, as in
    ``ops.uptime.availability``: before the first known transition, or unknown)."""
    code = UNKNOWN_CODE
    inside: list[tuple[int, str]] = []
    for t in sorted(transitions, key=lambda t: t.at_ms):
        if t.at_ms <= start_ms:
            code = STATE_CODES.get(t.state, UNKNOWN_CODE)
        elif t.at_ms < end_ms:
            inside.append((t.at_ms, STATE_CODES.get(t.state, UNKNOWN_CODE)))
    out: list[list[Any]] = [[start_ms, code]]
    for at, state in inside:
        if state != out[-1][1]:
            if at == out[-1][0]:
                out[-1][1] = state
            else:
                out.append([at, state])
    if len(out) > 1 and out[-2][1] == out[-1][1]:
        out.pop()
    return out


def uptime_bars(
    engine: Engine, start_ms: int, end_ms: int, device_ids: Sequence[str] | None = None
) -> dict[str, list[list[Any]]]:
    """Per device with any history: its segments. A device missing is unknown throughout."""
    found = load_transitions(engine, start_ms, end_ms, device_ids)
    return {device: segments(ts, start_ms, end_ms) for device, ts in found.items()}


# --- commands -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Fanout:
    """One request for many devices: the commands one ``enqueue`` created together."""

    created_ms: int
    type: str
    requested_by: str | None
    by_state: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.by_state.values())

    @property
    def open(self) -> int:
        return sum(n for state, n in self.by_state.items() if state in OPEN_STATES)

    def to_json(self) -> dict[str, Any]:
        return {
            "created_ms": self.created_ms,
            "type": self.type,
            "requested_by": self.requested_by,
            "total": self.total,
            "open": self.open,
            "by_state": dict(sorted(self.by_state.items())),
        }


def group_fanouts(rows: Iterable[Any], *, min_devices: int = 2) -> list[Fanout]:
    """From ``(created_at, type, requested_by, state, n)`` counts: the requests that
    reached at least ``min_devices`` devices, newest first. ``enqueue`` stamps every
    command of one request with one ``created_at``, which is what groups them."""
    groups: dict[tuple[datetime, str, str | None], dict[str, int]] = defaultdict(dict)
    for row in rows:
        groups[(row.created_at, row.type, row.requested_by)][row.state] = int(row.n)
    out = [
        Fanout(naive_utc_to_ms(created) or 0, type_, by, states)
        for (created, type_, by), states in groups.items()
    ]
    out = [f for f in out if f.total >= min_devices]
    out.sort(key=lambda f: (f.created_ms, f.type), reverse=True)
    return out


def commands(
    engine: Engine,
    now_ms: int,
    *,
    limit: int = 200,
    device_id: str | None = None,
    state: str | None = None,
) -> dict[str, Any]:
    """The newest ``limit`` commands (optionally one device's, or in one state) and the
    fan-outs of the last day with their progress."""
    cols = (
        CMD.c.id,
        CMD.c.device_id,
        CMD.c.type,
        CMD.c.state,
        CMD.c.created_at,
        CMD.c.finished_at,
        CMD.c.attempts,
        CMD.c.requested_by,
        CMD.c.reason,
        CMD.c.detail,
        CMD.c.last_error,
    )
    ledger = select(*cols).order_by(CMD.c.created_at.desc(), CMD.c.id).limit(limit)
    if device_id is not None:
        ledger = ledger.where(CMD.c.device_id == device_id)
    if state is not None:
        ledger = ledger.where(CMD.c.state == state)
    since = utc_naive(now_ms - FANOUT_WINDOW_MS)
    counts = (
        select(
            CMD.c.created_at,
            CMD.c.type,
            CMD.c.requested_by,
            CMD.c.state,
            func.count().label("n"),
        )
        .where(CMD.c.created_at >= since)
        .group_by(CMD.c.created_at, CMD.c.type, CMD.c.requested_by, CMD.c.state)
    )
    with engine.connect() as conn:
        rows = conn.execute(ledger).all()
        fanouts = group_fanouts(conn.execute(counts).all())
    return {
        "commands": [
            {
                "id": r.id,
                "device_id": r.device_id,
                "type": r.type,
                "state": r.state,
                "created_ms": naive_utc_to_ms(r.created_at),
                "finished_ms": naive_utc_to_ms(r.finished_at),
                "attempts": int(r.attempts),
                "requested_by": r.requested_by,
                "reason": r.reason,
                "detail": r.detail or r.last_error,
            }
            for r in rows
        ],
        "fanouts": [f.to_json() for f in fanouts[:50]],
    }


# --- freshness ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Freshness:
    #: ``True``: devices are shown online but nothing was written for
    #: :data:`STALE_AFTER_MS`; ``False``: writes are recent; ``None``: cannot tell.
    stale: bool | None
    newest_write_ms: int | None
    online: int

    def to_json(self) -> dict[str, Any]:
        return {
            "stale": self.stale,
            "newest_write_ms": self.newest_write_ms,
            "online": self.online,
            # The banner's words when set; else the page words it from the fields.
            "message": None,
            "basis": "kb_bridges heartbeats; newest_write_ms is the newest kb_ write",
        }


def judge_freshness(
    newest_write_ms: int | None, online: int, now_ms: int, stale_after_ms: int = STALE_AFTER_MS
) -> Freshness:
    """Online devices send status every interval, and every status is a write: if none
    came for ``stale_after_ms``, no bridge is writing. Without online devices silence
    is normal, so nothing can be told (``None``)."""
    if newest_write_ms is None or online == 0:
        return Freshness(None, newest_write_ms, online)
    return Freshness(now_ms - newest_write_ms > stale_after_ms, newest_write_ms, online)


def freshness(engine: Engine, now_ms: int) -> Freshness:
    # A detail beside the bridges' own liveness, which decides the banner
    # (``/ui/api/status``: ``HttpContext.liveness``, from kb_bridges heartbeats).
    with engine.connect() as conn:
        conn_row = conn.execute(
            select(
                func.max(CONN.c.updated_ms).label("updated"),
                func.max(CONN.c.last_status_ms).label("status"),
                func.sum(case((CONN.c.state == ONLINE, 1), else_=0)).label("online"),
            )
        ).one()
        hist_newest = conn.execute(select(func.max(HIST.c.received_ms))).scalar()
    times = [int(v) for v in (conn_row.updated, conn_row.status, hist_newest) if v is not None]
    return judge_freshness(max(times) if times else None, int(conn_row.online or 0), now_ms)
