"""``kiosk-bridge commands``: the outbox (``kb_commands``) listed, filtered, and one
command's lifecycle, with why an unfinished one has not finished.

Reads only. Filters run in SQL (the table grows with every command ever sent, pruned
after 90 days); :func:`why_pending` is pure over the rows so every wording is tested
without a database.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from sqlalchemy import Engine, select

from bridge.commands.lifecycle import CommandState
from bridge.db.models import CommandRecord, Connectivity
from bridge.db.tables import table_of
from bridge.ops.errors import NotFound, UsageError
from bridge.ops.timefmt import ago, clock, iso_utc, naive_utc_to_ms

CMD = table_of(CommandRecord)
CONN = table_of(Connectivity)

#: Every state of the lifecycle, in its order.
STATES: Final = tuple(state.value for state in CommandState)
FINISHED: Final = frozenset(state.value for state in CommandState if state.terminal)
#: A queued command for an online device is claimed within 0.5 s (the dispatcher's
#: full pass; the outbox probe is faster): four passes later, nobody is dispatching.
UNDISPATCHED_AFTER_MS: Final = 2_000


@dataclass(frozen=True, slots=True)
class CommandFilter:
    states: tuple[str, ...] = ()
    #: Contract spelling (``set_config``); the CLI also takes ``set-config``.
    kinds: tuple[str, ...] = ()
    devices: tuple[str, ...] = ()
    since_ms: int | None = None
    limit: int = 50


@dataclass(frozen=True, slots=True)
class DeviceNow:
    """The device's connectivity as the command's explanation needs it."""

    state: str
    since_ms: int | None
    reason: str | None


@dataclass(frozen=True, slots=True)
class CommandRow:
    id: str
    device_id: str
    kind: str
    state: str
    attempts: int
    created_ms: int
    sent_ms: int | None
    delivered_ms: int | None
    acked_ms: int | None
    finished_ms: int | None
    expires_ms: int
    retry_ms: int | None
    requested_by: str | None
    reason: str | None
    args: str
    detail: str | None
    last_error: str | None
    device: DeviceNow | None = None

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    def to_json(self, now_ms: int) -> dict[str, Any]:
        return {
            "id": self.id,
            "device_id": self.device_id,
            "type": self.kind,
            "state": self.state,
            "attempts": self.attempts,
            "created_at": iso_utc(self.created_ms),
            "sent_at": iso_utc(self.sent_ms),
            "delivered_at": iso_utc(self.delivered_ms),
            "acked_at": iso_utc(self.acked_ms),
            "finished_at": iso_utc(self.finished_ms),
            "expires_at": iso_utc(self.expires_ms),
            "retry_at": iso_utc(self.retry_ms),
            "requested_by": self.requested_by,
            "reason": self.reason,
            "args": self.args,
            "detail": self.detail,
            "last_error": self.last_error,
            "why": why_pending(self, now_ms),
        }


@dataclass(frozen=True, slots=True)
class LifecycleStep:
    at_ms: int | None
    step: str
    note: str


def normalize_kind(kind: str) -> str:
    """``set-config`` as typed on the command line is ``set_config`` in the table."""
    return kind.replace("-", "_")


def list_commands(engine: Engine, flt: CommandFilter) -> list[CommandRow]:
    """Newest first, at most ``flt.limit`` rows, each with its device's state."""
    stmt = _select()
    if flt.states:
        stmt = stmt.where(CMD.c.state.in_(flt.states))
    if flt.kinds:
        stmt = stmt.where(CMD.c.type.in_([normalize_kind(k) for k in flt.kinds]))
    if flt.devices:
        stmt = stmt.where(CMD.c.device_id.in_(flt.devices))
    if flt.since_ms is not None:
        stmt = stmt.where(CMD.c.created_at >= _naive(flt.since_ms))
    stmt = stmt.order_by(CMD.c.created_at.desc(), CMD.c.id).limit(flt.limit)
    with engine.connect() as conn:
        return [_row(r) for r in conn.execute(stmt).all()]


def get_commands(engine: Engine, ids: Sequence[str]) -> list[CommandRow]:
    """The rows of ``ids`` in that order (missing ids left out)."""
    if not ids:
        return []
    with engine.connect() as conn:
        found = {r.id: _row(r) for r in conn.execute(_select().where(CMD.c.id.in_(ids))).all()}
    return [found[i] for i in ids if i in found]


def load_command(engine: Engine, command_id: str) -> CommandRow:
    """One command by its id or a unique prefix of it (``device show`` prints 8
    characters); raises :class:`NotFound` or, for an ambiguous prefix, :class:`UsageError`."""
    with engine.connect() as conn:
        rows = conn.execute(_select().where(CMD.c.id == command_id)).all()
        if not rows and len(command_id) >= 4:
            # A prefix: escape LIKE's wildcards, ids are UUIDs but input is not.
            pattern = command_id.replace("\\", "\\\\").replace("%", r"\%").replace("_", r"\_")
            rows = conn.execute(
                _select().where(CMD.c.id.like(pattern + "%", escape="\\")).limit(5)
            ).all()
    if not rows:
        raise NotFound(
            f"no command {command_id!r} in kb_commands",
            hint="`kiosk-bridge commands --device ID` lists a device's commands",
        )
    if len(rows) > 1:
        raise UsageError(
            f"{command_id!r} is the start of {len(rows)} or more command ids: "
            + ", ".join(r.id for r in rows),
            hint="give more characters of the id",
        )
    return _row(rows[0])


