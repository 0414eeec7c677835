"""``top``: a live fleet view. :func:`collect` reads one snapshot; :func:`render_frame`
turns it into a rich renderable, so a frame is tested without a terminal."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Final

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text
from sqlalchemy import ColumnElement, Engine, func, select

from bridge.db.models import CommandRecord, Connectivity, PresenceHistory, Remote
from bridge.db.rows import utc_naive
from bridge.db.tables import table_of
from bridge.ops.choices import STATES
from bridge.ops.durations import format_duration
from bridge.ops.timefmt import ago, clock
from bridge.ops.uptime import APPLIED

HIST = table_of(PresenceHistory)
CONN = table_of(Connectivity)
REMOTES = table_of(Remote)
COMMANDS = table_of(CommandRecord)

WINDOW_MS: Final = 5 * 60_000
RECENT: Final = 12
ACTIVE_COMMANDS: Final = ("queued", "sent", "delivered", "received")
_LAG_SAMPLES: Final = 20_000
_STATE_STYLE: Final = {"online": "green", "offline": "yellow", "lost": "red", "unknown": "dim"}


#: ``s`` cycles the order of the recent transitions, ``f`` the state they are filtered by.
SORTS: Final = ("newest", "device", "state")
FILTERS: Final[tuple[str | None, ...]] = (None, "lost", "offline", "online", "unknown")
KEYS_HELP: Final = "s sort  f filter  q quit"


@dataclass(frozen=True, slots=True)
class TopView:
    """What the keys chose: the order and the state filter of the recent transitions."""

    sort: str = "newest"
    state: str | None = None


def on_key(view: TopView, key: str) -> TopView | None:
    """The view after ``key``; ``None`` to quit. Unknown keys change nothing."""
    if key in ("q", "Q", "\x03"):
        return None
    if key == "s":
        return TopView(SORTS[(SORTS.index(view.sort) + 1) % len(SORTS)], view.state)
    if key == "f":
        return TopView(view.sort, FILTERS[(FILTERS.index(view.state) + 1) % len(FILTERS)])
    return view


def _state_rank(state: str) -> int:
    # Worst first, as ``devices --sort state`` orders them.
    return {"lost": 0, "offline": 1, "unknown": 2, "online": 3}.get(state, 4)


@dataclass(frozen=True, slots=True)
class RecentTransition:
    at_ms: int
    device_id: str
    prev_state: str | None
    state: str
    reason: str | None
    verdict: str


@dataclass(frozen=True, slots=True)
class Lag:
    samples: int = 0
    p50_ms: int | None = None
    p95_ms: int | None = None
    max_ms: int | None = None


@dataclass(frozen=True, slots=True)
class TopSnapshot:
    now_ms: int
    window_ms: int = WINDOW_MS
    by_state: dict[str, int] = field(default_factory=dict)
    connected: int = 0
    disconnected: int = 0
    recent: list[RecentTransition] = field(default_factory=list)
    #: Presence events in the window, by verdict.
    events: dict[str, int] = field(default_factory=dict)
    flapping: list[tuple[str, int, int]] = field(default_factory=list)
    commands_active: dict[str, int] = field(default_factory=dict)
    commands_finished: dict[str, int] = field(default_factory=dict)
    commands_created: int = 0
    lag: Lag = field(default_factory=Lag)

    @property
    def total(self) -> int:
        return sum(self.by_state.values())

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def percentile(values: list[int], q: float) -> int | None:
    """Nearest-rank percentile of ``values`` (sorted or not); ``None`` when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))
    return ordered[rank]


