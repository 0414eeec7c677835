"""What a broker node actually does with the features the bridge relies on.

Brokers that speak MQTT differ in what they deliver (docs/BROKERS.md): RabbitMQ 3.10
replays a retained message only to a subscription whose filter equals its topic, NATS
2.9 and RabbitMQ deliver nothing to ``$share/...`` filters, RabbitMQ never answers an
MQTT 5 CONNECT. None of them says so: a SUBACK is granted and then nothing arrives. So
the bridge asks by doing, on a short-lived clean connection of its own to the node its
links use, at every connect:

* **retained to wildcards**: a retained message under the bridge's own topic, read back
  through a wildcard filter; when that stays silent, through the exact topic (so "no
  wildcard replay" is told apart from "no retained messages at all");
* **shared subscriptions**: a message to itself through a ``$share`` group.

(MQTT 5 is probed by each link's own CONNECT: :mod:`bridge.service.mqtt_link`.)

:func:`choose_mode` turns the answers into how the bridge runs, or into
:class:`BrokerUnsuitable`, whose message names the missing feature and the setting that
would work: the bridge never runs half-working.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

import aiomqtt

from bridge.broker_url import BrokerAddress

log = logging.getLogger(__name__)

#: How the bridge reads the fleet's retained presence at (re)connect.
ReconcileMode = Literal["auto", "wildcard", "per_device"]


class BrokerUnsuitable(RuntimeError):
    """The broker lacks a feature the configured mode needs; the message says which
    feature, on which node, and the setting that would work. Fatal: the bridge stops."""


class ProbeInconclusive(RuntimeError):
    """The node did not answer the probe in time (busy, failing over): not a verdict
    about its features; the link treats it like a failed connection and moves on."""


class Answer(StrEnum):
    YES = "yes"
    NO = "no"
    #: Not asked (e.g. a retained message was never accepted).
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class BrokerFeatures:
    """The answers of one node, with how long the probe took."""

    node: str
    retained: Answer
    wildcard_retained: Answer
    shared_subscriptions: Answer
    took_ms: int

    def to_json(self) -> dict[str, str | int]:
        return {
            "node": self.node,
            "retained": self.retained.value,
            "wildcard_retained": self.wildcard_retained.value,
            "shared_subscriptions": self.shared_subscriptions.value,
            "took_ms": self.took_ms,
        }


@dataclass(frozen=True, slots=True)
class Mode:
    """How the bridge runs on a node with :class:`BrokerFeatures`."""

    #: Read the retained presence device by device (exact topics of the database's known
    #: devices) instead of through the wildcard subscription.
    per_device_reconcile: bool


def choose_mode(
    features: BrokerFeatures, *, reconcile: ReconcileMode, shared_group: str | None
) -> Mode:
    """The mode that gives correct results on this node, or :class:`BrokerUnsuitable`."""
    node = features.node
    if features.retained is Answer.NO:
        raise BrokerUnsuitable(
            f"broker {node} does not deliver retained messages: kiosk-bridge reads each "
            "kiosk's presence from them; use a broker with retained messages (docs/BROKERS.md)"
        )
    if shared_group and features.shared_subscriptions is not Answer.YES:
        raise BrokerUnsuitable(
            f"broker {node} does not deliver shared subscriptions ($share/{shared_group}/...): "
            "run without --shared-group (KB_SHARED_GROUP); bridges of one database then "
            "split the work as one leader and hot standbys over the database lease"
        )
    wildcard = features.wildcard_retained is Answer.YES
    if reconcile == "wildcard" and not wildcard:
        raise BrokerUnsuitable(
            f"broker {node} does not replay retained messages to wildcard subscriptions, "
            "which --reconcile wildcard (KB_RECONCILE) needs: use KB_RECONCILE=per_device "
            "or auto (reads each known device's exact topics)"
        )
    return Mode(per_device_reconcile=reconcile == "per_device" or not wildcard)


def _client(
    address: BrokerAddress, identifier: str, timeout: float, tls_ca: str | None
) -> aiomqtt.Client:
    return aiomqtt.Client(
        address.host,
        address.port,
        username=address.username,
        password=address.password,
        identifier=identifier,
        protocol=aiomqtt.ProtocolVersion.V311,
        # A throwaway: nothing may be queued for it once it is gone.
        clean_session=True,
        timeout=timeout,
        keepalive=30,
        tls_context=ssl.create_default_context(cafile=tls_ca) if address.tls else None,
    )


async def _first(
    client: aiomqtt.Client, topic: str, payload: bytes, *, retained: bool, within: float
) -> bool:
    """Whether ``payload`` arrives on ``topic`` (with the retain flag if ``retained``)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(within):
            async for message in client.messages:
                if (
                    message.topic.value == topic
                    and message.payload == payload
                    and (message.retain or not retained)
                ):
                    return True
    return False