def lifecycle(row: CommandRow) -> list[LifecycleStep]:
    """The command's life as recorded, oldest first. The table keeps the latest send's
    time only: earlier attempts are counted, not timed."""
    steps = [
        LifecycleStep(
            row.created_ms,
            "queued",
            f"by {row.requested_by or '-'}" + (f", reason: {row.reason}" if row.reason else ""),
        )
    ]
    if row.sent_ms is not None:
        retries = f" (attempt {row.attempts}; earlier sends not timed)" if row.attempts > 1 else ""
        steps.append(LifecycleStep(row.sent_ms, "sent", f"published at QoS 1{retries}"))
    if row.delivered_ms is not None:
        steps.append(LifecycleStep(row.delivered_ms, "delivered", "the broker's PUBACK"))
    if row.acked_ms is not None:
        steps.append(LifecycleStep(row.acked_ms, "received", "the device's ack"))
    if row.finished:
        note = row.detail or row.last_error or ""
        steps.append(LifecycleStep(row.finished_ms, row.state, note))
    else:
        if row.retry_ms is not None and row.sent_ms is not None:
            steps.append(LifecycleStep(row.retry_ms, "next retry", "if no ack by then"))
        steps.append(LifecycleStep(row.expires_ms, "expires", "unless finished before"))
    # Acks may arrive before the PUBACK ("ack before PUBACK" is recorded as it happened).
    return sorted(steps, key=lambda s: s.at_ms if s.at_ms is not None else 1 << 62)


def why_pending(row: CommandRow, now_ms: int) -> str | None:
    """Why the command has not finished, or why it finished without succeeding; ``None``
    for a success."""
    state = row.state
    if state == "succeeded":
        return None
    if state == "superseded":
        return (
            "superseded: a newer command of the same kind for the device replaced it "
            "before it was sent"
        )
    if state == "expired":
        return f"expired at {clock(row.expires_ms)} before it finished" + _last_error(row)
    if state in ("failed", "rejected"):
        return f"{state} by the device" + (f": {row.detail}" if row.detail else _last_error(row))
    if state == "cancelled":
        return "cancelled" + _last_error(row)
    if state == "received":
        return f"the device acknowledged it {ago(row.acked_ms, now_ms)} and is running it"
    if state in ("sent", "delivered"):
        retry = f"; next retry {ago(row.retry_ms, now_ms)}" if row.retry_ms else ""
        plural = "s" if row.attempts != 1 else ""
        return f"sent {row.attempts} time{plural}, no ack from the device yet{retry}"
    # queued
    device = row.device
    if device is None or device.state == "unknown":
        return (
            "waiting in the outbox: the bridge has never seen the device online "
            "(no presence recorded)"
        )
    if device.state != "online":
        because = f" ({device.reason})" if device.reason else ""
        return (
            f"waiting in the outbox: device {device.state}{because} since "
            f"{clock(device.since_ms)} ({ago(device.since_ms, now_ms)}); "
            "it is sent when the device comes back"
        )
    online_for = max(row.created_ms, device.since_ms or 0)
    if now_ms - online_for > UNDISPATCHED_AFTER_MS:
        return (
            "not sent although the device is online: no bridge is dispatching from this "
            "database (is `kiosk-bridge run` running with the same --db?)"
        )
    return "queued: the device is online, the bridge sends it within a second"


def _last_error(row: CommandRow) -> str:
    return f" (last error: {row.last_error})" if row.last_error else ""


def _select() -> Any:
    return select(
        CMD,
        CONN.c.state.label("device_state"),
        CONN.c.since_ms.label("device_since_ms"),
        CONN.c.reason.label("device_reason"),
    ).select_from(CMD.outerjoin(CONN, CONN.c.device_id == CMD.c.device_id))


def _naive(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC).replace(tzinfo=None)


def _row(r: Any) -> CommandRow:
    device = None
    if r.device_state is not None:
        device = DeviceNow(
            r.device_state, int(r.device_since_ms) if r.device_since_ms else None, r.device_reason
        )
    return CommandRow(
        id=r.id,
        device_id=r.device_id,
        kind=r.type,
        state=r.state,
        attempts=int(r.attempts),
        created_ms=naive_utc_to_ms(r.created_at) or 0,
        sent_ms=naive_utc_to_ms(r.sent_at),
        delivered_ms=naive_utc_to_ms(r.delivered_at),
        acked_ms=naive_utc_to_ms(r.acked_at),
        finished_ms=naive_utc_to_ms(r.finished_at),
        expires_ms=naive_utc_to_ms(r.expires_at) or 0,
        retry_ms=naive_utc_to_ms(r.retry_at),
        requested_by=r.requested_by,
        reason=r.reason,
        args=r.args,
        detail=r.detail,
        last_error=r.last_error,
        device=device,
    )


def wait_finished(
    engine: Engine,
    ids: Sequence[str],
    *,
    timeout_s: float,
    poll_s: float = 0.2,
    on_poll: Callable[[list[CommandRow]], None] | None = None,
) -> list[CommandRow]:
    """Read ``ids`` every ``poll_s`` until all are finished or ``timeout_s`` passed (a
    bridge in another process finishes them: there is nothing to wait on but the table)."""
    deadline = time.monotonic() + timeout_s
    while True:
        rows = get_commands(engine, ids)
        if on_poll is not None:
            on_poll(rows)
        if all(row.finished for row in rows) or time.monotonic() >= deadline:
            return rows
        time.sleep(poll_s)
