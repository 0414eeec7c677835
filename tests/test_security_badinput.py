"""Hostile input through a real broker: malformed and hostile payloads and topics sent
to a running bridge (with provisioning), which must reject each one, count it, keep
running and change no row it should not.

The broker here is the anonymous development broker, so every hostile message reaches
the bridge (on the secure broker a device could only send them on its own topics).
Messages that break MQTT itself (wildcards or invalid UTF-8 in a PUBLISH topic) are sent
as raw packets: the broker must drop the connection and the bridge see nothing.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from sqlalchemy import func, select

from bridge.clock import now_ms
from bridge.db.models import CommandRecord, Connectivity, PresenceHistory, Remote
from bridge.db.security_models import DeviceCredential
from bridge.security.settings import SecuritySettings
from bridge.service.app import Bridge
from bridge.testing.mosquitto import MosquittoProcess
from bridge.testing.secure_broker import running_secure_bridge
from schemas import PresenceOnline, Status, TopicKind, device_topic, encode
from schemas.topics import provision_topic
from tests.support.bridge_harness import Db, eventually
from tests.support.mqtt import PahoClient

VICTIM, CANARY = "victim-1", "canary-1"
SESSION = now_ms()
NONCE = "n" * 30
BRIDGE_FILTERS = [
    *(f"kiosk/v1/+/{kind.value}" for kind in TopicKind if kind is not TopicKind.CONFIG),
    "kiosk/v1/provision/+/request",
]


def status(**fields: Any) -> dict[str, Any]:
    return {"session": SESSION, "seq": 1, "ts": now_ms(), **fields}


def _payloads() -> list[tuple[str, bytes]]:
    """(kind, payload): every one invalid for the topic kind it is sent on."""
    mib = b"{" + b" " * (1024 * 1024) + b"}"
    nested = b"[" * 8000 + b"]" * 8000
    common = [
        b"",
        b"\xff\xfe\xfd",
        b"\x00\x00\x00",
        b"{\x00}",
        b"null",
        b"[]",
        b'"just a string"',
        b"42",
        b"{",
        b"{}x",
        b"\xef\xbb\xbf{}",
        b'{"a": 1 /* comment */}',
        nested,
        mib,
        b"x" * 20_000,
    ]
    status_bad = [
        json.dumps(status(session="1")).encode(),
        json.dumps(status(session=1.5)).encode(),
        json.dumps(status(session=0)).encode(),
        json.dumps(status(session=2**64)).encode(),
        json.dumps(status(seq=-1)).encode(),
        json.dumps(status(battery_level=101)).encode(),
        json.dumps(status(battery_level=True)).encode(),
        json.dumps(status(wifi_strength="-40")).encode(),
        json.dumps(status(network_type="wi\x00fi")).encode(),
        json.dumps(status(current_url="https://x/" + "a" * 3000)).encode(),
        json.dumps(status(ts="yesterday")).encode(),
        b'{"session": 1, "seq": 1, "ts": 1, "cpu_temp": NaN}',
        b'{"session": 1, "seq": 1, "ts": 1, "cpu_temp": 1e400}',
        b'{"session": 1, "seq": 1, "ts": 1, "network_type": "\\ud800"}',
        json.dumps({"seq": 1, "ts": 1}).encode(),
    ]
    presence_bad = [
        json.dumps({"state": "zombie", "session": SESSION}).encode(),
        json.dumps({"state": "online", "ts": 1}).encode(),
        json.dumps({"state": "online", "session": -1, "ts": 1}).encode(),
        json.dumps({"state": "online", "session": 2**63, "ts": 1}).encode(),
        json.dumps({"state": "offline", "session": SESSION, "ts": 1}).encode(),
        json.dumps({"state": "offline", "session": SESSION, "ts": 1, "reason": "x"}).encode(),
        json.dumps(
            {"state": "online", "session": SESSION, "ts": 1, "ip_address": "a\x00"}
        ).encode(),
        json.dumps({"session": SESSION, "ts": 1}).encode(),
    ]
    ack_bad = [
        json.dumps({"id": "not-a-uuid", "state": "received", "ts": 1}).encode(),
        json.dumps(
            {"id": "6f1c2b9e-3d4a-4e5b-8c7d-0a1b2c3d4e5f", "state": "won", "ts": 1}
        ).encode(),
        json.dumps({"id": 12, "state": "received", "ts": 1}).encode(),
        # Well-formed, but no such command: rejected as unknown_command.
        json.dumps(
            {"id": "6f1c2b9e-3d4a-4e5b-8c7d-0a1b2c3d4e5f", "state": "failed", "ts": 1}
        ).encode(),
    ]
    out: list[tuple[str, bytes]] = []
    for payload in common:
        out += [("status", payload), ("presence", payload), ("ack", payload)]
    out += [("status", p) for p in status_bad]
    out += [("presence", p) for p in presence_bad]
    out += [("ack", p) for p in ack_bad]
    return out


def _bad_topics() -> list[str]:
    return [
        "kiosk/v1/bad id/status",
        "kiosk/v1/_hidden/status",
        "kiosk/v1/-dash/presence",
        "kiosk/v1/" + "a" * 65 + "/status",
        "kiosk/v1//status",
        "kiosk/v1/vi\u00e9tim/status",
        "kiosk/v1/a.b/ack",
        "kiosk/v1/provision/bad id/request",
        "kiosk/v1/provision/_x/request",
        # Not under the bridge's filters: never delivered, must change nothing either.
        "kiosk/v1/victim-1/status/extra",
        "kiosk/v1/victim-1/STATUS",
        "kiosk/v2/victim-1/status",
    ]


def _provision_payloads() -> list[bytes]:
    return [
        b"",
        b"\xff",
        b"[]",
        json.dumps({"device_id": "a b", "nonce": NONCE}).encode(),
        json.dumps({"device_id": "+", "nonce": NONCE}).encode(),
        json.dumps({"device_id": "#", "nonce": NONCE}).encode(),
        json.dumps({"device_id": "ok-2", "nonce": "short"}).encode(),
        json.dumps({"device_id": "ok-2", "nonce": NONCE, "mac_address": "x" * 40}).encode(),
        json.dumps({"device_id": ["ok"], "nonce": NONCE}).encode(),
        b"[" * 8000 + b"]" * 8000,
    ]


# --- raw MQTT, for what paho refuses to send ------------------------------------------------


def _remaining(length: int) -> bytes:
    out = bytearray()
    while True:
        byte, length = length % 128, length // 128
        out.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(out)


def _string(raw: bytes) -> bytes:
    return struct.pack("!H", len(raw)) + raw


def raw_publish_is_refused(host: str, port: int, topic: bytes, client_id: str) -> bool:
    """CONNECT, then a QoS 0 PUBLISH with ``topic`` as raw bytes; ``True`` if the broker
    then closes the connection (what it must do with an invalid topic name)."""
    body = _string(b"MQTT") + bytes([4, 0x02]) + struct.pack("!H", 30) + _string(client_id.encode())
    connect = bytes([0x10]) + _remaining(len(body)) + body
    publish_body = _string(topic) + b"{}"
    publish = bytes([0x30]) + _remaining(len(publish_body)) + publish_body
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(connect)
        connack = sock.recv(4)
        assert connack[:1] == b"\x20", connack
        sock.sendall(publish)
        try:
            return sock.recv(16) == b""
        except (ConnectionResetError, TimeoutError):
            return True


# --- the test ---------------------------------------------------------------------------------


@pytest.fixture
def db(sqlite_url: str) -> Iterator[Db]:
    handle = Db(sqlite_url)
    yield handle
    handle.close()


def rejected_total(bridge: Bridge) -> float:
    return sum(
        sample.value
        for metric in bridge.metrics.registry.collect()
        if metric.name == "kb_messages_rejected"
        for sample in metric.samples
        if sample.name.endswith("_total")
    )


def provision_refused(bridge: Bridge) -> float:
    value = bridge.metrics.registry.get_sample_value(
        "kb_provision_requests_total", {"outcome": "refused", "reason": "invalid_request"}
    )
    return value or 0.0


def snapshot(db: Db) -> dict[str, Any]:
    skip = {"updated_at", "updated_ms", "last_status_ms", "writer"}
    with db.engine.connect() as conn:
        remotes = [
            {k: v for k, v in row._mapping.items() if k not in skip}
            for row in conn.execute(select(Remote.__table__).order_by(Remote.__table__.c.id))
        ]
        conns = [
            {k: v for k, v in row._mapping.items() if k not in skip}
            for row in conn.execute(select(Connectivity.__table__))
        ]
        counts = {
            table.name: conn.execute(select(func.count()).select_from(table)).scalar_one()
            for table in (
                PresenceHistory.__table__,
                CommandRecord.__table__,
                DeviceCredential.__table__,
            )
        }
    return {"remotes": remotes, "connectivity": conns, "counts": counts}


async def test_hostile_messages_are_rejected_counted_and_change_nothing(
    mosquitto: MosquittoProcess, sqlite_url: str, db: Db
) -> None:
    host, port = mosquitto.host, mosquitto.port
    security = SecuritySettings(credential_backend="database", rotation_poll_s=0.1)
    async with running_secure_bridge(mosquitto.url, sqlite_url, security=security) as (bridge, _):
        attacker = PahoClient(host, port, client_id="attacker")
        await asyncio.to_thread(attacker.connect)
        try:
            birth = encode(PresenceOnline(session=SESSION, ts=now_ms(), app_version="1.0"))
            for device_id in (VICTIM, CANARY):
                await asyncio.to_thread(
                    attacker.publish, device_topic(device_id, TopicKind.PRESENCE), birth, 1, True
                )
            await asyncio.to_thread(
                attacker.publish,
                device_topic(VICTIM, TopicKind.STATUS),
                encode(Status(session=SESSION, seq=0, ts=now_ms(), battery_level=50)),
                1,
                True,
            )
            await eventually(lambda: db.status_of(VICTIM), lambda s: s == "Connected")
            await eventually(
                lambda: db.remote(VICTIM), lambda row: row.battery_level == 50, what="status"
            )
            before = await asyncio.to_thread(snapshot, db)
            rejected_before = rejected_total(bridge)

            sent = 0
            expected_rejections = 0
            for kind, payload in _payloads():
                await asyncio.to_thread(
                    attacker.publish, device_topic(VICTIM, TopicKind(kind)), payload, 1, False
                )
                sent += 1
                expected_rejections += 1
            valid = encode(Status(session=SESSION, seq=7, ts=now_ms(), battery_level=9))
            for topic in _bad_topics():
                await asyncio.to_thread(attacker.publish, topic, valid, 1, False)
                sent += 1
                if any(mqtt.topic_matches_sub(f, topic) for f in BRIDGE_FILTERS):
                    expected_rejections += 1
            provisioning = _provision_payloads()
            for index, payload in enumerate(provisioning):
                topic = provision_topic(f"claim-hostile-{index:03d}", "request")
                await asyncio.to_thread(attacker.publish, topic, payload, 1, False)
                sent += 1
            refusals = [
                raw_publish_is_refused(host, port, topic, f"raw-{index}")
                for index, topic in enumerate(
                    [
                        b"kiosk/v1/+/status",
                        b"kiosk/v1/#",
                        b"kiosk/v1/victim-1/\xff\xfe",
                        b"kiosk/v1/vic\x00tim/status",
                        b"kiosk/v1/victim-1/st\xc0\xafatus",
                    ]
                )
            ]
            sent += len(refusals)
            assert all(refusals), refusals
            assert sent >= 50

            # A valid message after all of it: once applied, everything before was seen.
            await asyncio.to_thread(
                attacker.publish,
                device_topic(CANARY, TopicKind.STATUS),
                encode(Status(session=SESSION, seq=1, ts=now_ms(), battery_level=77)),
                1,
                False,
            )
            await eventually(
                lambda: db.remote(CANARY), lambda row: row.battery_level == 77, what="canary"
            )
            await eventually(
                lambda: provision_refused(bridge),
                lambda n: n == len(provisioning),
                what="provisioning refusals",
            )
        finally:
            await asyncio.to_thread(attacker.close)

        # unknown_command is counted by the command dispatcher, a little later.
        await eventually(
            lambda: rejected_total(bridge) - rejected_before,
            lambda n: n >= expected_rejections,
            what="rejections",
        )
        assert rejected_total(bridge) - rejected_before == expected_rejections
        assert bridge.link.connected.is_set()
        after = await asyncio.to_thread(snapshot, db)

    # The canary's status is the only change.
    def by_id(rows: list[dict[str, Any]], key: str) -> dict[str, dict[str, Any]]:
        return {row[key]: row for row in rows}

    remotes_before = by_id(before["remotes"], "device_identifier")
    remotes_after = by_id(after["remotes"], "device_identifier")
    assert remotes_after.keys() == remotes_before.keys() == {VICTIM, CANARY}
    assert remotes_after[VICTIM] == remotes_before[VICTIM]
    assert remotes_after[CANARY]["battery_level"] == 77
    conn_before = by_id(before["connectivity"], "device_id")
    conn_after = by_id(after["connectivity"], "device_id")
    assert conn_after.keys() == conn_before.keys()
    assert conn_after[VICTIM] == conn_before[VICTIM]
    assert before["counts"] == after["counts"]
