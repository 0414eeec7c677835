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

from sqlalchemy import Engine, func, select
from sqlalchemy.exc import SQLAlchemyError

from bridge.broker_url import BrokerAddress
from bridge.db.engine import missing_tables
from bridge.db.models import PresenceHistory
from bridge.db.tables import table_of
from bridge.ops.consistency import (
    INVALID_RETAINED,
    MISSING_ON_BROKER,
    ConsistencyReport,
    compare_snapshot,
)
from bridge.ops.db import DB_INIT_HINT, check_reachable, first_line, open_read_engine
from bridge.ops.durations import format_duration
from bridge.ops.errors import Unreachable
from bridge.ops.mqtt import RetainedMessage, connect, read_retained
from bridge.ops.skew import SkewReport, load_skew_rows, skew_report
from bridge.ops.timefmt import ago, clock
from bridge.settings import MqttProtocol
from schemas import BridgePresence, ContractError, TopicKind, decode, device_filter
from schemas.topics import bridge_presence_topic

HIST = table_of(PresenceHistory)

DEFAULT_SKEW_THRESHOLD_MS: Final = 30_000
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
    payload: bytes | None,
    now_ms: int,
    *,
    prefix: str,
    last_writes: Mapping[str, int] | None = None,
) -> Check:
    """The bridge's own retained birth/Will, and whether another instance wrote since."""
    name = "bridge presence"
    topic = bridge_presence_topic(prefix)
    start_hint = "start it: `kiosk-bridge run --broker URL --db URL`"
    if payload is None:
        return Check(
            name,
            Level.FAIL,
            f"nothing retained on {topic}: no bridge has connected to this broker",
            hint=f"{start_hint}; check --prefix if it uses another one",
        )
    try:
        presence = decode(BridgePresence, payload)
    except ContractError as exc:
        return Check(
            name,
            Level.FAIL,
            f"retained payload on {topic} is invalid: {exc}",
            hint=f"clear it with `mosquitto_pub -r -n -t {topic}` and restart the bridge",
        )
    data = presence.model_dump(mode="json", exclude_none=True)
    who = f"instance {presence.instance}" + (f" ({presence.version})" if presence.version else "")
    if presence.state.value == "lost":
        return Check(
            name,
            Level.FAIL,
            f"{who} lost its connection: the broker published its Last Will",
            hint=f"the bridge crashed or its network broke; check its logs, then {start_hint}",
            data=data,
        )
    if presence.state.value == "offline":
        return Check(
            name,
            Level.FAIL,
            f"{who} was stopped cleanly; no bridge is updating the table",
            hint=start_hint,
            data=data,
        )
    since = f" since {clock(presence.ts)} ({ago(presence.ts, now_ms)})" if presence.ts else ""
    details: list[str] = []
    level = Level.OK
    if presence.ts is not None and presence.ts > now_ms + DEFAULT_SKEW_THRESHOLD_MS:
        level = Level.WARN
        details.append("its birth is timestamped in the future: the bridge host's clock is ahead")
    born = presence.ts or 0
    others = {
        writer: at
        for writer, at in (last_writes or {}).items()
        if writer != presence.instance and at > born
    }
    if others:
        level = Level.WARN
        for writer, at in sorted(others.items()):
            details.append(f"instance {writer} wrote at {clock(at)}, after this birth")
        details.append(
            "several instances share one presence topic: it shows only the last to connect"
        )
    return Check(
        name,
        level,
        f"online: {who}{since}",
        hint="make sure every instance is running" if others else None,
        details=details,
        data=data,
    )


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


def _last_writes(engine: Engine) -> dict[str, int]:
    stmt = select(HIST.c.writer, func.max(HIST.c.committed_ms).label("at")).group_by(HIST.c.writer)
    with engine.connect() as conn:
        return {row.writer: int(row.at) for row in conn.execute(stmt) if row.writer}


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
                snapshot = await read_retained(
                    client,
                    [bridge_presence_topic(prefix), device_filter(TopicKind.PRESENCE, prefix)],
                    prefix=prefix,
                )
                retained, complete = list(snapshot.messages), snapshot.complete
        except Unreachable as exc:
            checks.append(Check("broker", Level.FAIL, str(exc), hint=exc.hint))
            unreachable = True
        if retained is not None:
            bridge_topic = bridge_presence_topic(prefix)
            payload = next((m.payload for m in retained if m.topic == bridge_topic), None)
            writes = await asyncio.to_thread(_last_writes, engine) if db_ok and engine else {}
            checks.append(judge_bridge_presence(payload, now_ms, prefix=prefix, last_writes=writes))
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
