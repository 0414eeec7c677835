"""The floor of kill -> Disconnected: a minimal presence bridge (issue 20).

paho-mqtt + SQLite, no batching, no threads of its own, no outbox, no telemetry: one
fenced upsert and one commit per presence message, on paho's network thread. What
kiosk-bridge is compared with in ``bench/kill_floor.py``.

    python bench/minimal_bridge.py HOST PORT DB_PATH
"""

from __future__ import annotations

import json
import sqlite3
import sys

import paho.mqtt.client as mqtt

SCHEMA = """
CREATE TABLE IF NOT EXISTS remotes (
    device_identifier TEXT PRIMARY KEY, session INTEGER NOT NULL, state TEXT NOT NULL,
    status TEXT NOT NULL
)
"""
# The session fence: a newer session wins; within a session only online -> down.
UPSERT = """
INSERT INTO remotes (device_identifier, session, state, status) VALUES (?, ?, ?, ?)
ON CONFLICT (device_identifier) DO UPDATE SET
    session = excluded.session, state = excluded.state, status = excluded.status
WHERE excluded.session > remotes.session
   OR (excluded.session = remotes.session AND remotes.state = 'online'
       AND excluded.state <> 'online')
"""


def main() -> None:
    host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute(SCHEMA)

    def on_connect(client: mqtt.Client, *_: object) -> None:
        client.subscribe("kiosk/v1/+/presence", qos=1)

    def on_message(_client: mqtt.Client, _userdata: object, msg: mqtt.MQTTMessage) -> None:
        try:
            body = json.loads(msg.payload)
            device = msg.topic.split("/")[2]
            state, session = str(body["state"]), int(body["session"])
        except (ValueError, KeyError, IndexError, TypeError):
            return
        status = "Connected" if state == "online" else "Disconnected"
        db.execute("BEGIN IMMEDIATE")
        db.execute(UPSERT, (device, session, state, status))
        db.execute("COMMIT")

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="minimal-bridge")
    client.on_connect = on_connect
    client.on_message = on_message
    client.connect(host, port, keepalive=30)
    client.loop_forever()


if __name__ == "__main__":
    main()
