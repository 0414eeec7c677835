"""A token rotation and its command appear in the database together or not at all
(real SQLite): the bridge's rotation check must never find one without the other."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError

from bridge.clock import now_ms
from bridge.db.command_store import CommandStore, NewCommand
from bridge.db.engine import create_schema, make_engine
from bridge.db.models import CommandRecord
from bridge.db.security_models import DeviceCredential
from bridge.db.security_store import SecurityStore
from bridge.passwords import hash_password, new_token
from bridge.security import operations
from bridge.security.operations import request_rotation


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = make_engine(f"sqlite:///{tmp_path / 'rot.db'}")
    create_schema(engine)
    yield engine
    engine.dispose()


def _rotation(engine: Engine, device_id: str) -> str | None:
    with engine.connect() as conn:
        return conn.execute(
            select(DeviceCredential.rotation_command_id).where(
                DeviceCredential.device_id == device_id
            )
        ).scalar_one()


def test_a_rotation_is_pending_exactly_when_its_command_exists(engine: Engine) -> None:
    store = SecurityStore(engine, clock=now_ms)
    store.enroll("rot-1", hash_password(new_token()), "test")
    ticket = request_rotation(store, "rot-1", deadline_s=60, requested_by="test")
    assert _rotation(engine, "rot-1") == ticket.command_id
    [pending] = store.pending_rotations()
    assert (pending.command_id, pending.command_state) == (ticket.command_id, "queued")


def test_a_failed_command_insert_leaves_no_rotation_behind(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SecurityStore(engine, clock=now_ms)
    store.enroll("rot-2", hash_password(new_token()), "test")
    taken = uuid.uuid4()
    CommandStore(engine, clock=now_ms).enqueue(
        [NewCommand("rot-2", "refresh", {}, 60, id=str(taken))]
    )
    # The rotation's command gets an id that is already used: its insert fails.
    monkeypatch.setattr(operations.uuid, "uuid4", lambda: taken)
    with pytest.raises(IntegrityError):
        request_rotation(store, "rot-2", deadline_s=60, requested_by="test")
    assert _rotation(engine, "rot-2") is None
    assert store.pending_rotations() == []
    with engine.connect() as conn:
        types = conn.execute(
            select(CommandRecord.type).where(CommandRecord.device_id == "rot-2")
        ).scalars()
        assert list(types) == ["refresh"]
