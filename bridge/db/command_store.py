"""Commands in SQL: the outbox, fenced state changes, retries and expiry.

Every state change is a conditional UPDATE (``WHERE state IN (...)``), so a late
signal never moves a command backwards and two bridge instances never both claim the
same send. Blocking: the service calls these methods from its database thread.
"""

from __future__ import annotations

import json
import logging
import random
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    and_,
    bindparam,
    func,
    insert,
    or_,
    select,
    update,
)

from bridge.commands.lifecycle import OPEN_STATES, SUPERSEDABLE, CommandState, advance
from bridge.db.dialect import capabilities
from bridge.db.models import CommandRecord, Connectivity, DeviceConfigRecord, Remote
from bridge.db.presence_store import chunks
from bridge.db.rows import utc_naive
from bridge.db.tables import table_of
from schemas import Ack, AckState, Command

log = logging.getLogger(__name__)

CMD = table_of(CommandRecord)
CONN = table_of(Connectivity)
CFG = table_of(DeviceConfigRecord)
REMOTES = table_of(Remote)

_OPEN = [s.value for s in OPEN_STATES]
_IN_FLIGHT = [CommandState.SENT.value, CommandState.DELIVERED.value]
#: Received by the device, its result not in yet. The result ack can be lost after the
#: broker acknowledged it to the bridge (a bridge killed before writing it): such a
#: command is re-sent on the same schedule, and the device, which remembers the id,
#: answers with its result instead of running it again. No attempt limit: a long run
#: answers ``received`` each time and ends at its TTL at the latest.
_AWAITING_RESULT = [*_IN_FLIGHT, CommandState.RECEIVED.value]
_ACK_TO_STATE = {
    AckState.RECEIVED: CommandState.RECEIVED,
    AckState.SUCCEEDED: CommandState.SUCCEEDED,
    AckState.FAILED: CommandState.FAILED,
    AckState.REJECTED: CommandState.REJECTED,
}


