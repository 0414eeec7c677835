"""``db check``: rows of the bridge's tables that do not fit together, and the fixes that
are safe to make without a human.

The bridge keeps its tables consistent itself, but it shares a database with the CMS
(which inserts commands, soft-deletes and hard-deletes ``remotes`` rows) and older
bridge versions left rows a current one would never write (issue 14: connectivity rows
made by Wills of devices that had no ``remotes`` row; status sessions a forged status
moved ahead of presence). Each check is one set-based query; each fix one set-based
statement that repeats the check's condition, so a row that became consistent between
the check and the fix is left alone. Credentials, device configuration and HTTP rows
are reported only: the broker holds its own copy of a credential (revoke it with
``kiosk-bridge device revoke``), and a configuration or token row may be wanted back
when the CMS re-creates the device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Final

from sqlalchemy import (
    ColumnElement,
    Engine,
    Select,
    and_,
    delete,
    exists,
    func,
    not_,
    select,
    update,
)
from sqlalchemy.sql.dml import Delete, Update

from bridge.commands.lifecycle import CommandState
from bridge.db.models import CommandRecord, Connectivity, DeviceConfigRecord, HttpDevice, Remote
from bridge.db.rows import utc_naive
from bridge.db.security_models import CredentialState, DeviceCredential
from bridge.db.tables import table_of
from bridge.presence import ConnState

CONN = table_of(Connectivity)
CMD = table_of(CommandRecord)
CONFIG = table_of(DeviceConfigRecord)
HTTP = table_of(HttpDevice)
REMOTES = table_of(Remote)
CRED = table_of(DeviceCredential)

#: Device ids shown per finding; the count is always complete.
SAMPLE: Final = 10
#: ``kb_commands.last_error`` of a command ``--fix`` ended.
FIXED_BY: Final = "ended by kiosk-bridge db check: "

_CONN_STATES = [state.value for state in ConnState]
_COMMAND_STATES = [state.value for state in CommandState]
_TERMINAL = [state.value for state in CommandState if state.terminal]
_NOT_TERMINAL = [state.value for state in CommandState if not state.terminal]


def _has_remote(device_id: Any) -> ColumnElement[bool]:
    return exists().where(REMOTES.c.device_identifier == device_id)


def _has_live_remote(device_id: Any) -> ColumnElement[bool]:
    return exists().where(REMOTES.c.device_identifier == device_id, REMOTES.c.deleted_at.is_(None))


def _has_deleted_remote(device_id: Any) -> ColumnElement[bool]:
    return exists().where(
        REMOTES.c.device_identifier == device_id, REMOTES.c.deleted_at.is_not(None)
    )


#: A fix: the statement for a database time ``now_ms``.
Fix = Callable[[int], Update | Delete]


@dataclass(frozen=True, slots=True)
class Check:
    kind: str
    #: The table whose rows are inconsistent, and the device id column shown.
    table: Any
    id_column: Any
    condition: ColumnElement[bool]
    detail: str
    #: What ``--fix`` does (``None``: reported only) and how.
    fix_text: str | None = None
    fix: Fix | None = None
    hint: str | None = None


def _checks() -> tuple[Check, ...]:
    open_commands = CMD.c.state.in_(_NOT_TERMINAL)
    return (
        Check(
            "orphan_connectivity",
            CONN,
            CONN.c.device_id,
            not_(_has_remote(CONN.c.device_id)),
            "kb_connectivity rows of a device with no remotes row (older bridges stored "
            "the Will of a device never born; the CMS may have removed the row)",
            "deleted: the device's next birth creates both rows",
            lambda _now: delete(CONN).where(not_(_has_remote(CONN.c.device_id))),
        ),
        Check(
            "connectivity_bad_state",
            CONN,
            CONN.c.device_id,
            CONN.c.state.not_in(_CONN_STATES),
            f"kb_connectivity.state is none of {', '.join(_CONN_STATES)}",
            "set unknown (what reconciliation does when the broker holds no presence); "
            "the device's next presence event sets it",
            lambda now: (
                update(CONN)
                .where(CONN.c.state.not_in(_CONN_STATES))
                .values(
                    state=ConnState.UNKNOWN.value, reason="db_check", since_ms=now, updated_ms=now
                )
            ),
        ),
        Check(
            "status_session_ahead",
            CONN,
            CONN.c.device_id,
            CONN.c.status_session > CONN.c.session,
            "stored telemetry is of a session newer than the device's presence session (a "
            "status of a session without a birth, applied before the telemetry fence; or "
            "a reset to a lower session with no status since)",
            "the stored telemetry position is moved to the presence session, so that its "
            "next status is taken (remotes' values stay until then)",
            lambda _now: (
                update(CONN)
                .where(CONN.c.status_session > CONN.c.session)
                .values(status_session=CONN.c.session, last_seq=-1)
            ),
        ),
        Check(
            "command_of_missing_device",
            CMD,
            CMD.c.device_id,
            and_(open_commands, not_(_has_live_remote(CMD.c.device_id))),
            "commands not finished for a device with no remotes row or a soft-deleted one: "
            "nobody can act on them",
            "cancelled, with the reason in last_error",
            lambda now: (
                update(CMD)
                .where(open_commands, not_(_has_live_remote(CMD.c.device_id)))
                .values(
                    state=CommandState.CANCELLED.value,
                    finished_at=utc_naive(now),
                    retry_at=None,
                    last_error=FIXED_BY + "the device has no remotes row (or a soft-deleted one)",
                )
            ),
        ),
        Check(
            "command_unknown_state",
            CMD,
            CMD.c.device_id,
            CMD.c.state.not_in(_COMMAND_STATES),
            f"kb_commands.state is none of {', '.join(_COMMAND_STATES)}: the bridge never "
            "sends nor ends such a command",
            "cancelled, with the reason in last_error",
            lambda now: (
                update(CMD)
                .where(CMD.c.state.not_in(_COMMAND_STATES))
                .values(
                    state=CommandState.CANCELLED.value,
                    finished_at=func.coalesce(CMD.c.finished_at, utc_naive(now)),
                    retry_at=None,
                    last_error=FIXED_BY + "unknown state",
                )
            ),
        ),
        Check(
            "command_finished_without_time",
            CMD,
            CMD.c.device_id,
            and_(CMD.c.state.in_(_TERMINAL), CMD.c.finished_at.is_(None)),
            "commands in a final state with no finished_at: the CMS's event feed, which "
            "reads finished_at, never reports them",
            "finished_at set to the command's last known time (acked, delivered, sent or created)",
            lambda _now: (
                update(CMD)
                .where(CMD.c.state.in_(_TERMINAL), CMD.c.finished_at.is_(None))
                .values(
                    finished_at=func.coalesce(
                        CMD.c.acked_at, CMD.c.delivered_at, CMD.c.sent_at, CMD.c.created_at
                    )
                )
            ),
        ),
        Check(
            "command_open_but_finished",
            CMD,
            CMD.c.device_id,
            and_(open_commands, CMD.c.finished_at.is_not(None)),
            "commands not in a final state but with a finished_at: which one is wrong "
            "cannot be told",
            hint="look at it with 'kiosk-bridge device show ID'; the bridge still treats it "
            "as open",
        ),
        Check(
            "command_sent_without_time",
            CMD,
            CMD.c.device_id,
            and_(
                CMD.c.state.in_(
                    [
                        CommandState.SENT.value,
                        CommandState.DELIVERED.value,
                        CommandState.RECEIVED.value,
                    ]
                ),
                CMD.c.sent_at.is_(None),
            ),
            "commands past 'queued' with no sent_at: the bridge never writes them so "
            "(another program did), and their timings and retries cannot be trusted",
            hint="cancel them in the CMS, or let them expire",
        ),
        Check(
            "credential_of_missing_device",
            CRED,
            CRED.c.device_id,
            and_(
                CRED.c.state == CredentialState.ACTIVE.value,
                not_(_has_remote(CRED.c.device_id)),
            ),
            "active credentials of a device with no remotes row: it can still connect, and "
            "its birth re-creates the device",
            hint="kiosk-bridge device revoke ID (the broker keeps its own copy: db check "
            "never changes credentials)",
        ),
        Check(
            "credential_of_deleted_device",
            CRED,
            CRED.c.device_id,
            and_(
                CRED.c.state == CredentialState.ACTIVE.value,
                _has_deleted_remote(CRED.c.device_id),
            ),
            "active credentials of a device soft-deleted in the CMS (not through 'kiosk-"
            "bridge device delete'): it can still connect",
            hint="kiosk-bridge device revoke ID (the broker keeps its own copy: db check "
            "never changes credentials)",
        ),
        Check(
            "config_of_missing_device",
            CONFIG,
            CONFIG.c.device_id,
            not_(_has_remote(CONFIG.c.device_id)),
            "kb_device_config rows of a device with no remotes row",
            hint="kept: the CMS may re-create the device, and a lower config version would "
            "then be ignored by it; delete the rows if the devices are gone for good",
        ),
        Check(
            "http_device_of_missing_device",
            HTTP,
            HTTP.c.device_id,
            not_(_has_remote(HTTP.c.device_id)),
            "kb_http_devices rows of a device with no remotes row",
            hint="kept: harmless (a heartbeat needs the remotes row); delete them if the "
            "devices are gone for good",
        ),
    )


@dataclass(frozen=True, slots=True)
class Finding:
    kind: str
    table: str
    #: Rows in this state now (after ``--fix``: what is left).
    count: int
    #: Some of their device ids, sorted.
    sample: tuple[str, ...]
    detail: str
    #: What ``--fix`` does for these rows; ``None``: reported only.
    fix: str | None
    #: Rows ``--fix`` changed (0 without ``--fix``).
    fixed: int = 0
    hint: str | None = None

    @property
    def ok(self) -> bool:
        return self.count == 0


@dataclass(frozen=True, slots=True)
class DbCheckReport:
    findings: tuple[Finding, ...]
    fixed: bool

    @property
    def problems(self) -> tuple[Finding, ...]:
        return tuple(finding for finding in self.findings if not finding.ok)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "fix": self.fixed,
            "fixed_rows": sum(finding.fixed for finding in self.findings),
            "problems": sum(finding.count for finding in self.findings),
            "checks": [asdict(finding) for finding in self.findings],
        }


def _count(conn: Any, check: Check) -> tuple[int, tuple[str, ...]]:
    base: Select[Any] = select(check.id_column).where(check.condition)
    count = int(conn.execute(select(func.count()).select_from(base.subquery())).scalar_one())
    if not count:
        return 0, ()
    sample = conn.execute(
        select(check.id_column)
        .where(check.condition)
        .group_by(check.id_column)
        .order_by(check.id_column)
        .limit(SAMPLE)
    ).scalars()
    return count, tuple(str(device_id) for device_id in sample)


def check_database(engine: Engine, *, fix: bool = False, now_ms: int = 0) -> DbCheckReport:
    """Run every check; with ``fix``, apply the safe fixes (one transaction each) and
    report what is left. ``now_ms``: the time fixes record."""
    findings: list[Finding] = []
    for check in _checks():
        with engine.connect() as conn:
            count, sample = _count(conn, check)
        fixed = 0
        if fix and count and check.fix is not None:
            with engine.begin() as conn:
                fixed = int(conn.execute(check.fix(now_ms)).rowcount or 0)
            with engine.connect() as conn:
                count, sample = _count(conn, check)
        findings.append(
            Finding(
                kind=check.kind,
                table=check.table.name,
                count=count,
                sample=sample,
                detail=check.detail,
                fix=check.fix_text,
                fixed=fixed,
                hint=check.hint,
            )
        )
    return DbCheckReport(tuple(findings), fixed=fix)
