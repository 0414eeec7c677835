"""A short-lived MQTT client for ops commands and the retained snapshot it can read.

The snapshot uses the bridge's trick: after subscribing, publish a marker to a private
topic; when it comes back, the broker has sent every retained message before it, so no
guessed quiet period is needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import aiomqtt
from aiomqtt.exceptions import MqttConnectError

from bridge.broker_url import BrokerAddress
from bridge.ops.errors import BrokerUnreachable
from bridge.settings import MqttProtocol
from schemas.topics import bridge_sync_topic

log = logging.getLogger(__name__)

# CONNACK codes meaning "I do not speak that protocol version" (3.1.1 and v5 spellings).
_UNSUPPORTED_PROTOCOL = frozenset({1, 132})
CONNECT_TIMEOUT_S = 10.0
#: The bounded wait for an answer to an MQTT 5 CONNECT under ``auto``.
PROBE_TIMEOUT_S = 3.0
SNAPSHOT_TIMEOUT_S = 10.0
_HINT = "check --broker (or KB_BROKER): mqtt[s]://[user:pass@]host:port, and that the broker runs"


@dataclass(frozen=True, slots=True)
class RetainedMessage:
    topic: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class RetainedSnapshot:
    messages: tuple[RetainedMessage, ...]
    #: False when the marker did not come back in time: the snapshot may lack messages.
    complete: bool


def _client(address: BrokerAddress, v5: bool, identifier: str, timeout: float) -> aiomqtt.Client:
    return aiomqtt.Client(
        address.host,
        address.port,
        username=address.username,
        password=address.password,
        identifier=identifier,
        protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
        # A throwaway observer: nothing must be queued for it after it leaves.
        clean_session=None if v5 else True,
        timeout=timeout,
        keepalive=30,
        tls_context=ssl.create_default_context() if address.tls else None,
    )


@contextlib.asynccontextmanager
async def connect(
    address: BrokerAddress,
    *,
    protocol: MqttProtocol = "auto",
    connect_timeout_s: float = CONNECT_TIMEOUT_S,
    name: str = "ops",
) -> AsyncIterator[aiomqtt.Client]:
    """A connected client; ``auto`` tries MQTT 5 and falls back to 3.1.1.

    Raises :class:`BrokerUnreachable` only for the connection itself; errors raised
    inside the block pass through unchanged.
    """
    identifier = f"kb-{name}-{uuid.uuid4().hex[:12]}"
    async with contextlib.AsyncExitStack() as stack:
        client = await _first_node(stack, address, protocol, identifier, connect_timeout_s)
        yield client


async def _first_node(
    stack: contextlib.AsyncExitStack,
    address: BrokerAddress,
    protocol: MqttProtocol,
    identifier: str,
    connect_timeout_s: float,
) -> aiomqtt.Client:
    """The first node of the broker list that takes the connection, in order; raises
    the last node's :class:`BrokerUnreachable` when none does."""
    failure: BrokerUnreachable | None = None
    for node in address.nodes:
        try:
            client = await _connect_node(stack, node, protocol, identifier, connect_timeout_s)
        except BrokerUnreachable as exc:
            log.info("%s", exc)
            failure = exc
            continue
        if len(address.nodes) > 1:
            log.info("connected to broker node %s", node.url)
        return client
    assert failure is not None
    if len(address.nodes) > 1:
        raise BrokerUnreachable(
            f"no node of {address.urls} took the connection; last: {failure}", hint=_HINT
        )
    raise failure


async def _connect_node(
    stack: contextlib.AsyncExitStack,
    address: BrokerAddress,
    protocol: MqttProtocol,
    identifier: str,
    connect_timeout_s: float,
) -> aiomqtt.Client:
    v5 = protocol in ("auto", "5")
    while True:
        # A broker that cannot parse MQTT 5 may never answer it (RabbitMQ 3.10): "auto"
        # waits a bounded time for it, then speaks 3.1.1.
        probing = protocol == "auto" and v5
        timeout = min(connect_timeout_s, PROBE_TIMEOUT_S) if probing else connect_timeout_s
        try:
            return await stack.enter_async_context(_client(address, v5, identifier, timeout))
        except MqttConnectError as exc:
            # paho hands MQTT 5 codes over as ReasonCode, which is unhashable.
            code = getattr(exc.rc, "value", exc.rc)
            if probing and code in _UNSUPPORTED_PROTOCOL:
                log.debug("broker %s refused MQTT 5; using 3.1.1", address.url)
                v5 = False
                continue
            raise BrokerUnreachable(
                f"broker {address.url} refused the connection: {exc}", hint=_HINT
            ) from None
        except (aiomqtt.MqttError, OSError) as exc:
            if probing and "operation timed out" in str(exc).lower():
                log.debug("broker %s did not answer MQTT 5; using 3.1.1", address.url)
                v5 = False
                continue
            raise BrokerUnreachable(
                f"cannot connect to broker {address.url}: {exc}", hint=_HINT
            ) from None


async def read_retained(
    client: aiomqtt.Client,
    filters: Sequence[str],
    *,
    prefix: str,
    marker_wait_s: float = SNAPSHOT_TIMEOUT_S,
) -> RetainedSnapshot:
    """Every retained message under ``filters`` as the broker holds it now."""
    nonce = uuid.uuid4().hex
    marker = bridge_sync_topic(nonce, prefix)
    for filter_ in filters:
        await client.subscribe(filter_, qos=1)
    await client.subscribe(marker, qos=1)
    await client.publish(marker, nonce.encode(), qos=1)
    found: dict[str, RetainedMessage] = {}
    complete = False
    try:
        async with asyncio.timeout(marker_wait_s):
            async for message in client.messages:
                topic = message.topic.value
                if topic == marker:
                    if message.payload == nonce.encode():
                        complete = True
                        break
                    continue
                if not message.retain:
                    continue
                found[topic] = RetainedMessage(topic, payload_bytes(message.payload))
    except TimeoutError:
        log.warning("retained snapshot: marker not back within %.1fs", marker_wait_s)
    for filter_ in (*filters, marker):
        with contextlib.suppress(aiomqtt.MqttError):
            await client.unsubscribe(filter_)
    return RetainedSnapshot(tuple(found[t] for t in sorted(found)), complete)


def payload_bytes(payload: object) -> bytes:
    """aiomqtt types payloads loosely (bytes, str, numbers, None); the wire is bytes."""
    if isinstance(payload, bytes | bytearray):
        return bytes(payload)
    if payload is None:
        return b""
    return str(payload).encode()
