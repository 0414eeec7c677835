"""``doctor``: check broker, database, the bridge's presence, clock skew and consistency.

Each check is a :class:`Check` (OK / WARN / FAIL with a fix hint). The judging functions
are pure; :func:`run_doctor` gathers the inputs once (one connection, one retained
snapshot) and calls them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

from sqlalchemy import Engine, select
from sqlalchemy.exc import SQLAlchemyError

from bridge.broker_url import BrokerAddress
from bridge.db.bridges_store import META
from bridge.db.engine import missing_tables
from bridge.db.fleet_health import FleetHealth, read_fleet_health
from bridge.db.models import PresenceHistory
from bridge.db.tables import table_of
from bridge.ops.broker_probe import describe, probe_nodes, wildcard_replay
from bridge.ops.consistency import (
    INVALID_RETAINED,
    MISSING_ON_BROKER,
    ConsistencyReport,
    compare_snapshot,
    load_known,
)
from bridge.ops.db import DB_INIT_HINT, check_reachable, first_line, open_read_engine
from bridge.ops.durations import format_duration
from bridge.ops.errors import Unreachable
from bridge.ops.mqtt import RetainedMessage, connect, read_retained
from bridge.ops.skew import SkewReport, load_skew_rows, skew_report
from bridge.ops.timefmt import ago, clock
from bridge.settings import MqttProtocol
from schemas import BridgePresence, ContractError, TopicKind, decode, device_filter
from schemas.topics import (
    bridge_instance_topic,
    bridge_instances_filter,
    device_topic,
    parse_bridge_instance_topic,
)

HIST = table_of(PresenceHistory)

DEFAULT_SKEW_THRESHOLD_MS: Final = 30_000
#: KB_STALE_AFTER_S's default: without a writer's heartbeat for this long, states are stale.
DEFAULT_STALE_AFTER_MS: Final = 10_000
_SHOWN: Final = 10


class Level(StrEnum):
    OK = "OK"
    WARN = "WARN"
    FAIL = "FAIL"


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    level: Level
    summary: str
    hint: str | None = None
    details: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "level": self.level.value,
            "summary": self.summary,
            "hint": self.hint,
            "details": self.details,
            "data": self.data,
        }


@dataclass(frozen=True, slots=True)
class DoctorReport:
    checks: list[Check]
    #: The broker or the database could not be reached at all.
    unreachable: bool = False

    @property
    def exit_code(self) -> int:
        if self.unreachable:
            return 3
        return 1 if any(c.level is Level.FAIL for c in self.checks) else 0

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.exit_code == 0,
            "exit_code": self.exit_code,
            "checks": [c.to_json() for c in self.checks],
        }


# --- judging (pure) -----------------------------------------------------------------------


def judge_bridge_presence(
    presences: Mapping[str, bytes],
    now_ms: int,
    *,
    prefix: str,
    database_id: str | None = None,
    health: FleetHealth | None = None,
) -> Check:
    """The bridges' retained births and Wills (``{prefix}/_bridge/{instance}/presence``,
    by instance), judged for the database whose id is ``database_id`` only: bridges of
    other databases on the same broker are listed and otherwise ignored."""
    name = "bridge presence"
    start_hint = "start it: `kiosk-bridge run --broker URL --db URL`"
    details: list[str] = []
    mine: list[BridgePresence] = []
    foreign: list[BridgePresence] = []
    invalid: list[str] = []
    for instance, payload in sorted(presences.items()):
        try:
            presence = decode(BridgePresence, payload)
        except ContractError:
            invalid.append(bridge_instance_topic(instance, prefix))
            continue
        if database_id is None or presence.database in (database_id, None):
            mine.append(presence)
        else:
            foreign.append(presence)
    if foreign:
        details.append(
            f"{len(foreign)} bridge(s) of other databases on this broker, ignored: "
            + ", ".join(f"{p.instance} ({p.state.value})" for p in foreign[:5])
        )
    for topic in invalid:
        details.append(f"invalid retained payload on {topic}")
    clear = (
        f"clear it with `mosquitto_pub -r -n -t {invalid[0]}` and restart the bridge"
        if invalid
        else None
    )
    if not mine:
        return Check(
            name,
            Level.FAIL,
            "no bridge of this database has announced itself on this broker"
            + (" (only bridges of other databases)" if foreign else ""),
            hint=clear or f"{start_hint}; check --prefix if it uses another one",
            details=details,
        )
    online = [p for p in mine if p.state.value == "online"]
    writers = [p for p in online if p.role in ("leader", "shared", None)]
    standbys = [p for p in online if p.role == "standby"]
    if standbys:
        details.append("standby: " + ", ".join(_who(p) for p in standbys))
    if not writers:
        if standbys:
            return Check(
                name,
                Level.FAIL,
                f"{len(standbys)} standby bridge(s) online but none writes: the lease is "
                "held by no live instance",
                hint="look at `kb_lease` and the standbys' logs",
                details=details,
            )
        last = max(mine, key=lambda p: p.ts or 0)
        if last.state.value == "lost":
            summary = f"{_who(last)} lost its connection: the broker published its Last Will"
            hint = f"the bridge crashed or its network broke; check its logs, then {start_hint}"
        else:
            summary = f"{_who(last)} was stopped cleanly; no bridge is updating the table"
            hint = start_hint
        data = last.model_dump(mode="json", exclude_none=True)
        return Check(name, Level.FAIL, summary, hint=hint, details=details, data=data)
    level = Level.WARN if invalid else Level.OK
    leaders = [p for p in writers if p.role == "leader"]
    if len(leaders) > 1:
        level = Level.WARN
        details.append(
            "more than one leader announced: "
            + ", ".join(p.instance for p in leaders)
            + " (the fence lets only the lease holder write)"
        )
    first = max(writers, key=lambda p: p.ts or 0)
    for presence in writers:
        if presence.ts is not None and presence.ts > now_ms + DEFAULT_SKEW_THRESHOLD_MS:
            level = Level.WARN
            details.append(
                f"{presence.instance}'s birth is timestamped in the future: its host's clock "
                "is ahead"
            )
    if health is not None and not health.live and not health.unknown:
        level = Level.WARN
        details.append(health.warning() or "no heartbeat in kb_bridges")
    since = f" since {clock(first.ts)} ({ago(first.ts, now_ms)})" if first.ts else ""
    role = f", {first.role}" if first.role else ""
    others = f" and {len(writers) - 1} more writing" if len(writers) > 1 else ""
    return Check(
        name,
        level,
        f"online: {_who(first)}{role}{since}{others}",
        hint=clear,
        details=details,
        data=first.model_dump(mode="json", exclude_none=True),
    )


def _who(presence: BridgePresence) -> str:
    return f"instance {presence.instance}" + (f" ({presence.version})" if presence.version else "")


def judge_skew(report: SkewReport) -> Check:
    name = "clock skew"
    data = report.to_json()
    if report.samples == 0:
        return Check(name, Level.OK, "no device timestamps stored yet", data=data)
    summary = (
        f"median {_signed(report.median_ms)}, max |skew| {format_duration(report.max_abs_ms or 0)}"
        f" over {report.samples} devices"
    )
    if not report.beyond:
        return Check(name, Level.OK, summary, data=data)
    details = [f"{device}: {_signed(skew)}" for device, skew in report.beyond[:_SHOWN]]
    if len(report.beyond) > _SHOWN:
        details.append(f"... and {len(report.beyond) - _SHOWN} more")
    return Check(
        name,
        Level.WARN,
        f"{summary}; {len(report.beyond)} beyond {format_duration(report.threshold_ms)}",
        hint="enable NTP on those kiosks (negative values can also be messages delivered "
        "late, e.g. retained messages replayed after a bridge restart)",
        details=details,
        data=data,
    )


def _signed(ms: int | None) -> str:
    if ms is None:
        return "-"
    return ("+" if ms >= 0 else "-") + format_duration(abs(ms))


def judge_consistency(report: ConsistencyReport) -> Check:
    name = "retained vs table"
    data = report.to_json()
    if report.ok:
        return Check(
            name,
            Level.OK,
            f"{report.agree} devices agree with their retained presence",
            data=data,
        )
    details = [f"{m.device_id}: {m.detail}" for m in report.mismatches[:_SHOWN]]
    if len(report.mismatches) > _SHOWN:
        details.append(f"... and {len(report.mismatches) - _SHOWN} more")
    serious = [m for m in report.mismatches if m.kind != MISSING_ON_BROKER]
    hints = []
    if report.by_kind(INVALID_RETAINED):
        hints.append("clear an invalid retained message with `mosquitto_pub -r -n -t TOPIC`")
    if serious:
        hints.append(
            "re-run in a few seconds if the bridge is busy; if it persists, restart the "
            "bridge: it re-reads the retained state and reconciles"
        )
    if report.by_kind(MISSING_ON_BROKER):
        hints.append("the broker lost retained messages (persistence off or wiped?)")
    if not report.snapshot_complete:
        hints.append("the retained snapshot was incomplete: the broker did not echo the marker")
    return Check(
        name,
        Level.FAIL if serious or not report.snapshot_complete else Level.WARN,
        f"{len(report.mismatches)} of {report.checked} devices disagree",
        hint="; ".join(hints),
        details=details,
        data=data,
    )


# --- gathering ---------------------------------------------------------------------------


def _database_identity(engine: Engine, now_ms: int) -> tuple[str | None, FleetHealth | None]:
    """Blocking: the database's id (which bridges' presence counts) and its liveness."""
    try:
        with engine.connect() as conn:
            found = conn.execute(select(META.c.value).where(META.c.key == "database_id")).scalar()
        health = read_fleet_health(engine, now_ms, DEFAULT_STALE_AFTER_MS)
    except SQLAlchemyError:
        return None, None
    return (None if found is None else str(found)), health


def _database_checks(engine: Engine) -> tuple[list[Check], bool]:
    """(checks, usable): reachability and schema."""
    shown = engine.url.render_as_string(hide_password=True)
    try:
        check_reachable(engine)
    except Unreachable as exc:
        return [Check("database", Level.FAIL, str(exc), hint=exc.hint)], False
    try:
        missing = missing_tables(engine)
    except SQLAlchemyError as exc:
        return [Check("database", Level.FAIL, f"cannot read schema: {first_line(exc)}")], False
    checks = [Check("database", Level.OK, f"reachable: {shown}")]
    if missing:
        checks.append(
            Check("schema", Level.FAIL, f"missing tables: {', '.join(missing)}", hint=DB_INIT_HINT)
        )
        return checks, False
    checks.append(Check("schema", Level.OK, "remotes and the kb_ tables exist"))
    return checks, True


async def run_doctor(
    address: BrokerAddress,
    db_url: str,
    now_ms: int,
    *,
    prefix: str,
    protocol: MqttProtocol = "auto",
    skew_threshold_ms: int = DEFAULT_SKEW_THRESHOLD_MS,
) -> DoctorReport:
    """Every check; raises only :class:`bridge.ops.errors.UsageError` (bad DB URL)."""
    checks: list[Check] = []
    unreachable = False
    engine: Engine | None = None
    try:
        try:
            engine = await asyncio.to_thread(open_read_engine, db_url)
        except Unreachable as exc:
            checks.append(Check("database", Level.FAIL, str(exc), hint=exc.hint))
            unreachable = True
        db_ok = False
        if engine is not None:
            db_checks, db_ok = await asyncio.to_thread(_database_checks, engine)
            checks += db_checks
            unreachable = unreachable or db_checks[0].level is Level.FAIL
        retained: list[RetainedMessage] | None = None
        complete = False
        try:
            async with connect(address, protocol=protocol, name="doctor") as client:
                checks.append(Check("broker", Level.OK, f"connected to {address.url}"))
                probes = await probe_nodes(address, prefix=prefix)
                level, message, hint = describe(probes)
                checks.append(Check("broker features", Level(level), message, hint=hint))
                filters = [
                    bridge_instances_filter(prefix),
                    device_filter(TopicKind.PRESENCE, prefix),
                ]
                if not wildcard_replay(probes) and db_ok and engine is not None:
                    # No retained replay to wildcards (RabbitMQ): read each known device's
                    # exact topic, as the bridge does, instead of blaming persistence.
                    known = await asyncio.to_thread(load_known, engine)
                    filters += [device_topic(d, TopicKind.PRESENCE, prefix) for d in sorted(known)]
                snapshot = await read_retained(client, filters, prefix=prefix)
                retained, complete = list(snapshot.messages), snapshot.complete
        except Unreachable as exc:
            checks.append(Check("broker", Level.FAIL, str(exc), hint=exc.hint))
            unreachable = True
        if retained is not None:
            presences = {
                instance: m.payload
                for m in retained
                if (instance := parse_bridge_instance_topic(m.topic, prefix)) is not None
            }
            database_id, health = None, None
            if db_ok and engine is not None:
                database_id, health = await asyncio.to_thread(_database_identity, engine, now_ms)
            checks.append(
                judge_bridge_presence(
                    presences, now_ms, prefix=prefix, database_id=database_id, health=health
                )
            )
        if db_ok and engine is not None:
            rows = await asyncio.to_thread(load_skew_rows, engine)
            checks.append(judge_skew(skew_report(rows, skew_threshold_ms)))
            if retained is not None:
                report = await compare_snapshot(retained, engine, prefix, complete=complete)
                checks.append(judge_consistency(report))
    finally:
        if engine is not None:
            engine.dispose()
    return DoctorReport(checks, unreachable)
