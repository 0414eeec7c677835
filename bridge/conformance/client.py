"""The kit's own MQTT client: it plays the bridge and the CMS (commands, config) and
watches what the broker says about the kiosks (Wills included)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bridge.conformance.broker import BrokerInfo
from bridge.conformance.observations import BrokerMessage

_CONNECT_TIMEOUT_S = 10.0


def _client(broker: BrokerInfo, v5: bool, name: str) -> aiomqtt.Client:
    return aiomqtt.Client(
        broker.host,
        broker.port,
        identifier=f"kb-conformance-{name}-{uuid.uuid4().hex[:8]}",
        username=broker.username,
        password=broker.password,
        protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
        timeout=_CONNECT_TIMEOUT_S,
    )


class KitClient:
    """Connected for the whole run; records every message on the kiosks' topics."""

    def __init__(self, broker: BrokerInfo, topics: list[str], into: list[BrokerMessage]) -> None:
        self._broker = broker
        self._topics = topics
        self._into = into
        self.v5 = bool(broker.v5)
        self._client: aiomqtt.Client | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        choices = [True, False] if self._broker.v5 is None else [self._broker.v5]
        last: Exception | None = None
        for v5 in choices:
            client = _client(self._broker, v5, "kit")
            try:
                await client.__aenter__()
            except aiomqtt.MqttError as exc:
                last = exc
                continue
            self._client, self.v5 = client, v5
            break
        if self._client is None:
            raise ConnectionError(f"the kit cannot connect to the broker: {last}")
        for topic in self._topics:
            await self._client.subscribe(topic, qos=1)
        self._reader = asyncio.create_task(self._read(self._client))

    async def _read(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = message.payload
            data = payload if isinstance(payload, bytes) else str(payload).encode()
            self._into.append(
                BrokerMessage(time.monotonic(), message.topic.value, data, message.retain)
            )

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._client is not None:
            with contextlib.suppress(aiomqtt.MqttError):
                await self._client.__aexit__(None, None, None)

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        retain: bool = False,
        response_topic: str | None = None,
        correlation: bytes | None = None,
    ) -> None:
        assert self._client is not None
        properties: Any = None
        if self.v5 and response_topic is not None:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            properties.ResponseTopic = response_topic
            if correlation is not None:
                properties.CorrelationData = correlation
        await self._client.publish(topic, payload, qos=1, retain=retain, properties=properties)

    async def fetch_retained(self, topic: str, within_s: float = 1.5) -> bytes | None:
        """The retained message on ``topic`` now, read by a fresh subscription."""
        client = _client(self._broker, self.v5, "peek")
        async with client:
            await client.subscribe(topic, qos=1)
            try:
                async with asyncio.timeout(within_s):
                    async for message in client.messages:
                        if message.retain:
                            payload = message.payload
                            return payload if isinstance(payload, bytes) else None
            except TimeoutError:
                return None
        return None
