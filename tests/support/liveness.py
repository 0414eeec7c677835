"""A writer's heartbeat for tests of the views that read device states.

``devices``, ``device show``, ``top`` and ``uptime`` exit 4 and warn while no bridge
writes the database. Tests of what those views *show* seed a database by hand (or stop
the bridge that filled it); :func:`writer_alive` stands in for the bridge's heartbeat so
that they see live states. Tests of the stale case itself use real bridges
(tests/test_cli_staleness.py).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator

from bridge.db.bridges_store import BridgeRow, BridgesStore
from bridge.db.engine import create_schema, make_engine

BEAT_S = 0.25


@contextlib.contextmanager
def writer_alive(db_url: str, instance: str = "test-writer") -> Iterator[None]:
    """A ``leader`` row in kb_bridges, its heartbeat refreshed from a thread."""
    engine = make_engine(db_url)
    create_schema(engine)
    store = BridgesStore(engine)
    stop = threading.Event()
    started = int(time.time() * 1000)

    def beat() -> None:
        now = int(time.time() * 1000)
        store.beat(
            BridgeRow(
                instance=instance,
                host=socket.gethostname(),
                pid=os.getpid(),
                version="test",
                broker="mqtt://127.0.0.1:1883",
                role="leader",
                broker_connected=True,
                started_ms=started,
                heartbeat_ms=now,
                stopped_ms=None,
            )
        )

    def loop() -> None:
        while not stop.wait(BEAT_S):
            beat()

    beat()
    thread = threading.Thread(target=loop, name="test-writer-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)
        engine.dispose()