@dataclass(frozen=True, slots=True)
class NewCommand:
    device_id: str
    type: str
    args: dict[str, Any]
    ttl_s: float
    requested_by: str | None = None
    reason: str | None = None
    id: str | None = None


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A command claimed for (re)sending, with what the wire payload needs."""

    id: str
    device_id: str
    type: str
    args: dict[str, Any]
    created_at: datetime
    expires_at: datetime
    attempts: int


@dataclass(frozen=True, slots=True)
class AckOutcome:
    command_id: str
    #: applied | duplicate (did not move the state) | unknown_command | wrong_device
    verdict: str
    state: str | None = None
    device_id: str | None = None


def _outgoing(row: Any, *, attempts: int | None = None) -> Outgoing:
    return Outgoing(
        id=row.id,
        device_id=row.device_id,
        type=row.type,
        args=json.loads(row.args or "{}"),
        created_at=row.created_at,
        expires_at=row.expires_at,
        attempts=int(row.attempts) if attempts is None else attempts,
    )


_SET_RETRY_AT = (
    update(CMD).where(CMD.c.id == bindparam("p_id")).values(retry_at=bindparam("p_retry_at"))
)


class CommandStore:
    def __init__(
        self,
        engine: Engine,
        *,
        clock: Callable[[], int],
        ack_timeout_s: float = 15.0,
        retry_cap_s: float = 120.0,
        max_attempts: int = 5,
        rng: random.Random | None = None,
    ) -> None:
        self._engine = engine
        self._caps = capabilities(engine)
        self._clock = clock
        self._ack_timeout_s = ack_timeout_s
        self._retry_cap_s = retry_cap_s
        self._max_attempts = max_attempts
        self._rng = rng or random.Random()

    def _now(self) -> datetime:
        return utc_naive(self._clock())

    def _retry_at(self, now: datetime, attempts: int) -> datetime:
        # Equal jitter: never sooner than half the ceiling, so a device that is slow to
        # ack is not hammered, yet a fleet-wide resend is spread out.
        ceiling = min(self._retry_cap_s, self._ack_timeout_s * 2 ** max(0, attempts - 1))
        return now + timedelta(seconds=self._rng.uniform(ceiling / 2, ceiling))

    # -- entering -----------------------------------------------------------------------

    def enqueue(self, commands: Sequence[NewCommand]) -> list[str]:
        """Insert ``queued`` rows; a newer refresh/reconnect/set_config supersedes an
        older one for the same device that has not been sent yet."""
        with self._engine.begin() as conn:
            return self.enqueue_in(conn, commands)

    def enqueue_in(self, conn: Connection, commands: Sequence[NewCommand]) -> list[str]:
        """:meth:`enqueue` inside the caller's transaction, for rows that must appear
        together with others (a token rotation and its command)."""
        now = self._now()
        ids: list[str] = []
        rows: list[dict[str, Any]] = []
        for command in commands:
            command_id = command.id or str(uuid.uuid4())
            ids.append(command_id)
            rows.append(
                {
                    "id": command_id,
                    "device_id": command.device_id,
                    "type": command.type,
                    "args": json.dumps(command.args, sort_keys=True),
                    "state": CommandState.QUEUED.value,
                    "created_at": now,
                    "expires_at": now + timedelta(seconds=command.ttl_s),
                    "attempts": 0,
                    "requested_by": command.requested_by,
                    "reason": command.reason,
                }
            )
        # Supersede first, so the rows inserted below are never candidates.
        by_type: dict[str, list[str]] = {}
        for command in commands:
            if command.type in SUPERSEDABLE:
                by_type.setdefault(command.type, []).append(command.device_id)
        for type_, devices in by_type.items():
            for part in chunks(sorted(set(devices))):
                conn.execute(
                    update(CMD)
                    .where(
                        CMD.c.device_id.in_(part),
                        CMD.c.type == type_,
                        CMD.c.state == CommandState.QUEUED.value,
                    )
                    .values(
                        state=CommandState.SUPERSEDED.value,
                        finished_at=now,
                        last_error="superseded by a newer command",
                    )
                )
        for part in chunks(rows):
            conn.execute(insert(CMD), list(part))
        return ids

    def bump_config(
        self, conn: Connection, device_id: str, changes: dict[str, Any]
    ) -> dict[str, Any]:
        """Merge ``changes`` into the device's desired config under a new version, store
        it (and ``remotes.remote_control_enabled``), and return the whole config."""
        row = conn.execute(select(CFG).where(CFG.c.device_id == device_id)).first()
        current = (
            {
                "remote_control_enabled": bool(row.remote_control_enabled),
                "status_interval_s": int(row.status_interval_s),
                "display_url": row.display_url,
            }
            if row is not None
            else {"remote_control_enabled": False, "status_interval_s": 30, "display_url": None}
        )
        config = {**current, **changes, "version": (int(row.version) if row else 0) + 1}
        values = {**config, "updated_at": self._now()}
        if row is None:
            conn.execute(insert(CFG).values(device_id=device_id, **values))
        else:
            conn.execute(update(CFG).where(CFG.c.device_id == device_id).values(**values))
        conn.execute(
            update(REMOTES)
            .where(REMOTES.c.device_identifier == device_id, REMOTES.c.deleted_at.is_(None))
            .values(remote_control_enabled=config["remote_control_enabled"])
        )
        return config

    def cancel(self, ids: Sequence[str], why: str = "cancelled") -> int:
        now = self._now()
        with self._engine.begin() as conn:
            result = conn.execute(
                update(CMD)
                .where(CMD.c.id.in_(list(ids)), CMD.c.state.in_(_OPEN))
                .values(state=CommandState.CANCELLED.value, finished_at=now, last_error=why)
            )
        return int(result.rowcount or 0)

    # -- sending ------------------------------------------------------------------------------

    def claim_due(self, limit: int) -> list[Outgoing]:
        """Claim queued commands of online devices, and unacknowledged ones whose retry
        time has come; each is returned once, to exactly one claimer."""
        now = self._now()
        online = select(CONN.c.device_id).where(CONN.c.state == "online")
        with self._engine.begin() as conn:
            self._supersede_outbox_duplicates(conn, now)
            fresh = conn.execute(
                select(CMD)
                .where(
                    CMD.c.state == CommandState.QUEUED.value,
                    CMD.c.expires_at > now,
                    CMD.c.device_id.in_(online),
                )
                .order_by(CMD.c.created_at)
                .limit(limit)
            ).all()
            again = conn.execute(
                select(CMD)
                .where(
                    or_(
                        and_(
                            CMD.c.state.in_(_IN_FLIGHT),
                            CMD.c.attempts < self._max_attempts,
                        ),
                        CMD.c.state == CommandState.RECEIVED.value,
                    ),
                    CMD.c.retry_at <= now,
                    CMD.c.expires_at > now,
                    CMD.c.device_id.in_(online),
                )
                .order_by(CMD.c.retry_at)
                .limit(max(0, limit - len(fresh)))
            ).all()
            token = str(uuid.uuid4())
            for rows_, sent_state in ((fresh, CommandState.QUEUED), (again, None)):
                ids = [row.id for row in rows_]
                for part in chunks(ids):
                    # Set-based: one UPDATE claims the batch; ``claim`` tells which rows
                    # this call won if another bridge claimed some first.
                    where: list[ColumnElement[bool]] = [CMD.c.id.in_(part)]
                    if sent_state is not None:
                        where.append(CMD.c.state == sent_state.value)
                    else:
                        where += [CMD.c.state.in_(_AWAITING_RESULT), CMD.c.retry_at <= now]
                    conn.execute(
                        update(CMD)
                        .where(*where)
                        .values(
                            state=CommandState.SENT.value
                            if sent_state is not None
                            else CMD.c.state,
                            sent_at=now,
                            attempts=CMD.c.attempts + 1,
                            claim=token,
                        )
                    )
            won = conn.execute(select(CMD).where(CMD.c.claim == token)).all()
            if won:
                conn.execute(
                    _SET_RETRY_AT,
                    [
                        {"p_id": row.id, "p_retry_at": self._retry_at(now, int(row.attempts))}
                        for row in won
                    ],
                )
            return [_outgoing(row, attempts=int(row.attempts) - 1) for row in won]

    def _supersede_outbox_duplicates(self, conn: Connection, now: datetime) -> None:
        """Rows the CMS inserted directly skip :meth:`enqueue`; apply the rule here."""
        dupes = conn.execute(
            select(CMD.c.device_id, CMD.c.type, func.max(CMD.c.created_at).label("newest"))
            .where(CMD.c.state == CommandState.QUEUED.value, CMD.c.type.in_(SUPERSEDABLE))
            .group_by(CMD.c.device_id, CMD.c.type)
            .having(func.count() > 1)
        ).all()
        for row in dupes:
            conn.execute(
                update(CMD)
                .where(
                    CMD.c.device_id == row.device_id,
                    CMD.c.type == row.type,
                    CMD.c.state == CommandState.QUEUED.value,
                    CMD.c.created_at < row.newest,
                )
                .values(
                    state=CommandState.SUPERSEDED.value,
                    finished_at=now,
                    last_error="superseded by a newer command",
                )
            )

    def mark_delivered(self, ids: Sequence[str]) -> None:
        """PUBACK from the broker; fills ``delivered_at`` even when an ack got there first."""
        if not ids:
            return
        now = self._now()
        with self._engine.begin() as conn:
            for part in chunks(list(ids)):
                conn.execute(
                    update(CMD)
                    .where(CMD.c.id.in_(part), CMD.c.state == CommandState.SENT.value)
                    .values(state=CommandState.DELIVERED.value, delivered_at=now)
                )
                conn.execute(
                    update(CMD)
                    .where(CMD.c.id.in_(part), CMD.c.delivered_at.is_(None))
                    .values(delivered_at=now)
                )

    def mark_send_failed(self, ids: Sequence[str], error: str) -> None:
        """The publish itself failed (broker gone): due again at once."""
        now = self._now()
        with self._engine.begin() as conn:
            conn.execute(
                update(CMD)
                .where(CMD.c.id.in_(list(ids)), CMD.c.state.in_(_AWAITING_RESULT))
                .values(retry_at=now, last_error=error[:500])
            )

    # -- answers -----------------------------------------------------------------------------

    def apply_acks(self, acks: Sequence[tuple[str, Ack, int]]) -> list[AckOutcome]:
        """Apply device acks ``(topic device, ack, received_ms)`` in order."""
        outcomes: list[AckOutcome] = []
        if not acks:
            return outcomes
        with self._engine.begin() as conn:
            ids = sorted({str(ack.id) for _, ack, _ in acks})
            rows = {
                row.id: row
                for part in chunks(ids)
                for row in conn.execute(select(CMD).where(CMD.c.id.in_(part)))
            }
            states = {cid: CommandState(row.state) for cid, row in rows.items()}
            wiped = sorted(
                {
                    row.device_id
                    for _, ack, _ in acks
                    if (row := rows.get(str(ack.id))) is not None
                    and row.type == "wipe"
                    and _ACK_TO_STATE[ack.state] is CommandState.SUCCEEDED
                }
            )
            if wiped:
                # A wipe's success marks its device's connectivity row below, after an
                # earlier ack of the batch may already have updated a command row: lock
                # the connectivity row first (bridge/db/locks.py).
                conn.execute(
                    self._caps.locked(select(CONN.c.device_id).where(CONN.c.device_id.in_(wiped)))
                )
            # A command's acks in one batch (``received`` and ``succeeded`` usually come
            # together) become one UPDATE, fenced on the state read above, carrying the
            # values of every transition in order; the first ``acked_at`` wins.
            transitions: dict[str, tuple[CommandState, dict[str, Any]]] = {}
            for device_id, ack, received_ms in acks:
                cid = str(ack.id)
                row = rows.get(cid)
                if row is None:
                    outcomes.append(AckOutcome(cid, "unknown_command", device_id=device_id))
                    continue
                if row.device_id != device_id:
                    outcomes.append(AckOutcome(cid, "wrong_device", device_id=device_id))
                    continue
                target = _ACK_TO_STATE[ack.state]
                at = utc_naive(received_ms)
                new = advance(states[cid], target)
                values: dict[str, Any] = {}
                if target is CommandState.RECEIVED or new is not None:
                    values["acked_at"] = func.coalesce(CMD.c.acked_at, at)
                    # An ack proves delivery: a command the device answered before its
                    # PUBACK was recorded never reads as finished but undelivered.
                    values["delivered_at"] = func.coalesce(CMD.c.delivered_at, at)
                if new is None:
                    # A pending transition of this command already sets acked_at first.
                    if values and cid not in transitions:
                        conn.execute(update(CMD).where(CMD.c.id == cid).values(**values))
                    outcomes.append(AckOutcome(cid, "duplicate", states[cid].value, device_id))
                    continue
                values["state"] = new.value
                if new.terminal:
                    values["finished_at"] = at
                    values["detail"] = ack.detail
                    values["retry_at"] = None
                    if new is CommandState.FAILED or new is CommandState.REJECTED:
                        values["last_error"] = ack.detail or new.value
                fence, merged = transitions.get(cid, (states[cid], {}))
                if "acked_at" in merged:
                    del values["acked_at"], values["delivered_at"]
                merged.update(values)
                transitions[cid] = (fence, merged)
                states[cid] = new
                outcomes.append(AckOutcome(cid, "applied", new.value, device_id))
                if new is CommandState.SUCCEEDED and row.type == "wipe":
                    conn.execute(
                        update(CONN)
                        .where(CONN.c.device_id == device_id)
                        .values(needs_provisioning=True)
                    )
            for cid, (fence, values) in transitions.items():
                conn.execute(
                    update(CMD).where(CMD.c.id == cid, CMD.c.state == fence.value).values(**values)
                )
        return outcomes

    def observe(self, device_id: str, command: Command, received_ms: int) -> bool:
        """Track a command another client published on a ``cmd`` topic; ``False`` when
        the id is already known (the bridge's own, or seen before)."""
        cid = str(command.id)
        with self._engine.begin() as conn:
            if conn.execute(select(CMD.c.id).where(CMD.c.id == cid)).first() is not None:
                return False
            now = utc_naive(received_ms)
            conn.execute(
                insert(CMD).values(
                    id=cid,
                    device_id=device_id,
                    type=command.type,
                    args=json.dumps(command.args, sort_keys=True),
                    state=CommandState.SENT.value,
                    created_at=utc_naive(command.issued_at),
                    sent_at=now,
                    expires_at=utc_naive(command.expires_at),
                    attempts=1,
                    requested_by="observed:mqtt",
                )
            )
        return True

    # -- time-driven ---------------------------------------------------------------------------

    def sweep(self) -> dict[str, int]:
        """Expire what outlived its TTL; fail what ran out of attempts."""
        now = self._now()
        with self._engine.begin() as conn:
            expired = conn.execute(
                update(CMD)
                .where(CMD.c.state.in_(_OPEN), CMD.c.expires_at <= now)
                .values(
                    state=CommandState.EXPIRED.value,
                    finished_at=now,
                    last_error="expired before the device acknowledged it",
                    retry_at=None,
                )
            ).rowcount
            exhausted = conn.execute(
                update(CMD)
                .where(
                    and_(
                        CMD.c.state.in_(_IN_FLIGHT),
                        CMD.c.attempts >= self._max_attempts,
                        CMD.c.retry_at <= now,
                    )
                )
                .values(
                    state=CommandState.FAILED.value,
                    finished_at=now,
                    last_error=f"no acknowledgement after {self._max_attempts} attempts",
                    retry_at=None,
                )
            ).rowcount
        return {"expired": int(expired or 0), "failed": int(exhausted or 0)}

    def get(self, ids: Sequence[str]) -> list[Any]:
        with self._engine.connect() as conn:
            return [
                row
                for part in chunks(list(ids))
                for row in conn.execute(select(CMD).where(CMD.c.id.in_(part)))
            ]