def collect(
    engine: Engine, now_ms: int, *, window_ms: int = WINDOW_MS, view: TopView | None = None
) -> TopSnapshot:
    """One snapshot; ``view`` filters and orders the recent transitions."""
    view = view or TopView()
    since = now_ms - window_ms
    recent_where: list[ColumnElement[bool]] = [HIST.c.verdict.in_(APPLIED)]
    if view.state is not None:
        recent_where.append(HIST.c.state == view.state)
    since_dt = utc_naive(since)
    fleet = REMOTES.outerjoin(CONN, CONN.c.device_id == REMOTES.c.device_identifier)
    with engine.connect() as conn:
        states = Counter(
            {
                (row.state or "unknown"): int(row.n)
                for row in conn.execute(
                    select(CONN.c.state, func.count().label("n"))
                    .select_from(fleet)
                    .where(REMOTES.c.deleted_at.is_(None))
                    .group_by(CONN.c.state)
                )
            }
        )
        legacy = {
            row.status: int(row.n)
            for row in conn.execute(
                select(REMOTES.c.status, func.count().label("n"))
                .where(REMOTES.c.deleted_at.is_(None))
                .group_by(REMOTES.c.status)
            )
        }
        recent = [
            RecentTransition(
                int(row.received_ms),
                row.device_id,
                row.prev_state,
                row.state,
                row.reason,
                row.verdict,
            )
            for row in conn.execute(
                select(HIST).where(*recent_where).order_by(HIST.c.id.desc()).limit(RECENT)
            )
        ]
        if view.sort == "device":
            recent.sort(key=lambda r: (r.device_id, -r.at_ms))
        elif view.sort == "state":
            recent.sort(key=lambda r: (_state_rank(r.state), -r.at_ms))
        events = {
            row.verdict: int(row.n)
            for row in conn.execute(
                select(HIST.c.verdict, func.count().label("n"))
                .where(HIST.c.received_ms >= since)
                .group_by(HIST.c.verdict)
            )
        }
        lags = [
            max(0, int(row.lag))
            for row in conn.execute(
                select((HIST.c.committed_ms - HIST.c.received_ms).label("lag"))
                .where(HIST.c.received_ms >= since)
                .order_by(HIST.c.id.desc())
                .limit(_LAG_SAMPLES)
            )
        ]
        flapping = [
            (row.device_id, int(row.transitions), int(row.since_ms))
            for row in conn.execute(
                select(CONN.c.device_id, CONN.c.transitions, CONN.c.since_ms)
                .where(CONN.c.flapping.is_(True))
                .order_by(CONN.c.transitions.desc(), CONN.c.device_id)
                .limit(RECENT)
            )
        ]
        active = {
            row.state: int(row.n)
            for row in conn.execute(
                select(COMMANDS.c.state, func.count().label("n"))
                .where(COMMANDS.c.state.in_(ACTIVE_COMMANDS))
                .group_by(COMMANDS.c.state)
            )
        }
        finished = {
            row.state: int(row.n)
            for row in conn.execute(
                select(COMMANDS.c.state, func.count().label("n"))
                .where(COMMANDS.c.finished_at >= since_dt)
                .group_by(COMMANDS.c.state)
            )
        }
        created = conn.execute(
            select(func.count()).select_from(COMMANDS).where(COMMANDS.c.created_at >= since_dt)
        ).scalar_one()
    return TopSnapshot(
        now_ms=now_ms,
        window_ms=window_ms,
        by_state={state: states.get(state, 0) for state in STATES},
        connected=legacy.get("Connected", 0),
        disconnected=sum(n for status, n in legacy.items() if status != "Connected"),
        recent=recent,
        events=events,
        flapping=flapping,
        commands_active=active,
        commands_finished=finished,
        commands_created=int(created),
        lag=Lag(
            samples=len(lags),
            p50_ms=percentile(lags, 0.5),
            p95_ms=percentile(lags, 0.95),
            max_ms=max(lags) if lags else None,
        ),
    )


# --- rendering ------------------------------------------------------------------------


def _states_panel(snap: TopSnapshot) -> Panel:
    table = Table.grid(padding=(0, 2))
    table.add_column(justify="left")
    table.add_column(justify="right")
    for state in STATES:
        table.add_row(Text(state, style=_STATE_STYLE[state]), str(snap.by_state.get(state, 0)))
    table.add_row("total", str(snap.total), style="bold")
    table.add_row("", "")
    table.add_row("CMS Connected", str(snap.connected))
    table.add_row("CMS Disconnected", str(snap.disconnected))
    table.add_row("flapping", str(len(snap.flapping)), style="magenta" if snap.flapping else "")
    return Panel(table, title="devices", border_style="cyan")