async def probe_features(
    address: BrokerAddress,
    *,
    topic: str,
    identifier: str,
    timeout_s: float = 3.0,
    tls_ca: str | None = None,
    shared: bool = True,
) -> BrokerFeatures:
    """Ask one node (``address``, its ``others`` ignored) by doing; ``topic`` is one the
    client may publish (retained) and subscribe to, under its own part of the tree.
    ``shared=False`` skips the shared-subscription probe (answer UNKNOWN): a broker
    without them costs the whole ``timeout_s`` to say so, for nothing when no
    ``--shared-group`` is configured.

    Raises :class:`aiomqtt.MqttError` when the node cannot be reached and
    :class:`ProbeInconclusive` when it does not acknowledge the retained probe in time.
    """
    started = time.monotonic()
    nonce = uuid.uuid4().hex
    retained_payload = f"retained {nonce}".encode()
    shared_payload = f"shared {nonce}".encode()
    wildcard = topic.rsplit("/", 1)[0] + "/+"
    retained = wildcard_retained = shared_answer = Answer.UNKNOWN
    async with _client(address, identifier, timeout_s, tls_ca) as client:
        try:
            await asyncio.wait_for(
                client.publish(topic, retained_payload, qos=1, retain=True), timeout_s
            )
        except TimeoutError:
            raise ProbeInconclusive(
                f"broker {address.url} did not acknowledge a retained message within {timeout_s:g}s"
            ) from None
        try:
            # QoS 0 subscriptions: some brokers (NATS) back a QoS 1 subscription with a
            # stored consumer, slow to create while a cluster fails over.
            await client.subscribe(wildcard, qos=0)
            if await _first(client, topic, retained_payload, retained=True, within=timeout_s):
                retained = wildcard_retained = Answer.YES
            else:
                await client.unsubscribe(wildcard)
                await client.subscribe(topic, qos=0)
                if await _first(client, topic, retained_payload, retained=True, within=timeout_s):
                    retained, wildcard_retained = Answer.YES, Answer.NO
                else:
                    raise ProbeInconclusive(
                        f"broker {address.url} accepted a retained message but replayed it "
                        f"to no subscription within {timeout_s:g}s"
                    )
                await client.unsubscribe(topic)
            if wildcard_retained is Answer.YES:
                await client.unsubscribe(wildcard)
            if shared:
                group = f"kbprobe{nonce[:8]}"
                await client.subscribe(f"$share/{group}/{topic}", qos=0)
                await client.publish(topic, shared_payload, qos=1)
                got = await _first(client, topic, shared_payload, retained=False, within=timeout_s)
                shared_answer = Answer.YES if got else Answer.NO
        finally:
            # Leave nothing retained behind (an empty retained message deletes it).
            with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                await asyncio.wait_for(client.publish(topic, b"", qos=1, retain=True), timeout_s)
    return BrokerFeatures(
        node=address.url,
        retained=retained,
        wildcard_retained=wildcard_retained,
        shared_subscriptions=shared_answer,
        took_ms=int((time.monotonic() - started) * 1000),
    )


async def probe_mqtt5(
    address: BrokerAddress, *, identifier: str, timeout_s: float = 3.0, tls_ca: str | None = None
) -> Answer:
    """Whether the node answers an MQTT 5 CONNECT: YES, NO (refused, or no answer within
    ``timeout_s``: what RabbitMQ 3.10 does). Raises :class:`aiomqtt.MqttError` when the
    node cannot be reached at all."""
    client = aiomqtt.Client(
        address.host,
        address.port,
        username=address.username,
        password=address.password,
        identifier=identifier,
        protocol=aiomqtt.ProtocolVersion.V5,
        clean_start=True,
        timeout=timeout_s,
        keepalive=30,
        tls_context=ssl.create_default_context(cafile=tls_ca) if address.tls else None,
    )
    try:
        async with client:
            return Answer.YES
    except aiomqtt.MqttCodeError as exc:
        # 132 (0x84): unsupported protocol version; 1 is 3.1.1's spelling.
        if getattr(exc.rc, "value", exc.rc) in (1, 132):
            return Answer.NO
        raise
    except aiomqtt.MqttError as exc:
        if "operation timed out" in str(exc).lower():
            return Answer.NO
        raise


__all__ = [
    "Answer",
    "BrokerFeatures",
    "BrokerUnsuitable",
    "Mode",
    "ProbeInconclusive",
    "ReconcileMode",
    "choose_mode",
    "probe_features",
    "probe_mqtt5",
]
