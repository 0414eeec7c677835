"""Every store's transactions take their row locks in bridge.db.locks.LOCK_ORDER, on the
two databases where the order matters (MariaDB and PostgreSQL). The statements each
transaction sends are recorded on the real connection; a statement that writes a table
(UPDATE, INSERT, DELETE) or reads it FOR UPDATE locks rows of that table."""

from __future__ import annotations

import re
import secrets
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, event, update

from bridge.clock import now_ms
from bridge.db.command_store import CommandStore
from bridge.db.device_store import DeviceStore, Registration
from bridge.db.engine import create_schema, make_engine
from bridge.db.http_models import create_http_schema
from bridge.db.locks import APPEND_ONLY, LOCK_ORDER, out_of_order
from bridge.db.models import CommandRecord
from bridge.db.presence_store import PresenceItem, PresenceStore
from bridge.db.security_models import create_security_schema
from bridge.db.security_store import SecurityStore
from bridge.db.status_store import StatusItem, StatusStore
from bridge.db.tables import table_of
from bridge.outbox.api import enqueue
from bridge.passwords import hash_password, new_token
from bridge.presence import ConnState, PresenceEvent, PresenceRules
from bridge.security.operations import request_rotation
from schemas import Ack, AckState, Status
from schemas.provisioning import ProvisionRequest

_TABLES = "|".join((*LOCK_ORDER, *APPEND_ONLY))
_FOR_UPDATE_FROM = re.compile(rf"\bFROM\s+({_TABLES})\b")
_NAMED = re.compile(rf"\b({_TABLES})\b")
_HEAD_END = re.compile(r"\bSET\b|\bVALUES\b|\bWHERE\b|\bSELECT\b", re.IGNORECASE)


def _locked_tables(statement: str) -> list[str]:
    text = statement.strip()
    verb = text[:6].upper()
    if verb == "SELECT":
        found = _FOR_UPDATE_FROM.search(text) if "FOR UPDATE" in text.upper() else None
        return [found.group(1)] if found else []
    if verb in ("UPDATE", "INSERT", "DELETE"):
        # The tables named before SET/VALUES/WHERE are the ones written (a MariaDB
        # STRAIGHT_JOIN update names several, in the order it locks them).
        return _NAMED.findall(_HEAD_END.split(text[6:], maxsplit=1)[0])
    return []


class LockSpy:
    """Per transaction, the tables it locked, in order."""

    def __init__(self, engine: Engine) -> None:
        self.transactions: list[list[str]] = []
        self._open: dict[int, list[str]] = {}
        event.listen(engine, "before_cursor_execute", self._statement)
        event.listen(engine, "commit", self._end)
        event.listen(engine, "rollback", self._end)

    def _key(self, conn: Any) -> int:
        return id(conn.connection.dbapi_connection)

    def _statement(self, conn: Any, _cursor: Any, statement: str, *_rest: Any) -> None:
        self._open.setdefault(self._key(conn), []).extend(_locked_tables(statement))

    def _end(self, conn: Any) -> None:
        tables = self._open.pop(self._key(conn), [])
        if tables:
            self.transactions.append(tables)

    def violations(self) -> list[tuple[list[str], tuple[str, str]]]:
        return [(t, bad) for t in self.transactions if (bad := out_of_order(t)) is not None]


@pytest.fixture(
    params=[
        pytest.param("mariadb", marks=pytest.mark.mariadb),
        pytest.param("postgres", marks=pytest.mark.postgres),
    ]
)
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    made = make_engine(str(request.getfixturevalue(f"{request.param}_url")))
    create_schema(made)
    create_security_schema(made)
    create_http_schema(made)
    yield made
    made.dispose()


def _presence(device_id: str, state: ConnState, session: int) -> PresenceItem:
    return PresenceItem(
        PresenceEvent(
            device_id=device_id,
            state=state,
            session=session,
            received_ms=now_ms(),
            device_ts_ms=None,
            reason=None,
        )
    )


def test_the_stores_lock_tables_in_the_one_order(engine: Engine) -> None:
    spy = LockSpy(engine)
    presence = PresenceStore(engine, writer="t", rules=PresenceRules(), grace_ms=0, clock=now_ms)
    presence.apply_presence([_presence(d, ConnState.ONLINE, 5) for d in ("lo-1", "lo-2")])
    StatusStore(engine, writer="t").apply_status(
        [StatusItem("lo-1", Status(session=5, seq=1, ts=1, battery_level=50), now_ms())]
    )
    presence.apply_presence([_presence("lo-1", ConnState.LOST, 5)])

    security = SecurityStore(engine, clock=now_ms)
    first = new_token()
    security.enroll("lo-1", hash_password(first), "test")
    request = ProvisionRequest(device_id="lo-1", nonce=secrets.token_urlsafe(24))
    second = new_token()
    security.record_provisioned(request, second, hash_password(second), "claim-00000001")
    security.open_claim_window("lo-1", 60_000, "test")
    security.record_provisioned(
        request,
        new_token(),
        hash_password(new_token()),
        "claim-00000001",
        granted_by="claim_window",
    )
    request_rotation(security, "lo-1", deadline_s=60, requested_by="test")
    [pending] = security.pending_rotations()
    security.finish_rotation(pending, applied=True, action="rotate_forced", detail="test")
    security.mark_revoked("lo-1", "test", "lock order")
    security.restore("lo-1", "test")

    enqueue(engine, "set_config", ["lo-2"], {"status_interval_s": 60}, requested_by="test")
    [wipe] = enqueue(engine, "wipe", ["lo-2"], {}, reason="lock order", requested_by="test")
    cmd = table_of(CommandRecord)
    with engine.begin() as conn:
        conn.execute(update(cmd).where(cmd.c.id == wipe).values(state="sent", attempts=1))
    acks = [
        ("lo-2", Ack(id=uuid.UUID(wipe), state=state, ts=1), now_ms())
        for state in (AckState.RECEIVED, AckState.SUCCEEDED)
    ]
    assert [o.verdict for o in CommandStore(engine, clock=now_ms).apply_acks(acks)] == [
        "applied",
        "applied",
    ]

    DeviceStore(engine).register(Registration(device_id="lo-3"), now_ms())

    seen = {table for tables in spy.transactions for table in tables}
    # The workload reached every table whose order matters here.
    assert {
        "kb_connectivity",
        "kb_presence_history",
        "remotes",
        "kb_http_devices",
        "kb_device_credentials",
        "kb_previous_credentials",
        "kb_claim_windows",
        "kb_commands",
        "kb_device_config",
    } <= seen
    assert spy.violations() == []


def test_out_of_order_finds_a_pair_against_the_order() -> None:
    assert out_of_order(["kb_connectivity", "remotes", "kb_commands"]) is None
    assert out_of_order(["kb_commands", "kb_connectivity"]) == ("kb_commands", "kb_connectivity")
    # Appending to the history or the audit log anywhere is fine.
    assert out_of_order(["kb_connectivity", "kb_presence_history", "remotes"]) is None
    # Back to a table it holds already: no new lock.
    assert (
        out_of_order(["kb_device_credentials", "kb_previous_credentials", "kb_device_credentials"])
        is None
    )
