"""Load generators run in their own processes: births and status floods with paho."""

from __future__ import annotations

import json
import time
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from rawpub import RawPublisher

from schemas import PresenceOnline, Status, TopicKind, device_topic, encode


def _client(host: str, port: int, name: str) -> paho.Client:
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=name, protocol=MQTTProtocolVersion.MQTTv311
    )
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect(host, port, keepalive=60)
    client.loop_start()
    return client


def device_ids(count: int, prefix: str = "bench-") -> list[str]:
    return [f"{prefix}{n:05d}" for n in range(count)]


def publish_births(host: str, port: int, ids: list[str], session: int) -> None:
    client = _client(host, port, "bench-births")
    infos = []
    for device_id in ids:
        payload = encode(PresenceOnline(session=session, ts=int(time.time() * 1000)))
        infos.append(
            client.publish(device_topic(device_id, TopicKind.PRESENCE), payload, qos=1, retain=True)
        )
    for info in infos:
        info.wait_for_publish(60)
    client.disconnect()
    client.loop_stop()


def status_payload(session: int, seq: int, n: int, ts_ms: int) -> bytes:
    # json.dumps rather than the pydantic model: 10x cheaper, and the load generator
    # must not be what the benchmark measures. ``check_payload`` proves it is valid.
    return json.dumps(
        {
            "session": session,
            "seq": seq,
            "ts": ts_ms,
            "battery_level": n % 101,
            "wifi_strength": -(n % 90),
            "screen_on": True,
            "ram_usage_mb": 1000 + n % 500,
        },
        separators=(",", ":"),
    ).encode()


def check_payload() -> None:
    Status.model_validate_json(status_payload(1, 0, 0, 1))


def flood_status(
    host: str, port: int, ids: list[str], session: int, total: int, rate: float | None
) -> dict[str, Any]:
    """Publish ``total`` status messages (QoS 1) round-robin over ``ids``, at ``rate``
    msg/s or as fast as possible; ``seq`` per device goes 0, 1, 2, ... ``ts`` is the
    time the message's chunk was built, just before it is sent."""
    check_payload()
    publisher = RawPublisher(host, port, f"bench-flood-{time.monotonic_ns()}")
    topics = [device_topic(d, TopicKind.STATUS) for d in ids]
    chunk = 500
    start = time.monotonic()
    try:
        for offset in range(0, total, chunk):
            if rate:
                delay = start + offset / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            ts = int(time.time() * 1000)
            count = min(chunk, total - offset)
            packets = publisher.packets(
                (
                    topics[(offset + k) % len(ids)],
                    status_payload(session, (offset + k) // len(ids), offset + k, ts),
                )
                for k in range(count)
            )
            publisher.send(packets)
        publisher.wait_acked(total)
        elapsed = time.monotonic() - start
    finally:
        publisher.close()
    # CLOCK_MONOTONIC is system-wide on Linux: the caller can time from the first send
    # rather than from before this process started.
    return {"published": total, "seconds": elapsed, "rate": total / elapsed, "started": start}


def main_flood(argv: list[str]) -> None:
    """Entry for a subprocess: JSON args in, JSON result out."""
    args = json.loads(argv[0])
    print(json.dumps(flood_status(**args)))