def _commands_panel(snap: TopSnapshot) -> Panel:
    minutes = snap.window_ms / 60_000
    finished = sum(snap.commands_finished.values())
    table = Table.grid(padding=(0, 2))
    table.add_column()
    table.add_column(justify="right")
    for state in ACTIVE_COMMANDS:
        table.add_row(state, str(snap.commands_active.get(state, 0)))
    window = format_duration(snap.window_ms)
    table.add_row(f"created ({window})", str(snap.commands_created))
    table.add_row(f"finished ({window})", str(finished))
    table.add_row("throughput", f"{finished / minutes:.1f}/min")
    for state, n in sorted(snap.commands_finished.items()):
        table.add_row(f"  {state}", str(n), style="red" if state in ("failed", "expired") else "")
    return Panel(table, title="commands", border_style="magenta")


def _lag_panel(snap: TopSnapshot) -> Panel:
    lag = snap.lag
    table = Table.grid(padding=(0, 2))
    table.add_column()
    table.add_column(justify="right")
    shown = [("p50", lag.p50_ms), ("p95", lag.p95_ms), ("max", lag.max_ms)]
    for name, value in shown:
        table.add_row(name, "-" if value is None else format_duration(value))
    table.add_row("events", str(sum(snap.events.values())))
    for verdict, n in sorted(snap.events.items()):
        table.add_row(f"  {verdict}", str(n))
    return Panel(
        table, title=f"bridge lag ({format_duration(snap.window_ms)})", border_style="blue"
    )


def _recent_panel(snap: TopSnapshot, view: TopView) -> Panel:
    table = Table(box=None, padding=(0, 1), expand=True)
    table.add_column("when", style="dim", no_wrap=True)
    table.add_column("device", no_wrap=True)
    table.add_column("transition", no_wrap=True)
    table.add_column("reason")
    for item in snap.recent:
        table.add_row(
            ago(item.at_ms, snap.now_ms),
            item.device_id,
            Text.assemble(
                (item.prev_state or "new", _STATE_STYLE.get(item.prev_state or "", "dim")),
                " -> ",
                (item.state, _STATE_STYLE.get(item.state, "")),
            ),
            item.reason or ("reset" if item.verdict == "reset" else ""),
        )
    if not snap.recent:
        table.add_row("-", "no transitions yet", "", "")
    title = f"recent transitions ({view.sort} first"
    title += f", only -> {view.state})" if view.state else ")"
    return Panel(table, title=title, border_style="green")


def _flapping_panel(snap: TopSnapshot) -> Panel:
    table = Table(box=None, padding=(0, 1), expand=True)
    table.add_column("device", no_wrap=True)
    table.add_column("transitions", justify="right")
    table.add_column("state since", style="dim")
    for device_id, transitions, since in snap.flapping:
        table.add_row(device_id, str(transitions), ago(since, snap.now_ms))
    if not snap.flapping:
        table.add_row("none", "", "")
    return Panel(table, title="flapping", border_style="magenta")


def _every(interval_s: float) -> str:
    return "every second" if interval_s == 1 else f"every {interval_s:g}s"


def render_frame(
    snap: TopSnapshot,
    *,
    interval_s: float = 1.0,
    view: TopView | None = None,
    keys: bool = False,
) -> RenderableType:
    """One full frame of ``top``; ``keys`` when the keys are read (a live terminal)."""
    view = view or TopView()
    hint = f"  (refreshes {_every(interval_s)}, " + (KEYS_HELP if keys else "Ctrl-C to quit") + ")"
    header = Text.assemble(
        ("kiosk-bridge top", "bold"),
        f"  {clock(snap.now_ms)}  ",
        (f"{snap.total} devices", "bold"),
        (hint, "dim"),
    )
    body = Table.grid(expand=True, padding=(0, 1))
    body.add_column(ratio=1)
    body.add_column(ratio=2)
    body.add_row(
        Group(_states_panel(snap), _commands_panel(snap), _lag_panel(snap)),
        Group(_recent_panel(snap, view), _flapping_panel(snap)),
    )
    return Group(header, body)
