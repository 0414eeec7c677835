"""The bridge's connection to the broker: connect, birth, subscribe, receive, repeat.

aiomqtt 2.x does not reconnect by itself; as its docs prescribe, the loop here wraps
``async with client`` and subscribes inside it, so every reconnect resubscribes (and
re-reads the retained truth). Delays between attempts are capped exponential backoff
with full jitter.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import socket
import ssl
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, Self

import aiomqtt
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from bridge._compat.aiomqtt import paho_client, take_messages
from bridge.addresses import host_port
from bridge.backoff import Backoff
from bridge.broker_url import BrokerAddress, NodeCursor
from bridge.clock import now_ms
from bridge.service.buffered_socket import buffer_reads
from bridge.service.ingest import Ingest
from bridge.service.metrics import BridgeMetrics
from bridge.service.probe import (
    BrokerFeatures,
    Mode,
    ProbeInconclusive,
    choose_mode,
    probe_features,
)
from bridge.service.writer import DbWriter
from bridge.settings import Settings
from bridge.tasks import cancel_and_wait
from schemas import BridgePresence, ContractError, PresenceState, TopicKind, encode
from schemas.codec import decode_bridge_presence
from schemas.constants import BRIDGE_SEGMENT
from schemas.topics import (
    bridge_instance_topic,
    bridge_instances_filter,
    bridge_sync_topic,
    device_filter,
    device_topic,
    parse_bridge_instance_topic,
    shared,
)

log = logging.getLogger(__name__)

# CONNACK codes meaning "I do not speak that protocol version" (3.1.1 and v5 spellings).
_UNSUPPORTED_PROTOCOL = {1, 132}

#: Messages handled per wake-up of the receive loop. aiomqtt's iterator costs a task and
#: an ``asyncio.wait`` per message; taking what has already arrived in one go roughly
#: doubles the rate the bridge absorbs. Bounded so other tasks (the writer, command
#: dispatch) still run every couple of milliseconds under a flood.
RECEIVE_BATCH = 256

#: How aiomqtt words a CONNECT that got no CONNACK in time.
_TIMED_OUT = "operation timed out"


class _BoundedConnect(aiomqtt.Client):
    """An aiomqtt client whose CONNECT waits ``connect_timeout`` (when set) instead of
    its ``timeout``: an MQTT 5 CONNECT that a 3.1.1-only broker never answers
    (RabbitMQ 3.10) is given up after the bounded probe wait, while the connection's
    later operations keep the normal timeout."""

    connect_timeout: float | None = None

    async def __aenter__(self) -> Self:
        normal = self.timeout
        if self.connect_timeout is not None:
            self.timeout = self.connect_timeout
        try:
            return await super().__aenter__()
        finally:
            self.timeout = normal


class Route(Protocol):
    """Extra traffic the link carries for another component (e.g. provisioning).

    ``filters`` are subscribed on every connect; a received topic that ``matches`` is
    handed to ``handle`` instead of the presence/status ingest. ``handle`` runs on the
    receive path: it must only queue work, never wait on I/O.
    """

    def filters(self) -> list[str]: ...

    def matches(self, topic: str) -> bool: ...

    def handle(
        self, client: aiomqtt.Client, topic: str, payload: bytes, received_ms: int
    ) -> None: ...


@dataclass
class BridgeIdentity:
    """What a bridge says of itself in its presence: its database's id (learnt once the
    database is open) and its role (leader, standby, shared; changes at a takeover)."""

    database: str | None = None
    role: str | None = None


class LinkRole(enum.Enum):
    """What a connection carries. The bridge holds one of each: presence and telemetry
    are nearly all of its traffic and need nothing from MQTT 5, so they travel on a
    3.1.1 connection, where paho parses a message at about 2.5 times the rate it does on
    MQTT 5 (no properties object per message); commands keep MQTT 5's Message Expiry,
    Response Topic, Correlation Data and No Local on a connection of their own."""

    #: presence + status, the retained snapshot and reconciliation, the bridge's own
    #: birth and Will.
    PRESENCE = "presence"
    #: command acks, commands published by others, extra routes (provisioning), and
    #: the commands the bridge publishes.
    COMMANDS = "commands"


class LivePresence:
    """Whether the live presence subscription is in place, shared by the two links.

    The command link (MQTT 5) subscribes to presence with retain handling 2 ("do not
    send retained messages" [MQTT-3.3.1-11]): it hears only what kiosks publish from now
    on, never the retained replay, so a Will reaches the ingest at once even while the
    presence link is still reading a 100,000-device snapshot. The presence link reads the
    snapshot on its own subscription and drops it once the snapshot is complete and the
    live one is in place; while there is none (a 3.1.1-only broker, the command link
    down) it keeps its own subscription, which carries live presence too.
    """

    def __init__(self) -> None:
        self._ready = False
        #: Set at every change of :attr:`ready`; the presence link waits on it.
        self.changed = asyncio.Event()
        #: Times the live subscription was lost. The command link can drop and come
        #: back before the presence link looks (or while it waits on the broker): the
        #: count, not :attr:`ready` alone, tells it that a gap was left to re-read.
        self.losses = 0

    @property
    def ready(self) -> bool:
        return self._ready

    def set(self, ready: bool) -> None:
        if ready != self._ready:
            self._ready = ready
            if not ready:
                self.losses += 1
            self.changed.set()


class MqttLink:
    def __init__(
        self,
        settings: Settings,
        ingest: Ingest,
        writer: DbWriter,
        metrics: BridgeMetrics,
        version: str,
        *,
        role: LinkRole,
        known_devices: Callable[[], Awaitable[Sequence[str]]] | None = None,
        protocol: str | None = None,
        routes: Sequence[Route] = (),
        identity: BridgeIdentity | None = None,
        live: LivePresence | None = None,
    ) -> None:
        self._settings = settings
        #: The live presence subscription: made by the command link, followed by the
        #: presence link (see :class:`LivePresence`). None: presence travels as before,
        #: live and retained on the presence link's one subscription.
        self._live = live
        #: Presence filters the presence link holds (the snapshot's; live ones while
        #: there is no live subscription on the command link).
        self._presence_subs: set[str] = set()
        #: Whether a snapshot was asked for and its marker has not come back yet.
        self._snapshot_open = False
        #: :attr:`LivePresence.losses` as of the last time this link's own presence
        #: subscription covered live presence: a loss after it left a gap to re-read.
        self._losses_covered = 0
        self._ingest = ingest
        self._writer = writer
        self._metrics = metrics
        self._version = version
        #: What the bridge's presence says about it (its database, its role): filled in
        #: by the bridge as it learns them, read at each announcement.
        self._identity = identity or BridgeIdentity()
        self.role = role
        self._protocol = protocol or (
            settings.presence_protocol if role is LinkRole.PRESENCE else settings.mqtt_protocol
        )
        self.client_id = (
            settings.client_id if role is LinkRole.PRESENCE else f"{settings.client_id}-cmd"
        )
        self._client: aiomqtt.Client | None = None
        self._backoff = Backoff(base=settings.reconnect_base_s, cap=settings.reconnect_cap_s)
        address = settings.broker_address
        #: The broker list, walked in order at every failure (None: the embedded broker).
        self._nodes = NodeCursor(address) if address is not None else None
        #: The node of the current (or next) connection attempt.
        self.node: BrokerAddress | None = address.nodes[0] if address is not None else None
        #: Nodes that refused MQTT 5 or never answered its CONNECT: 3.1.1 from then on.
        self._v311_nodes: set[str] = set()
        #: Nodes where an MQTT 5 CONNECT was answered: no bounded wait needed there.
        self._v5_nodes: set[str] = set()
        #: What the node of the current connection does (presence link; None before the
        #: first probe and on the embedded broker, whose abilities are known).
        self.features: BrokerFeatures | None = None
        self.mode = Mode(per_device_reconcile=settings.reconcile == "per_device")
        #: The database's known devices, for a reconcile device by device.
        self._known_devices = known_devices
        #: Exact topics subscribed for a device-by-device replay, dropped after it.
        self._replay_topics: list[str] = []
        #: Per-device mode: devices whose presence the replay covers, and those heard of
        #: that it did not (the database did not know them): read by :meth:`discover`.
        self._covered: set[str] = set()
        self._to_discover: list[str] = []
        self._discover_wanted = asyncio.Event()
        #: Set once the retained snapshot of a connection has been reconciled.
        self.synced = asyncio.Event()
        self.connected = asyncio.Event()
        #: Whether the current connection speaks MQTT 5.
        self.v5 = False
        #: Traffic carried for other parts (provisioning), subscribed on every connect.
        self.routes: tuple[Route, ...] = tuple(routes)
        #: Set when the retained presence must be re-read (a dropped event); the receive
        #: loop acts on it after the batch in hand.
        self._resync_wanted = asyncio.Event()
        self._incoming: asyncio.Queue[aiomqtt.Message] | None = None
        self._last_peer_news: bytes | None = None
        #: Messages received since start (all topics): a measure of load for others.
        self.received = 0
        #: The bridges' own topics (marker, instances): through the receive loop.
        self._bridge_topics = f"{settings.prefix}/{BRIDGE_SEGMENT}/"

    @property
    def client(self) -> aiomqtt.Client | None:
        """The connected client, or None. Between a connection's death (a broker node
        killed) and the receive loop noticing it, the old client would take publishes
        only to fail them at once: the dispatcher would spend a command's attempts on it
        while the link fails over to the next node."""
        client = self._client
        if client is None or not paho_client(client).is_connected():
            return None
        return client

    def socket(self) -> Any | None:
        """The connected client's socket (for :class:`ReadPause`), or None."""
        client = self.client
        return None if client is None else paho_client(client).socket()

    def request_resync(self) -> None:
        """Ask for a re-read of the retained presence (from any part, no I/O here)."""
        self._resync_wanted.set()

    def _presence_payload(self, state: PresenceState) -> bytes:
        return encode(
            BridgePresence(
                state=state,
                instance=self._settings.instance,
                ts=now_ms() if state is not PresenceState.LOST else None,
                version=self._version,
                database=self._identity.database,
                role=self._identity.role if state is PresenceState.ONLINE else None,
            )
        )

    @property
    def presence_topic(self) -> str:
        """This instance's own presence topic (retained birth, Will, clean offline)."""
        return bridge_instance_topic(self._settings.instance, self._settings.prefix)

    async def announce(self) -> None:
        """Re-publish the birth (the role changed); quietly nothing while disconnected."""
        client = self._client
        if client is None or self.role is not LinkRole.PRESENCE:
            return
        try:
            await client.publish(
                self.presence_topic,
                self._presence_payload(PresenceState.ONLINE),
                qos=1,
                retain=True,
            )
        except aiomqtt.MqttError as exc:
            log.warning("could not announce the bridge's role: %s", exc)

    def _incoming_queue(self, maxsize: int = 0) -> asyncio.Queue[aiomqtt.Message]:
        # aiomqtt builds its message queue through ``queue_type``; keeping a handle on it
        # lets the receive loop take every message that is already waiting at once.
        self._incoming = asyncio.Queue(maxsize)
        return self._incoming

    def _backlog(self, first: aiomqtt.Message) -> list[aiomqtt.Message]:
        batch = [first]
        queue = self._incoming
        while queue is not None and queue.qsize() and len(batch) < RECEIVE_BATCH:
            batch.append(queue.get_nowait())
        return batch

    def _make_client(self, v5: bool) -> aiomqtt.Client:
        address = self.node
        if address is None:
            host, port = self._settings.listen_address
            username = password = None
            tls = False
        else:
            host, port = address.host, address.port
            username, password, tls = address.username, address.password, address.tls
        will = (
            aiomqtt.Will(
                topic=self.presence_topic,
                payload=self._presence_payload(PresenceState.LOST),
                qos=1,
                retain=True,
            )
            if self.role is LinkRole.PRESENCE
            else None
        )
        common = {
            "hostname": host,
            "port": port,
            "username": username,
            "password": password,
            "identifier": self.client_id,
            "will": will,
            "keepalive": self._settings.keepalive_s,
            "timeout": 10,
            "tls_context": ssl.create_default_context(cafile=self._settings.security.tls_ca)
            if tls
            else None,
            "queue_type": self._incoming_queue,
            # paho's own window is 20 unacknowledged QoS 1 publishes; the dispatcher paces
            # a fan-out by the same number, so the two must agree.
            "max_inflight_messages": self._settings.command_inflight,
        }
        # In a shared group a dead instance with a persistent session would stay a member
        # and keep receiving (queued, never processed) its share of the fleet's messages:
        # group members start clean and a survivor re-reads the retained truth instead.
        persistent = not self._settings.shared_group
        if v5:
            # paho's Properties.__init__ carries no annotations.
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = self._settings.session_expiry_s if persistent else 0
            client: aiomqtt.Client = _BoundedConnect(
                protocol=aiomqtt.ProtocolVersion.V5,
                clean_start=not persistent,
                properties=props,
                **common,  # type: ignore[arg-type]
            )
            if self._protocol == "auto" and self._shown() not in self._v5_nodes:
                # Probing: a broker that cannot parse MQTT 5 may never answer.
                assert isinstance(client, _BoundedConnect)
                client.connect_timeout = self._settings.probe_timeout_s
        else:
            client = aiomqtt.Client(
                protocol=aiomqtt.ProtocolVersion.V311,
                clean_session=not persistent,
                **common,  # type: ignore[arg-type]
            )
        take_messages(client, self._take)
        # Acks and commands are small and latency-bound: do not let Nagle hold them.
        return buffer_reads(client, [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])

    def _take(self, topic: str, payload: bytes, retained: bool) -> bool:
        """A message as paho parses it: device traffic (nearly all of it) is handled
        here at once; the bridges' own topics (the snapshot's marker, the instances'
        presence) go on to the receive loop, which may have to await for them.

        Handling device messages here, not through aiomqtt's queue and iterator, saves
        a message object, a queue round and a loop turn per message (a 100,000-device
        snapshot is 200,000 of them), and a Will reaches the ingest in the same turn of
        the event loop as its bytes. The ingest only queues work (never awaits)."""
        client = self._client
        if client is None or topic.startswith(self._bridge_topics):
            return False
        self.received += 1
        self._dispatch(client, topic, payload, retained)
        return True

    def _shown(self) -> str:
        """The node of the current attempt, safe to log."""
        if self.node is not None:
            return self.node.url
        return f"mqtt://{host_port(*self._settings.listen_address)}"

    async def run(self) -> None:
        """Connect and consume forever, walking the broker list in order at every
        failure; returns only by cancellation. Raises :class:`BrokerUnsuitable` when the
        node lacks a feature the configured mode needs (the bridge stops, saying so)."""
        attempt = 0
        while True:
            attempt += 1
            shown = self._shown()
            v5 = self._protocol in ("auto", "5") and shown not in self._v311_nodes
            self._client = None
            try:
                await self._probe()
                self._metrics.broker_node.labels(self.role.value).info({"node": shown})
                await self._session(v5)
            except ProbeInconclusive as exc:
                self._lost(shown, attempt, exc)
            except aiomqtt.MqttError as exc:
                # aiomqtt's ``__aexit__`` raises the connection's error in place of a
                # CancelledError that arrives after the connection broke: shutdown must
                # still stop this loop, not reconnect.
                _raise_if_cancelled()
                if self._falls_back(v5, exc):
                    continue
                self._lost(shown, attempt, exc)
            if self._nodes is not None:
                self._nodes.failed()
                self.node = self._nodes.current
            delay = self._backoff.next_delay()
            log.warning(
                "reconnecting (%s link) to %s in %.2fs (attempt %d)",
                self.role.value,
                self._shown(),
                delay,
                attempt,
            )
            await asyncio.sleep(delay)

    def _falls_back(self, v5: bool, exc: aiomqtt.MqttError) -> bool:
        """An MQTT 5 CONNECT refused for its version, or never answered (RabbitMQ 3.10
        cannot parse it): this node speaks 3.1.1 from now on, tried again at once. Both
        links do the same; commands work on 3.1.1 without MQTT 5's extras."""
        shown = self._shown()
        if not v5 or self._protocol != "auto" or self._client is not None:
            return False
        refused = (
            isinstance(exc, MqttConnectError)
            and getattr(exc.rc, "value", exc.rc) in _UNSUPPORTED_PROTOCOL
        )
        unanswered = _TIMED_OUT in str(exc).lower() and shown not in self._v5_nodes
        if not (refused or unanswered):
            return False
        log.warning(
            "broker %s %s MQTT 5 (%s link); using MQTT 3.1.1 on it",
            shown,
            "refused"
            if refused
            else f"did not answer within {self._settings.probe_timeout_s:g}s of",
            self.role.value,
        )
        self._v311_nodes.add(shown)
        return True

    async def _probe(self) -> None:
        """Presence link, external broker: ask the node what it does (retained replay to
        wildcards, shared subscriptions) and choose the mode, or stop the bridge."""
        node = self.node
        if self.role is not LinkRole.PRESENCE or node is None:
            return
        settings = self._settings
        features = await probe_features(
            node,
            topic=f"{self.presence_topic.rsplit('/', 1)[0]}/probe",
            identifier=f"{self.client_id}-probe",
            timeout_s=settings.probe_timeout_s,
            tls_ca=settings.security.tls_ca,
            # Only a configured group needs them (a missing one costs the whole wait).
            shared=settings.shared_group is not None,
        )
        for name, answer in (
            ("wildcard_retained", features.wildcard_retained),
            ("shared_subscriptions", features.shared_subscriptions),
        ):
            if answer.value != "unknown":
                self._metrics.broker_feature.labels(name).set(1 if answer.value == "yes" else 0)
        mode = choose_mode(
            features, reconcile=settings.reconcile, shared_group=settings.shared_group
        )
        if features != self.features or mode != self.mode:
            log.info(
                "broker %s: retained to wildcards %s, shared subscriptions %s (probe %d ms)%s",
                features.node,
                features.wildcard_retained.value,
                features.shared_subscriptions.value,
                features.took_ms,
                "; reading the retained presence device by device"
                if mode.per_device_reconcile
                else "",
            )
        self.features, self.mode = features, mode

    async def _replay_each_device(self, client: aiomqtt.Client) -> None:
        """Per-device reconcile: subscribe to the exact presence and status topics of
        every device the database knows, in bounded SUBSCRIBE batches, so a broker that
        replays retained messages only to exact filters (RabbitMQ) still replays them all
        before the snapshot's marker. Dropped again by :meth:`_end_device_replay`."""
        if not self.mode.per_device_reconcile or self._known_devices is None:
            return
        await self._end_device_replay(client)
        devices = list(await self._known_devices())
        self._covered.update(devices)
        prefix = self._settings.prefix
        batch = self._settings.reconcile_batch
        for start in range(0, len(devices), batch):
            part = devices[start : start + batch]
            topics = [(device_topic(d, TopicKind.PRESENCE, prefix), 1) for d in part] + [
                (device_topic(d, TopicKind.STATUS, prefix), 0) for d in part
            ]
            await client.subscribe(topics)
            self._replay_topics += [topic for topic, _ in topics]
            _raise_if_cancelled()
        log.info("reading the retained presence of %d known devices one by one", len(devices))

    def note_device(self, device_id: str) -> None:
        """A device was heard of (receive path, no I/O). In per-device mode, one the
        database did not know has its retained presence read by :meth:`discover`: a
        broker without wildcard replay would otherwise hide its birth until the next."""
        if self.mode.per_device_reconcile and device_id not in self._covered:
            self._covered.add(device_id)
            self._to_discover.append(device_id)
            self._discover_wanted.set()

    async def discover(self) -> None:
        """Forever: subscribe to the exact presence topic of each device :meth:`note_device`
        found (kept: the retained birth comes now, and later ones live)."""
        prefix = self._settings.prefix
        while True:
            await self._discover_wanted.wait()
            self._discover_wanted.clear()
            client = self._client
            if client is None or not self.connected.is_set():
                # Not now: the next connection's replay reads them from the database.
                self._covered.difference_update(self._to_discover)
                self._to_discover = []
                continue
            batch = self._to_discover[: self._settings.reconcile_batch]
            self._to_discover = self._to_discover[len(batch) :]
            if self._to_discover:
                self._discover_wanted.set()
            try:
                await client.subscribe(
                    [(device_topic(d, TopicKind.PRESENCE, prefix), 1) for d in batch]
                )
            except aiomqtt.MqttError as exc:
                self._covered.difference_update(batch)
                log.info("could not read the presence of new devices: %s", exc)

    async def _end_device_replay(self, client: aiomqtt.Client) -> None:
        topics, self._replay_topics = self._replay_topics, []
        batch = self._settings.reconcile_batch * 2
        for start in range(0, len(topics), batch):
            await client.unsubscribe(topics[start : start + batch])
            _raise_if_cancelled()

    def _lost(self, shown: str, attempt: int, exc: Exception) -> None:
        self.connected.clear()
        self._replay_topics = []
        if self.role is LinkRole.PRESENCE:
            self._metrics.connected.set(0)
        self._client = None
        log.warning(
            "broker %s unavailable for the %s link (attempt %d): %s",
            shown,
            self.role.value,
            attempt,
            exc,
        )

    async def _session(self, v5: bool) -> None:
        settings = self._settings
        prefix = settings.prefix
        # One marker per snapshot: a re-read started while an earlier one is still
        # arriving must not be closed by the earlier marker.
        marker = [uuid.uuid4().hex]
        # Stable per instance, so the bridge's persistent session does not collect one
        # stale subscription per reconnect; the payload tells this connection's marker.
        sync_topic = bridge_sync_topic(uuid.uuid5(uuid.NAMESPACE_DNS, self.client_id).hex, prefix)
        presence_filter = device_filter(TopicKind.PRESENCE, prefix)

        async def resync(client: aiomqtt.Client, why: str) -> None:
            log.warning("re-reading the retained presence of the fleet: %s", why)
            marker[0] = uuid.uuid4().hex
            self._ingest.start_snapshot()
            self._snapshot_open = True
            # Kept in the set throughout: it is replaced, never given up (a follower that
            # found it missing here would start a second re-read).
            self._presence_subs.add(presence_filter)
            await client.unsubscribe(presence_filter)
            # The subscription's retained replay covers every loss until now.
            self._note_covered()
            await client.subscribe(presence_filter, qos=1)
            await self._replay_each_device(client)
            await client.publish(sync_topic, marker[0].encode(), qos=1)
            _raise_if_cancelled()

        async with self._make_client(v5) as client:
            loops: list[asyncio.Task[None]] = []
            try:
                await self._connected(client, v5, sync_topic, marker[0])
                loops = [
                    asyncio.create_task(
                        self._consume(client, sync_topic, marker, resync),
                        name=f"kb-mqtt-{self.role.value}-receive",
                    ),
                    asyncio.create_task(
                        self._resync_when_asked(client, resync),
                        name=f"kb-mqtt-{self.role.value}-resync",
                    ),
                ]
                if self.role is LinkRole.PRESENCE and self._live is not None:
                    loops.append(
                        asyncio.create_task(
                            self._follow_live(client, resync), name="kb-mqtt-follow-live"
                        )
                    )
                # Each ends only by an error of this connection (a re-read or a hand-over
                # that failed included): the session ends with it and the link
                # reconnects and re-reads. A follower that died alone would leave live
                # presence to a subscription that may be gone, and births unheard.
                done, _ = await asyncio.wait(loops, return_when=asyncio.FIRST_COMPLETED)
                for ended in done:
                    ended.result()
            finally:
                for running in loops:
                    # Every loop ends with its connection; the error that ended the
                    # session is raised above. Another loop's error from the same broken
                    # connection must not cut this cleanup short: the loops after it
                    # would outlive their connection, and the command link would never
                    # hand live presence back (births unheard while it reconnects).
                    try:
                        await cancel_and_wait(running)
                    except Exception as exc:
                        log.debug("%s ended with its connection: %r", running.get_name(), exc)
                task = asyncio.current_task()
                stopping = task is not None and task.cancelling()
                if self.role is LinkRole.COMMANDS and self._live is not None and not stopping:
                    # Lost, not stopped: the presence link takes live presence back. (At
                    # shutdown the presence link stops next; the next start re-reads.)
                    self._live.set(False)

    async def _connected(
        self,
        client: aiomqtt.Client,
        v5: bool,
        sync_topic: str,
        marker: str,
    ) -> None:
        """Just connected: say so and subscribe."""
        presence = self.role is LinkRole.PRESENCE
        group = self._settings.shared_group
        self._client = client
        self.v5 = v5
        self._backoff.reset()
        if v5:
            self._v5_nodes.add(self._shown())
        if self._nodes is not None:
            self._nodes.succeeded()
        if presence:
            self._metrics.connects.inc()
            self._metrics.connected.set(1)
        log.info(
            "connected to broker %s as %s (MQTT %s, %s link)",
            self._shown(),
            self.client_id,
            "5" if v5 else "3.1.1",
            self.role.value,
        )
        if presence:
            await self._subscribe_presence(client, group, sync_topic, marker)
        else:
            await self._subscribe_commands(client, group, v5)
        self.connected.set()

    async def _consume(
        self,
        client: aiomqtt.Client,
        sync_topic: str,
        marker: list[str],
        resync: Callable[[aiomqtt.Client, str], Awaitable[None]],
    ) -> None:
        prefix = self._settings.prefix
        group = self._settings.shared_group
        async for first in client.messages:
            batch = self._backlog(first)
            self.received += len(batch)
            for message in batch:
                topic = message.topic.value
                if topic == sync_topic:
                    if message.payload == marker[0].encode():
                        await self._snapshot_read(client)
                    continue
                payload = message.payload
                if not isinstance(payload, bytes | bytearray):
                    payload = str(payload).encode()
                if parse_bridge_instance_topic(topic, prefix) is not None:
                    # Only a live message means a peer just went: a retained one is
                    # replayed at every subscription.
                    if group and not message.retain and self._peer_went_down(bytes(payload)):
                        await resync(client, "another bridge instance of the group is gone")
                    continue
                self._dispatch(client, topic, bytes(payload), message.retain)

    async def _resync_when_asked(
        self,
        client: aiomqtt.Client,
        resync: Callable[[aiomqtt.Client, str], Awaitable[None]],
    ) -> None:
        """Re-read the retained presence each time :meth:`request_resync` asks (messages
        are handled as paho parses them, outside any loop that could look)."""
        while True:
            await self._resync_wanted.wait()
            self._resync_wanted.clear()
            await resync(client, "the presence buffer overflowed")

    def _dispatch(
        self, client: aiomqtt.Client, topic: str, payload: bytes, retained: bool = False
    ) -> None:
        """A route's traffic to its route, everything else through the ingest's table."""
        route = next((r for r in self.routes if r.matches(topic)), None)
        if route is None:
            self._ingest.handle(topic, payload, now_ms(), retained=retained)
            return
        try:
            route.handle(client, topic, payload, now_ms())
        except Exception:
            # Logged and counted like any rejected message; dispatch goes on.
            log.exception("route for %.200r failed", topic)
            self._metrics.rejected.labels("handler_error").inc()

    async def _snapshot_read(self, client: aiomqtt.Client) -> None:
        """The snapshot's marker came back: every retained message before it is in, so
        the writer may reconcile once it has written them."""
        reconcile = self._writer.request_reconcile(self._ingest.end_snapshot())
        reconcile.add_done_callback(self._reconciled)
        await self._end_device_replay(client)
        self._snapshot_open = False
        await self._hand_over(client)

    async def _hand_over(self, client: aiomqtt.Client) -> None:
        """After a snapshot: leave live presence to the live subscription if there is
        one, else keep receiving it here (in a shared group, through the group)."""
        presence_filter = device_filter(TopicKind.PRESENCE, self._settings.prefix)
        group = self._settings.shared_group
        if self._live is not None and self._live.ready:
            # The live subscription was acknowledged before this UNSUBSCRIBE is sent, so
            # every event is routed to one of the two: none falls between them.
            drop = set(self._presence_subs)
            self._note_covered()
        elif group:
            # Shared subscriptions get no retained messages: the plain one read the
            # snapshot and the group's carries this member's share from now on.
            if shared(presence_filter, group) not in self._presence_subs:
                await client.subscribe(shared(presence_filter, group), qos=1)
                self._presence_subs.add(shared(presence_filter, group))
            drop = {presence_filter}
        else:
            return
        for topic_filter in sorted(drop & self._presence_subs):
            # Forgotten before the UNSUBSCRIBE goes out, not after its UNSUBACK: should the
            # live subscription be lost meanwhile, the follower must find no presence
            # subscription here and re-read, or live presence would have no subscriber
            # at all (births unheard until the next reconnect).
            self._presence_subs.discard(topic_filter)
            await client.unsubscribe(topic_filter)
        _raise_if_cancelled()

    async def _follow_live(
        self,
        client: aiomqtt.Client,
        resync: Callable[[aiomqtt.Client, str], Awaitable[None]],
    ) -> None:
        """Follow the live subscription of the command link: once it is in place, drop
        this link's live presence (unless a snapshot is being read; its end does that);
        when it is lost, take live presence back here at once, re-reading the retained
        state for what may have been missed meanwhile."""
        live = self._live
        assert live is not None
        while True:
            await live.changed.wait()
            live.changed.clear()
            gap = not live.ready or live.losses != self._losses_covered
            if gap and not self._presence_subs:
                await resync(client, "the live presence subscription was lost")
            elif live.ready and not self._snapshot_open:
                await self._hand_over(client)

    def _note_covered(self) -> None:
        if self._live is not None:
            self._losses_covered = self._live.losses

    async def _subscribe_presence(
        self, client: aiomqtt.Client, group: str | None, sync_topic: str, marker: str
    ) -> None:
        prefix = self._settings.prefix
        presence_filter = device_filter(TopicKind.PRESENCE, prefix)
        await client.publish(
            self.presence_topic,
            self._presence_payload(PresenceState.ONLINE),
            qos=1,
            retain=True,
        )
        self._ingest.start_snapshot()
        self._snapshot_open = True
        # The snapshot's own subscription (shared ones get no retained messages). Dropped
        # once the snapshot is in and live presence is taken care of (:meth:`_hand_over`).
        self._presence_subs = {presence_filter}
        self._note_covered()
        await client.subscribe(presence_filter, qos=1)
        # Telemetry at QoS 0: it is last-value-wins and retained, so what a PUBACK round
        # would protect is re-read from the retained copy on every (re)connect, and the
        # bridge skips an acknowledgement per message on its busiest topic. Presence,
        # acks and commands stay QoS 1.
        await client.subscribe(shared(device_filter(TopicKind.STATUS, prefix), group), qos=0)
        if group:
            # Every member watches the others' presence: a dead one's unwritten share
            # must be re-read.
            await client.subscribe(bridge_instances_filter(prefix), qos=1)
        await self._replay_each_device(client)
        await client.subscribe(sync_topic, qos=1)
        await client.publish(sync_topic, marker.encode(), qos=1)

    async def _subscribe_commands(
        self, client: aiomqtt.Client, group: str | None, v5: bool
    ) -> None:
        prefix = self._settings.prefix
        await client.subscribe(shared(device_filter(TopicKind.ACK, prefix), group), qos=1)
        cmd_filter = shared(device_filter(TopicKind.CMD, prefix), group)
        if v5 and not group:
            # No Local: the bridge need not hear its own commands echoed back.
            await client.subscribe(cmd_filter, options=SubscribeOptions(qos=1, noLocal=True))
        else:
            await client.subscribe(cmd_filter, qos=1)
        for route in self.routes:
            for topic_filter in route.filters():
                await client.subscribe(topic_filter, qos=1)
        if v5 and self._live is not None:
            # Live presence without the retained replay (retain handling 2): see
            # :class:`LivePresence`. Deaths and births arrive here as they happen.
            options = SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND)
            granted = await client.subscribe(
                shared(device_filter(TopicKind.PRESENCE, prefix), group), options=options
            )
            _raise_if_cancelled()
            if not _refused(granted):
                self._live.set(True)
            else:
                log.warning("the broker refused the live presence subscription: %s", granted)

    def _peer_went_down(self, payload: bytes) -> bool:
        # The same announcement can arrive more than once (the group's subscriptions
        # overlap on this topic): one resync per announcement is enough.
        if payload == self._last_peer_news:
            return False
        self._last_peer_news = payload
        try:
            peer = decode_bridge_presence(payload)
        except ContractError:
            return False
        return peer.instance != self._settings.instance and peer.state is not PresenceState.ONLINE

    def _reconciled(self, future: asyncio.Future[list[str]]) -> None:
        if not future.cancelled() and future.exception() is None:
            self.synced.set()

    async def announce_offline(self) -> None:
        """Clean shutdown: retained ``offline`` so nobody waits for the Will."""
        client = self._client
        if client is None or self.role is not LinkRole.PRESENCE:
            return
        try:
            await asyncio.wait_for(
                client.publish(
                    self.presence_topic,
                    self._presence_payload(PresenceState.OFFLINE),
                    qos=1,
                    retain=True,
                ),
                timeout=2,
            )
        except (aiomqtt.MqttError, TimeoutError) as exc:
            log.warning("could not announce the bridge offline: %s", exc)


def _refused(granted: object) -> bool:
    """Whether a SUBACK (as aiomqtt returns it: reason codes, or granted QoS on 3.1.1)
    refused the subscription."""
    codes = granted if isinstance(granted, tuple | list) else [granted]
    return any(getattr(code, "is_failure", False) or code == 0x80 for code in codes)


def _raise_if_cancelled() -> None:
    """Re-raise a cancellation that an await inside aiomqtt swallowed.

    On Python 3.11 ``asyncio.wait_for`` returns the result instead of raising when the
    cancellation and the broker's reply arrive together; aiomqtt waits for every SUBACK,
    UNSUBACK and PUBACK that way. The receive loop would then wait for the next message
    as if it had never been told to stop.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


__all__ = ["BridgeIdentity", "LinkRole", "LivePresence", "MqttLink"]
