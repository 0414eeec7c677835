"""A short-lived connection for operator actions (the CLI): dynsec commands, a retained
read, a publish. It uses the bridge's credential, under its own client id."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiomqtt

from bridge.broker_url import parse_broker_url
from bridge.security.dynsec import RESPONSE_TOPIC, DynsecClient, Publish
from schemas import DEFAULT_PREFIX
from schemas.topics import bridge_sync_topic

log = logging.getLogger(__name__)


def tls_context(ca_file: str | None) -> ssl.SSLContext:
    """Verify the broker against ``ca_file`` if given, else the system's CAs."""
    return ssl.create_default_context(cafile=ca_file)


@dataclass
class AdminLink:
    client: aiomqtt.Client
    dynsec: DynsecClient
    prefix: str = DEFAULT_PREFIX
    _retained: dict[str, asyncio.Future[bytes | None]] = field(default_factory=dict)
    _markers: dict[str, asyncio.Future[None]] = field(default_factory=dict)

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> None:
        await self.client.publish(topic, payload, qos=qos, retain=retain)

    async def retained(self, topic: str, timeout_s: float = 5.0) -> bytes | None:
        """The message retained on ``topic`` right now (``None`` if there is none).

        A marker published after subscribing comes back after every retained message
        the broker had for the subscription, so its arrival means "nothing retained".
        """
        nonce = uuid.uuid4().hex
        marker = bridge_sync_topic(nonce, self.prefix)
        loop = asyncio.get_running_loop()
        found: asyncio.Future[bytes | None] = loop.create_future()
        done: asyncio.Future[None] = loop.create_future()
        self._retained[topic] = found
        self._markers[marker] = done
        try:
            await self.client.subscribe(topic, qos=1)
            await self.client.subscribe(marker, qos=1)
            await self.client.publish(marker, nonce.encode(), qos=1)
            async with asyncio.timeout(timeout_s):
                waiting: set[asyncio.Future[Any]] = {found, done}
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            return found.result() if found.done() else None
        finally:
            self._retained.pop(topic, None)
            self._markers.pop(marker, None)
            for name in (topic, marker):
                with contextlib.suppress(aiomqtt.MqttError):
                    await self.client.unsubscribe(name)

    async def _read(self) -> None:
        async for message in self.client.messages:
            topic = message.topic.value
            payload = message.payload
            data = payload if isinstance(payload, bytes | bytearray) else str(payload).encode()
            if topic == RESPONSE_TOPIC:
                self.dynsec.feed(bytes(data))
                continue
            marker = self._markers.get(topic)
            if marker is not None and not marker.done():
                marker.set_result(None)
                continue
            waiting = self._retained.get(topic)
            if waiting is not None and not waiting.done() and message.retain:
                waiting.set_result(bytes(data) or None)


@contextlib.asynccontextmanager
async def open_admin_link(
    url: str,
    *,
    prefix: str = DEFAULT_PREFIX,
    ca_file: str | None = None,
    client_id: str | None = None,
    timeout_s: float = 5.0,
    v5: bool = True,
) -> AsyncIterator[AdminLink]:
    """Connect with the credential in ``url`` and subscribe to the dynsec answers."""
    address = parse_broker_url(url)
    client = aiomqtt.Client(
        hostname=address.host,
        port=address.port,
        username=address.username,
        password=address.password,
        identifier=client_id or f"kb-admin-{uuid.uuid4().hex[:12]}",
        protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
        tls_context=tls_context(ca_file) if address.tls else None,
        timeout=timeout_s,
    )
    async with client:
        link = AdminLink(client, DynsecClient(_publisher(client), timeout_s=timeout_s), prefix)
        await client.subscribe(RESPONSE_TOPIC, qos=1)
        reader = asyncio.create_task(link._read(), name="kb-admin-reader")
        try:
            yield link
        finally:
            link.dynsec.fail_pending("admin connection closed")
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await reader


def _publisher(client: aiomqtt.Client) -> Publish:
    async def publish(topic: str, payload: bytes) -> None:
        await client.publish(topic, payload, qos=1)

    return publish
