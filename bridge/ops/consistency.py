"""Does the table agree with the broker's retained presence?

The retained presence topics are the truth the bridge reconciles from; ``kb_connectivity``
is what it wrote. :func:`compare` is pure; :func:`compare_retained_with_table` reads both
sides (the fault-injection tests call it after breaking things).
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Final

from sqlalchemy import Engine, select

from bridge.broker_url import parse_broker_url
from bridge.db.models import Connectivity, Remote
from bridge.db.tables import table_of
from bridge.ops.db import open_ready_engine
from bridge.ops.mqtt import RetainedMessage, connect, read_retained
from bridge.settings import MqttProtocol
from schemas import (
    DEFAULT_PREFIX,
    ContractError,
    PresenceMessage,
    TopicKind,
    decode_presence,
    device_filter,
    parse_topic,
)

CONN = table_of(Connectivity)
REMOTES = table_of(Remote)

MISSING_IN_TABLE: Final = "missing_in_table"
MISSING_ON_BROKER: Final = "missing_on_broker"
STATE_DIFFERS: Final = "state_differs"
SESSION_DIFFERS: Final = "session_differs"
INVALID_RETAINED: Final = "invalid_retained"
_DOWN: Final = frozenset({"offline", "lost"})


@dataclass(frozen=True, slots=True)
class TableState:
    state: str
    session: int


@dataclass(frozen=True, slots=True)
class Mismatch:
    device_id: str
    kind: str
    retained_state: str | None
    retained_session: int | None
    table_state: str | None
    table_session: int | None
    detail: str


@dataclass(frozen=True, slots=True)
class ConsistencyReport:
    #: Devices compared (retained presence or a known table state, not soft-deleted).
    checked: int
    agree: int
    mismatches: tuple[Mismatch, ...]
    #: False when the retained snapshot may be incomplete (marker did not come back).
    snapshot_complete: bool = True
    #: Soft-deleted devices with retained presence: the bridge ignores them on purpose.
    ignored_deleted: int = 0
    #: Retained Wills or offlines of devices with no ``remotes`` row and no stored state:
    #: only a birth creates a device, so the bridge ignores them on purpose too.
    ignored_unknown: int = 0

    @property
    def ok(self) -> bool:
        return not self.mismatches and self.snapshot_complete

    def by_kind(self, kind: str) -> list[Mismatch]:
        return [m for m in self.mismatches if m.kind == kind]

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checked": self.checked,
            "agree": self.agree,
            "snapshot_complete": self.snapshot_complete,
            "ignored_deleted": self.ignored_deleted,
            "ignored_unknown": self.ignored_unknown,
            "mismatches": [asdict(m) for m in self.mismatches],
        }


def decode_retained(
    messages: Iterable[RetainedMessage], prefix: str
) -> dict[str, PresenceMessage | ContractError]:
    """Device id -> its retained presence (or why it does not decode)."""
    out: dict[str, PresenceMessage | ContractError] = {}
    for message in messages:
        try:
            parsed = parse_topic(message.topic, prefix)
        except ContractError:
            continue
        if parsed.kind is not TopicKind.PRESENCE:
            continue
        try:
            out[parsed.device_id] = decode_presence(message.payload)
        except ContractError as exc:
            out[parsed.device_id] = exc
    return out


def compare(
    retained: Mapping[str, PresenceMessage | ContractError],
    table: Mapping[str, TableState],
    deleted: Iterable[str] = (),
    *,
    snapshot_complete: bool = True,
    known: Collection[str] | None = None,
) -> ConsistencyReport:
    """Compare state and session per device.

    ``offline`` and ``lost`` of the same session agree: the state machine keeps the
    first word when a Will follows an announced offline, while the broker keeps the last.
    ``known``: the devices with a ``remotes`` row; when given, a retained Will or offline
    of any other device with no stored state is not a mismatch (no birth, no device).
    """
    gone = set(deleted)
    mismatches: list[Mismatch] = []
    agree = 0
    ignored = 0
    unknown = 0
    devices = sorted(set(retained) | {d for d, row in table.items() if row.state != "unknown"})
    checked = 0
    for device_id in devices:
        if device_id in gone:
            if device_id in retained:
                ignored += 1
            continue
        found = retained.get(device_id)
        row = table.get(device_id)
        if (
            known is not None
            and row is None
            and device_id not in known
            and found is not None
            and not isinstance(found, ContractError)
            and found.state.value in _DOWN
        ):
            unknown += 1
            continue
        checked += 1
        problem = _mismatch(device_id, found, row, snapshot_complete)
        if problem is None:
            agree += 1
        else:
            mismatches.append(problem)
    return ConsistencyReport(
        checked=checked,
        agree=agree,
        mismatches=tuple(mismatches),
        snapshot_complete=snapshot_complete,
        ignored_deleted=ignored,
        ignored_unknown=unknown,
    )


def _mismatch(
    device_id: str,
    found: PresenceMessage | ContractError | None,
    row: TableState | None,
    snapshot_complete: bool,
) -> Mismatch | None:
    table_state = row.state if row else None
    table_session = row.session if row else None
    if isinstance(found, ContractError):
        return Mismatch(
            device_id,
            INVALID_RETAINED,
            None,
            None,
            table_state,
            table_session,
            f"retained presence does not decode ({found}); the bridge rejects it",
        )
    if found is None:
        if not snapshot_complete or row is None:
            return None
        return Mismatch(
            device_id,
            MISSING_ON_BROKER,
            None,
            None,
            table_state,
            table_session,
            f"table says {table_state} (session {table_session}) but the broker holds no "
            "retained presence; the next bridge start will set it unknown",
        )
    state, session = found.state.value, found.session
    if row is None:
        return Mismatch(
            device_id,
            MISSING_IN_TABLE,
            state,
            session,
            None,
            None,
            f"retained {state} (session {session}) but no kb_connectivity row",
        )
    if session != row.session:
        newer = (
            "broker is ahead of the table"
            if session > row.session
            else ("retained presence is older than the table (a late Will overwrote a birth?)")
        )
        return Mismatch(
            device_id,
            SESSION_DIFFERS,
            state,
            session,
            row.state,
            row.session,
            f"retained {state} session {session} vs table {row.state} session "
            f"{row.session}: {newer}",
        )
    if state == row.state or (state in _DOWN and row.state in _DOWN):
        return None
    return Mismatch(
        device_id,
        STATE_DIFFERS,
        state,
        session,
        row.state,
        row.session,
        f"retained {state} vs table {row.state} (same session {session})",
    )


def load_table(engine: Engine) -> tuple[dict[str, TableState], set[str]]:
    """Stored state per device, and the soft-deleted device ids."""
    with engine.connect() as conn:
        table = {
            row.device_id: TableState(row.state, int(row.session))
            for row in conn.execute(select(CONN.c.device_id, CONN.c.state, CONN.c.session))
        }
        deleted = {
            row.device_identifier
            for row in conn.execute(
                select(REMOTES.c.device_identifier).where(REMOTES.c.deleted_at.is_not(None))
            )
        }
    return table, deleted


def load_known(engine: Engine) -> set[str]:
    """Every device with a ``remotes`` row, soft-deleted or not."""
    with engine.connect() as conn:
        return {row.device_identifier for row in conn.execute(select(REMOTES.c.device_identifier))}


async def compare_snapshot(
    messages: Iterable[RetainedMessage], engine: Engine, prefix: str, *, complete: bool
) -> ConsistencyReport:
    retained = decode_retained(messages, prefix)
    table, deleted = await asyncio.to_thread(load_table, engine)
    known = await asyncio.to_thread(load_known, engine)
    return compare(retained, table, deleted, snapshot_complete=complete, known=known)


async def compare_retained_with_table(
    broker_url: str,
    db_url: str,
    prefix: str = DEFAULT_PREFIX,
    *,
    protocol: MqttProtocol = "auto",
) -> ConsistencyReport:
    """Read the retained presence snapshot and ``kb_connectivity`` and compare them.

    A coroutine: call it with ``await`` (or ``asyncio.run``). Raises
    :class:`bridge.ops.errors.BrokerUnreachable` / ``DatabaseUnreachable``.
    """
    engine = await asyncio.to_thread(open_ready_engine, db_url)
    try:
        async with connect(parse_broker_url(broker_url), protocol=protocol) as client:
            snapshot = await read_retained(
                client, [device_filter(TopicKind.PRESENCE, prefix)], prefix=prefix
            )
        return await compare_snapshot(snapshot.messages, engine, prefix, complete=snapshot.complete)
    finally:
        engine.dispose()
