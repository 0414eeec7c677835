"""``kiosk-bridge demo`` runs end to end on a fresh machine: embedded broker (secure, as
``run`` starts it), SQLite."""

from __future__ import annotations

import asyncio
import io
import re
from pathlib import Path

from rich.console import Console
from sqlalchemy import create_engine, text

from bridge.demo import DemoOptions, run_demo


def _left_behind(credentials: Path, db_dir: Path) -> list[str]:
    """Password files left: the demo's own, or any next to its database."""
    left = [str(credentials)] if credentials.exists() or credentials.parent.exists() else []
    return left + [p.name for p in db_dir.iterdir() if "credentials" in p.name]


async def test_demo_runs_fleet_faults_and_a_refresh(tmp_path: Path) -> None:
    db = tmp_path / "demo.db"
    out = io.StringIO()
    console = Console(file=out, width=120, force_terminal=False)
    await run_demo(DemoOptions(devices=20, duration_s=16, db_path=db, refresh_after_s=1.0), console)
    text_out = out.getvalue()
    assert "refresh to kiosk-00000: succeeded" in text_out
    assert str(db.resolve()) in text_out
    assert "kiosk-00019 provisioned itself with the claim credential" in text_out
    # The passwords lived in a temporary directory, gone now; none next to the database.
    flat = " ".join(text_out.split())
    [shown] = re.findall(r"passwords in (\S+), removed at the end", flat)
    assert await asyncio.to_thread(_left_behind, Path(shown), tmp_path) == []
    # Each fault is told as it is injected: when, which kiosks, what the bridge makes of it.
    for at, kind, words in (
        (6, "kill", "Last Will"),
        (9, "reboot", "reason reboot"),
        (12, "blackhole", "1.5 x the 5s keepalive"),
        (15, "drop", "reconnect by themselves"),
    ):
        assert re.search(rf"\+{at}s fault {kind}: kiosk-\d+.*?{words}", flat), text_out
    engine = create_engine(f"sqlite:///{db}")
    with engine.connect() as conn:
        states = dict(
            conn.execute(text("SELECT state, count(*) FROM kb_connectivity GROUP BY state")).all()
        )
        devices = conn.execute(text("SELECT count(*) FROM remotes")).scalar_one()
        # Every kiosk connected with a credential of its own; the last one claimed it.
        credentials_rows = conn.execute(
            text("SELECT count(*) FROM kb_device_credentials WHERE state = 'active'")
        ).scalar_one()
        audit = {
            (device, action)
            for device, action in conn.execute(
                text("SELECT device_id, action FROM kb_security_audit")
            )
        }
        reasons = {
            r
            for (r,) in conn.execute(
                text("SELECT reason FROM kb_presence_history WHERE state = 'offline'")
            )
        }
    engine.dispose()
    assert devices == 20 and credentials_rows == 20
    assert ("kiosk-00019", "provisioned") in audit and ("kiosk-00000", "enrolled") in audit
    # The kill at 6 s leaves one kiosk lost for good; the rest announced their shutdown
    # when the demo stopped the fleet, and one had announced a reboot on the way.
    assert states.get("lost", 0) >= 1
    # No kiosk that no longer exists is left showing online, and the demo says so.
    assert states.get("online", 0) == 0, states
    assert states.get("lost", 0) + states.get("offline", 0) == 20
    assert {"reboot", "shutdown"} <= reasons
    assert "The demo's kiosks are stopped; the table shows them" in flat
    assert "records that the states are no longer live" in flat
