"""Reading what the bridge wrote, and the checks that decide whether anything was lost."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Engine, select

from bridge.db.models import Connectivity, PresenceHistory, Remote
from bridge.ops.consistency import ConsistencyReport, compare_retained_with_table
from tests.support.bridge_harness import eventually
from tests.support.faults.timing import SETTLE_S
from tests.support.faults.witness import PresenceKey

CONN = Connectivity.__table__
HIST = PresenceHistory.__table__
REMOTES = Remote.__table__

#: Device -> (state, session).
States = Mapping[str, tuple[str, int]]


def table_states(engine: Engine) -> dict[str, tuple[str, int]]:
    with engine.connect() as conn:
        return {
            row.device_id: (row.state, int(row.session))
            for row in conn.execute(select(CONN.c.device_id, CONN.c.state, CONN.c.session))
        }


def legacy_statuses(engine: Engine) -> dict[str, str]:
    with engine.connect() as conn:
        return {
            row.device_identifier: row.status
            for row in conn.execute(select(REMOTES.c.device_identifier, REMOTES.c.status))
        }


def flapping_devices(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return {
            row.device_id
            for row in conn.execute(select(CONN.c.device_id).where(CONN.c.flapping.is_(True)))
        }


def history_rows(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(HIST).order_by(HIST.c.id)).all())


def history_keys(rows: list[Any]) -> set[PresenceKey]:
    return {(row.device_id, row.state, int(row.session)) for row in rows}


def session_regressions(rows: list[Any]) -> list[str]:
    """Applied events whose session is below one already applied for the device: a stale
    state written. (Fault tests keep the "reset" rule out of reach, so none may exist.)"""
    newest: dict[str, int] = {}
    found: list[str] = []
    for row in rows:
        if row.verdict not in ("applied", "reset"):
            continue
        session = int(row.session)
        if session < newest.get(row.device_id, 0):
            found.append(f"{row.device_id}: session {session} after {newest[row.device_id]}")
        newest[row.device_id] = max(session, newest.get(row.device_id, 0))
    return found


def differences(engine: Engine, truth: States) -> dict[str, Any]:
    """Devices whose stored state/session is not ``truth``, or whose CMS status is not
    Connected for online (unless flap-damped) and Disconnected otherwise."""
    table = table_states(engine)
    problems: dict[str, Any] = {
        device: {"want": want, "table": table.get(device)}
        for device, want in truth.items()
        if table.get(device) != want
    }
    legacy = legacy_statuses(engine)
    damped = flapping_devices(engine)
    for device, (state, _session) in truth.items():
        # Flap damping holds a bouncing device Disconnected (README, "Flap damping").
        want = "Connected" if state == "online" and device not in damped else "Disconnected"
        if legacy.get(device) != want:
            problems.setdefault(device, f"remotes.status {legacy.get(device)} != {want}")
    return problems


async def table_matches(engine: Engine, truth: States, *, within: float = SETTLE_S) -> None:
    """Until the table holds exactly ``truth`` (see :func:`differences`)."""
    await eventually(
        lambda: asyncio.to_thread(differences, engine, truth),
        lambda problems: not problems,
        within=within,
        what="table equal to the devices' real state",
    )


async def consistent(
    broker_url: str, db_url: str, *, within: float = SETTLE_S
) -> ConsistencyReport:
    """Until the consistency checker finds the table equal to the retained truth."""
    return await eventually(
        lambda: compare_retained_with_table(broker_url, db_url),
        lambda report: report.ok and report.checked > 0,
        within=within,
        what="table == retained truth (bridge.ops.consistency)",
    )
