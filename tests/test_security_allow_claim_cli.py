"""``kiosk-bridge device allow-claim``: who it lets in, and its errors as one line each
(exit 2 usage, 1 a device it cannot help, 3 an unreachable database)."""

from __future__ import annotations

from pathlib import Path

import typer
from sqlalchemy import select
from typer.testing import CliRunner, Result

from bridge.cli import security_cmd
from bridge.clock import now_ms
from bridge.db.engine import make_engine
from bridge.db.security_models import ClaimWindow
from bridge.db.security_store import SecurityStore
from bridge.db.tables import table_of
from bridge.passwords import hash_password, new_token


def _invoke(*args: str) -> Result:
    app = typer.Typer()
    security_cmd.register(app)
    return CliRunner().invoke(app, ["device", "allow-claim", *args], env={"KB_DB": None})


def test_allow_claim_opens_one_window_for_a_device_with_a_credential(sqlite_url: str) -> None:
    assert _invoke("ac-1", "--db", sqlite_url).exit_code == 0  # creates the schema
    store = SecurityStore(make_engine(sqlite_url), clock=now_ms)
    store.enroll("ac-1", hash_password(new_token()), "test")
    done = _invoke("ac-1", "--for", "10m", "--db", sqlite_url, "--requested-by", "ops-1")
    assert done.exit_code == 0 and "once without proof" in done.output
    with store.engine.connect() as conn:
        [window] = conn.execute(select(table_of(ClaimWindow))).all()
    assert window.device_id == "ac-1" and window.opened_by == "ops-1"
    assert 590_000 <= window.expires_ms - window.opened_ms <= 600_000
    assert [r.action for r in store.audit_log("ac-1")][-1] == "claim_allowed"
    store.engine.dispose()


def test_allow_claim_refuses_what_it_cannot_help(sqlite_url: str, tmp_path: Path) -> None:
    none = _invoke("ac-new", "--db", sqlite_url)
    assert none.exit_code == 0 and "nothing changed" in none.output
    store = SecurityStore(make_engine(sqlite_url), clock=now_ms)
    store.enroll("ac-gone", hash_password(new_token()), "test")
    store.mark_revoked("ac-gone", "test", "stolen")
    store.engine.dispose()
    revoked = _invoke("ac-gone", "--db", sqlite_url)
    assert revoked.exit_code == 1 and "device restore ac-gone" in revoked.output
    for bad in (["ac-1", "--for", "2d"], ["ac-1", "--for", "soon"], ["bad id"]):
        result = _invoke(*bad, "--db", sqlite_url)
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output
    missing = tmp_path / "no-such-dir" / "kb.db"
    down = _invoke("ac-1", "--db", f"sqlite:///{missing}")
    assert down.exit_code == 3, down.output
    assert len(down.output.strip().splitlines()) == 1 and "Traceback" not in down.output
