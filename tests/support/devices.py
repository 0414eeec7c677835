"""Contract-speaking fake kiosks for bridge tests (the real agent is tested on its own).

Each wraps the threaded :class:`PahoClient`; async tests call it through
``asyncio.to_thread`` so the event loop (and an embedded broker on it) keeps running.
"""

from __future__ import annotations

import asyncio
from typing import Any

from paho.mqtt.enums import MQTTProtocolVersion

from bridge.broker_url import parse_broker_url
from bridge.clock import now_ms
from schemas import (
    OfflineReason,
    PresenceLost,
    PresenceOffline,
    PresenceOnline,
    Status,
    TopicKind,
    device_topic,
    encode,
)
from tests.support.mqtt import PahoClient, WillSpec


class FakeKiosk:
    def __init__(self, broker_url: str, device_id: str, session: int, **client: Any) -> None:
        address = parse_broker_url(broker_url)
        self.device_id = device_id
        self.session = session
        self.seq = 0
        self.presence_topic = device_topic(device_id, TopicKind.PRESENCE)
        self.status_topic = device_topic(device_id, TopicKind.STATUS)
        client.setdefault("protocol", MQTTProtocolVersion.MQTTv311)
        self.client = PahoClient(
            address.host,
            address.port,
            client_id=device_id,
            will=WillSpec(self.presence_topic, encode(PresenceLost(session=session))),
            **client,
        )

    def _birth(self, **meta: Any) -> bytes:
        return encode(PresenceOnline(session=self.session, ts=now_ms(), **meta))

    async def come_online(self, **meta: Any) -> FakeKiosk:
        await asyncio.to_thread(self.client.connect)
        await asyncio.to_thread(
            self.client.publish, self.presence_topic, self._birth(**meta), 1, True
        )
        return self

    async def send_status(self, **fields: Any) -> None:
        payload = encode(Status(session=self.session, seq=self.seq, ts=now_ms(), **fields))
        self.seq += 1
        await asyncio.to_thread(self.client.publish, self.status_topic, payload, 1, True)

    async def announce_offline(self, reason: OfflineReason) -> None:
        payload = encode(PresenceOffline(session=self.session, ts=now_ms(), reason=reason))
        await asyncio.to_thread(self.client.publish, self.presence_topic, payload, 1, True)
        await asyncio.to_thread(self.client.disconnect)

    async def crash(self) -> None:
        """Socket closed without DISCONNECT: the broker publishes the Will."""
        await asyncio.to_thread(self.client.drop)

    def close(self) -> None:
        self.client.close()


async def publish_raw(broker_url: str, topic: str, payload: bytes, retain: bool = False) -> None:
    address = parse_broker_url(broker_url)
    client = PahoClient(address.host, address.port)
    await asyncio.to_thread(client.connect)
    try:
        await asyncio.to_thread(client.publish, topic, payload, 1, retain)
    finally:
        await asyncio.to_thread(client.disconnect)
