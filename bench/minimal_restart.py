"""A Python floor for a restart (issue 20): the simplest program that does a restart's
work, to set beside kiosk-bridge and beside ``mosquitto_sub`` in ``bench/restart.py``.

paho-mqtt on its own thread, MQTT 3.1.1 at QoS 1 as the bridge's presence link; each
retained birth and status parsed with ``json.loads`` and written to SQLite with one
``executemany`` upsert per 5,000 messages. No fence beyond "newer session wins", no
history, no validation, no metrics: it exits once it has written ``2 x DEVICES``
messages. ``--receive-only`` counts them and writes nothing (paho's own share).

    python bench/minimal_restart.py HOST PORT DB_PATH DEVICES [--receive-only]
"""

from __future__ import annotations

import json
import sqlite3
import sys
import threading

import paho.mqtt.client as mqtt

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS presence (device TEXT PRIMARY KEY, session INTEGER, state TEXT)",
    "CREATE TABLE IF NOT EXISTS status (device TEXT PRIMARY KEY, battery INTEGER)",
)
PRESENCE = """
INSERT INTO presence (device, session, state) VALUES (?, ?, ?)
ON CONFLICT (device) DO UPDATE SET session = excluded.session, state = excluded.state
WHERE excluded.session >= presence.session
"""
STATUS = """
INSERT INTO status (device, battery) VALUES (?, ?)
ON CONFLICT (device) DO UPDATE SET battery = excluded.battery
"""
BATCH = 5_000


def main() -> None:
    host, port, path, devices = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    receive_only = "--receive-only" in sys.argv[5:]
    expected = 2 * devices
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    for statement in SCHEMA:
        db.execute(statement)
    presence: list[tuple[str, int, str]] = []
    status: list[tuple[str, int]] = []
    seen = 0
    done = threading.Event()

    def flush() -> None:
        db.execute("BEGIN IMMEDIATE")
        db.executemany(PRESENCE, presence)
        db.executemany(STATUS, status)
        db.execute("COMMIT")
        presence.clear()
        status.clear()

    def on_connect(client: mqtt.Client, *_: object) -> None:
        client.subscribe([("kiosk/v1/+/presence", 1), ("kiosk/v1/+/status", 1)])

    def on_message(_client: mqtt.Client, _userdata: object, msg: mqtt.MQTTMessage) -> None:
        nonlocal seen
        seen += 1
        if not receive_only:
            _prefix, _version, device, kind = msg.topic.split("/")
            body = json.loads(msg.payload)
            if kind == "presence":
                presence.append((device, int(body["session"]), str(body["state"])))
            else:
                status.append((device, int(body["battery_level"])))
            if len(presence) + len(status) >= BATCH or seen == expected:
                flush()
        if seen == expected:
            done.set()

    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id="minimal-restart", protocol=mqtt.MQTTv311
    )
    client.on_connect = on_connect
    client.on_message = on_message
    client.connect(host, port, keepalive=30)
    client.loop_start()
    done.wait()
    client.disconnect()
    client.loop_stop()
    db.close()


if __name__ == "__main__":
    main()
