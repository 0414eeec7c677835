"""The fleet table: ``remotes`` LEFT JOIN ``kb_connectivity``, filtered and sorted.

The query reads every device once; filters and sorting are pure functions over the rows
(a fleet is thousands of rows, not millions), so they are tested without a database.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import Engine, select

from bridge.db.models import Connectivity, Remote
from bridge.db.tables import table_of
from bridge.ops.choices import SORT_KEYS as SORT_KEYS
from bridge.ops.choices import STATES as STATES
from bridge.ops.timefmt import iso_utc, naive_utc_to_ms

CONN = table_of(Connectivity)
REMOTES = table_of(Remote)


@dataclass(frozen=True, slots=True)
class FleetRow:
    device_id: str
    name: str | None
    #: ``unknown`` for a CMS device the bridge never heard from.
    state: str
    since_ms: int | None
    reason: str | None
    session: int | None
    #: ``remotes.status``: what the CMS shows.
    legacy_status: str
    flapping: bool
    battery: int | None
    wifi: int | None
    last_seen_ms: int | None
    app_version: str | None
    deleted: bool = False
    #: Wiped successfully: the device must be provisioned (claim or enroll) again.
    needs_provisioning: bool = False

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["since"] = iso_utc(self.since_ms)
        out["last_seen"] = iso_utc(self.last_seen_ms)
        return out


@dataclass(frozen=True, slots=True)
class FleetFilter:
    state: str | None = None
    flapping: bool = False
    #: Only devices last seen before ``now - stale_ms`` (never seen counts as stale).
    stale_ms: int | None = None
    search: str | None = None
    deleted: bool = False


@dataclass(frozen=True, slots=True)
class FleetSummary:
    total: int
    by_state: dict[str, int] = field(default_factory=dict)
    connected: int = 0
    disconnected: int = 0
    flapping: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def load_fleet(engine: Engine, *, include_deleted: bool = False) -> list[FleetRow]:
    """Every CMS device with what the bridge knows about it."""
    stmt = select(
        REMOTES.c.device_identifier,
        REMOTES.c.name,
        REMOTES.c.status,
        REMOTES.c.battery_level,
        REMOTES.c.wifi_strength,
        REMOTES.c.last_seen_at,
        REMOTES.c.app_version,
        REMOTES.c.deleted_at,
        CONN.c.state,
        CONN.c.since_ms,
        CONN.c.reason,
        CONN.c.session,
        CONN.c.flapping,
        CONN.c.needs_provisioning,
    ).select_from(REMOTES.outerjoin(CONN, CONN.c.device_id == REMOTES.c.device_identifier))
    if not include_deleted:
        stmt = stmt.where(REMOTES.c.deleted_at.is_(None))
    with engine.connect() as conn:
        rows = conn.execute(stmt).all()
    return [
        FleetRow(
            device_id=row.device_identifier,
            name=row.name,
            state=row.state or "unknown",
            since_ms=int(row.since_ms) if row.since_ms else None,
            reason=row.reason,
            session=int(row.session) if row.session else None,
            legacy_status=row.status,
            flapping=bool(row.flapping),
            battery=row.battery_level,
            wifi=row.wifi_strength,
            last_seen_ms=naive_utc_to_ms(row.last_seen_at),
            app_version=row.app_version,
            deleted=row.deleted_at is not None,
            needs_provisioning=bool(row.needs_provisioning),
        )
        for row in rows
    ]


def apply_filter(rows: Sequence[FleetRow], flt: FleetFilter, now_ms: int) -> list[FleetRow]:
    out: list[FleetRow] = []
    needle = flt.search.casefold() if flt.search else None
    for row in rows:
        if row.deleted and not flt.deleted:
            continue
        if flt.state is not None and row.state != flt.state:
            continue
        if flt.flapping and not row.flapping:
            continue
        if flt.stale_ms is not None and (
            row.last_seen_ms is not None and row.last_seen_ms >= now_ms - flt.stale_ms
        ):
            continue
        if needle is not None and not any(
            needle in value.casefold()
            for value in (row.device_id, row.name or "", row.app_version or "")
        ):
            continue
        out.append(row)
    return out


def _state_rank(state: str) -> int:
    # Worst first: what an operator looks for when sorting by state.
    order = {"lost": 0, "offline": 1, "unknown": 2, "online": 3}
    return order.get(state, 4)


def sort_rows(rows: Sequence[FleetRow], key: str, *, descending: bool = False) -> list[FleetRow]:
    """Sort by ``key`` (one of :data:`SORT_KEYS`); missing values go last either way."""
    if key not in SORT_KEYS:
        raise ValueError(f"cannot sort by {key!r}: choose one of {', '.join(SORT_KEYS)}")
    getters: dict[str, Any] = {
        "device": lambda r: r.device_id.casefold(),
        "state": lambda r: _state_rank(r.state),
        "since": lambda r: r.since_ms,
        "legacy": lambda r: r.legacy_status,
        "battery": lambda r: r.battery,
        "wifi": lambda r: r.wifi,
        "last-seen": lambda r: r.last_seen_ms,
        "app": lambda r: r.app_version,
    }
    get = getters[key]
    present = [r for r in rows if get(r) is not None]
    missing = [r for r in rows if get(r) is None]
    present.sort(key=lambda r: (get(r), r.device_id), reverse=descending)
    return present + sorted(missing, key=lambda r: r.device_id)


def summarize(rows: Sequence[FleetRow]) -> FleetSummary:
    states = Counter(row.state for row in rows)
    return FleetSummary(
        total=len(rows),
        by_state={state: states.get(state, 0) for state in STATES},
        connected=sum(1 for row in rows if row.legacy_status == "Connected"),
        disconnected=sum(1 for row in rows if row.legacy_status != "Connected"),
        flapping=sum(1 for row in rows if row.flapping),
    )
