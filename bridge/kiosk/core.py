"""The kiosk's MQTT protocol logic, independent of who runs the sockets.

One :class:`KioskCore` is one device: sessions, Will, birth, self-healing presence,
status, config, reconnects and commands. Everything here runs on one asyncio loop; a
:class:`bridge.kiosk.drivers.NetworkDriver` moves the bytes (paho's own thread for the
standalone agent, a shared loop for the fleet simulator).

Each connection attempt uses a fresh paho client: the Will (with the new session) is
part of CONNECT, and a fresh client cannot replay a previous session's birth or status
after the new birth. Acks, which must not be lost, are kept in an outbox and replayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from bridge.backoff import Backoff
from bridge.broker_url import BrokerAddress, NodeCursor
from bridge.clock import now_ms
from bridge.kiosk.commands import CommandHandler, CommandProcessor, ReplyRoute
from bridge.kiosk.credentials import TokenFile
from bridge.kiosk.drivers import ConnectParams, NetworkDriver
from bridge.kiosk.healing import SETTLE_S, PresenceValue, Seen, classify_presence
from bridge.kiosk.metrics import check_metric_names, is_significant
from bridge.kiosk.options import AgentOptions, MqttProtocol
from bridge.kiosk.state import AgentState
from schemas import (
    Ack,
    CommandType,
    ContractError,
    DeviceConfig,
    InvalidPayload,
    OfflineReason,
    PresenceLost,
    PresenceOffline,
    PresenceOnline,
    Status,
    TopicKind,
    decode,
    decode_presence,
    device_topic,
    encode,
    parse_topic,
    validate_device_id,
)

logger = logging.getLogger(__name__)

#: CONNACK reason "Unsupported Protocol Version" (MQTT 5; paho maps 3.1.1's code 1 to it).
#: CONNACK reasons meaning "this credential will not do" (MQTT 5 codes; paho reports
#: 3.1.1's return codes 4 and 5 as the same two).
_CREDENTIALS_REFUSED = frozenset({134, 135})
_UNSUPPORTED_PROTOCOL = 0x84
#: More re-births than this within the window means another client fights for the
#: presence topic (same id twice?): stop answering instead of looping with it.
_HEAL_LIMIT = 5
_HEAL_WINDOW_S = 10.0


class Mode(enum.Enum):
    IDLE = "idle"
    RUNNING = "running"
    #: Announced offline, waiting to reconnect (reconnect command, simulated reboot).
    CYCLING = "cycling"
    #: Frozen by the simulator's black hole: does nothing, keeps the connection.
    HUNG = "hung"
    STOPPING = "stopping"
    STOPPED = "stopped"


def _consume(fut: asyncio.Future[Any]) -> None:
    # Many publishes are fire-and-forget; mark their failure as seen so asyncio does not
    # log "exception was never retrieved" for every message lost with a connection.
    if not fut.cancelled():
        fut.exception()


@dataclass(eq=False)
class _Connection:
    client: mqtt.Client
    session: int
    v5: bool
    closed_future: asyncio.Future[None]
    connacked: bool = False
    #: CONNACK reason code of a refused attempt.
    refused: int | None = None
    closed: bool = False
    seq: int = 0
    pending: dict[int, asyncio.Future[None]] = field(default_factory=dict)
    heals: deque[float] = field(default_factory=deque)
    #: From the birth's publish until our own offline: the only time healing applies.
    live: bool = False
    #: The last value received on our presence topic: what the broker retains there.
    last_presence: PresenceValue | None = None
    #: Runs ``SETTLE_S`` after the last presence message (KB-PRES-7).
    heal_timer: asyncio.TimerHandle | None = None


@dataclass(eq=False)
class _Outgoing:
    ack: Ack
    route: ReplyRoute | None
    done: asyncio.Future[None]


class KioskCore:
    """One kiosk's protocol state machine; every method runs on ``loop``'s thread."""

    def __init__(
        self,
        device_id: str,
        broker: BrokerAddress,
        *,
        state: AgentState,
        driver: NetworkDriver,
        loop: asyncio.AbstractEventLoop,
        options: AgentOptions | None = None,
        password: str | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.device_id = validate_device_id(device_id)
        self.broker = broker
        #: The broker list (``--broker n1,n2,...``): one step on at every failure.
        self._nodes = NodeCursor(broker)
        #: The node of the last connection that came online (None: never yet).
        self.online_node: str | None = None
        self.state = state
        self.options = options or AgentOptions()
        self._driver = driver
        self._loop = loop
        self.tokens = TokenFile(state.directory, fsync=state.fsync)
        stored = self.tokens.load()
        # The stored token wins: after a claim or a rotation it is the current credential,
        # and a password from the command line or the URL is only the first one.
        self._password = stored or (password if password is not None else broker.password)
        self._rng = rng or random.Random()
        self._backoff = Backoff(
            base=self.options.backoff_base_s, cap=self.options.backoff_cap_s, rng=self._rng
        )
        self._topics = {
            kind: device_topic(device_id, kind, self.options.prefix) for kind in TopicKind
        }
        self.commands = CommandProcessor(self, ack_timeout_s=self.options.publish_timeout_s)

        self.mode = Mode.IDLE
        #: Set once birth and subscriptions are acknowledged; cleared on any loss.
        self.connected = threading.Event()
        self.stopped = threading.Event()
        self.wiped = False
        self.session = 0
        self.sessions: list[int] = []
        self.counters: Counter[str] = Counter()
        #: Every ack published, in order (tests and the simulator read it).
        self.acks_sent: list[Ack] = []
        self.config: DeviceConfig | None = state.config
        self.on_config: Callable[[DeviceConfig], None] | None = None
        #: Called on the loop each time the agent comes online (the simulator counts).
        self.on_online: Callable[[KioskCore], None] | None = None

        self._conn: _Connection | None = None
        self._protocol = (
            MqttProtocol.V311 if self.options.protocol is MqttProtocol.V311 else MqttProtocol.V5
        )
        self._protocol_settled = self.options.protocol is not MqttProtocol.AUTO
        self._metrics: dict[str, Any] = {}
        self._reported: dict[str, Any] = {}
        self._status_interval = float(
            self.config.status_interval_s if self.config else self.options.status_interval_s
        )
        self._reconnect_timer: asyncio.TimerHandle | None = None
        self._status_timer: asyncio.TimerHandle | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._outbox: dict[int, _Outgoing] = {}
        self._outbox_keys = itertools.count()
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- public surface ------------------------------------------------------------------

    @property
    def node(self) -> BrokerAddress:
        """The broker node of the current (or next) connection attempt."""
        return self._nodes.current

    @property
    def protocol(self) -> MqttProtocol:
        """The protocol of the current (or next) connection attempt."""
        return self._protocol

    @property
    def status_interval_s(self) -> float:
        return self._status_interval

    @property
    def client(self) -> mqtt.Client | None:
        """The paho client of the current connection (fault injection in the simulator)."""
        return self._conn.client if self._conn is not None else None

    def on_command(self, command_type: str | CommandType, handler: CommandHandler) -> None:
        self.commands.on_command(command_type, handler)

    def begin(self) -> None:
        """Start connecting (returns at once; ``connected`` tells when it is up)."""
        if self.mode is not Mode.IDLE:
            raise RuntimeError(f"{self.device_id}: already started")
        self.mode = Mode.RUNNING
        self._connect()

    async def stop(
        self, reason: OfflineReason = OfflineReason.SHUTDOWN, *, announce: bool = True
    ) -> None:
        """Announce ``offline`` (retained, QoS 1, acknowledged), then DISCONNECT cleanly.

        A clean DISCONNECT (reason 0, "normal") tells the broker not to publish the Will.
        """
        if await self._shut_down(reason, announce=announce):
            self._finish_stop()

    async def _shut_down(self, reason: OfflineReason, *, announce: bool) -> bool:
        """Everything of :meth:`stop` but the final ``stopped``; False if already stopping."""
        if self.mode in (Mode.STOPPING, Mode.STOPPED):
            return False
        self.mode = Mode.STOPPING
        self._cancel_timers()
        self.commands.cancel_running()
        conn = self._conn
        if conn is not None and not conn.closed:
            if conn.connacked:
                await self._announce_and_disconnect(conn, reason if announce else None)
            else:
                self._driver.abort(conn.client)
                await self._wait_closed(conn)
        return True

    def kill(self, *, reconnect: bool = False) -> None:
        """Drop the TCP connection without DISCONNECT: the broker publishes the Will.

        ``reconnect=True`` is a network blip (the agent comes back with a new session);
        otherwise the agent stays down, like a kiosk that lost power.
        """
        if not reconnect:
            self._cancel_timers()
            self.commands.cancel_running()
            self.mode = Mode.STOPPED
        conn = self._conn
        if conn is not None and not conn.closed:
            self._driver.abort(conn.client)
        if not reconnect:
            self.connected.clear()
            self.stopped.set()

    def hang(self) -> None:
        """Stop acting (no status, no reconnect) but leave the connection as it is.

        With the driver freezing the socket this is a device behind a black hole: only
        the broker's keepalive can tell that it is gone.
        """
        self._cancel_timers()
        self.mode = Mode.HUNG
        self.connected.clear()

    def resume(self) -> None:
        """Undo :meth:`hang`: act again; a connection the broker dropped meanwhile is
        noticed at the next read and replaced as after any loss."""
        if self.mode is not Mode.HUNG:
            return
        self.mode = Mode.RUNNING
        conn = self._conn
        if conn is None:
            self._schedule_reconnect(0.0)
        elif conn.connacked and not conn.closed:
            self.connected.set()
            self._schedule_status()

    async def wait_closed(self) -> None:
        """Wait until the current connection (if any) has gone (bound it with a timeout)."""
        conn = self._conn
        if conn is not None:
            await asyncio.shield(conn.closed_future)

    def update_metrics(self, **fields: Any) -> None:
        """Merge telemetry; a significant change is published at once, the rest waits.

        Values are the caller's to validate (:class:`KioskAgent` does, in the app's
        thread); only names are checked here, which keeps a 5,000-device fleet cheap.
        """
        check_metric_names(fields)
        for name, value in fields.items():
            if value is None:
                self._metrics.pop(name, None)
            else:
                self._metrics[name] = value
        if self.connected.is_set() and is_significant(self._reported, self._metrics):
            self.counters["status_on_change"] += 1
            self._publish_status()
            self._schedule_status()

    async def announced_reconnect(self, reason: OfflineReason, delay_s: float) -> None:
        """Say ``offline`` with ``reason``, disconnect cleanly, wait, come back (new session)."""
        conn = self._conn
        if self.mode is not Mode.RUNNING or conn is None or not conn.connacked:
            return
        self.mode = Mode.CYCLING
        self._cancel_timers()
        await self._announce_and_disconnect(conn, reason)
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        if self.mode is Mode.CYCLING:
            self.mode = Mode.RUNNING
            self._connect()

    async def wipe(self) -> None:
        """The ``wipe`` command: announce ``offline`` with reason ``wipe`` (KB-CMD-9),
        disconnect cleanly, then forget everything: the CMS sees why the device went."""
        if not await self._shut_down(OfflineReason.WIPE, announce=True):
            return
        self.state.wipe()
        self._password = None
        self.config = None
        self.wiped = True
        logger.warning("%s: wiped: state and credentials cleared, agent stopped", self.device_id)
        self._finish_stop()

    def adopt_token(self, token: str) -> None:
        """The ``rotate_token`` command: store the new token durably, then use it from
        the next connection on. This connection goes on with the old one: the broker
        switches once our ``succeeded`` ack is in, and disconnects us to reconnect."""
        self.tokens.save(token)
        self._password = token
        logger.info("%s: new token stored; used from the next connection on", self.device_id)

    def apply_config(self, config: DeviceConfig) -> None:
        """Adopt a desired config (retained ``config`` or ``set_config``); older is refused."""
        current = self.config
        if current is not None and config.version < current.version:
            raise ValueError(
                f"config version {config.version} is older than the applied {current.version}"
            )
        if float(config.status_interval_s) != self._status_interval:
            self._status_interval = float(config.status_interval_s)
            if self.connected.is_set():
                self._schedule_status()
        if config != current:
            self.state.set_config(config)
            # Last: other threads read ``config`` as "applied".
            self.config = config
            if self.connected.is_set() and (current is None or current.version != config.version):
                # Report the new version at once: the bridge shows drift until it does.
                self._publish_status()
                self._schedule_status()
        if self.on_config is not None:
            self.on_config(config)

    # -- connecting ----------------------------------------------------------------------

    def _new_client(self, session: int, v5: bool) -> mqtt.Client:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.device_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            # 3.1.1 takes the persistent session here; MQTT 5 takes it at connect().
            clean_session=None if v5 else False,
            # Reconnecting is ours: every attempt needs a new session in its Will.
            reconnect_on_failure=False,
        )
        client.username_pw_set(self.device_id, self._password)
        client.manual_ack_set(True)
        client.will_set(
            self._topics[TopicKind.PRESENCE],
            encode(PresenceLost(session=session)),
            qos=1,
            retain=True,
        )
        if self.node.tls:
            client.tls_set()
        return client

    def _bind(self, conn: _Connection) -> None:
        post = self._driver.post
        client = conn.client
        client.on_connect = lambda _c, _u, _f, rc, _p: post(self._on_connack, conn, rc)
        client.on_disconnect = lambda _c, _u, _f, rc, _p: post(self._on_disconnect, conn, rc)
        client.on_message = lambda _c, _u, msg: post(self._on_message, conn, msg)
        client.on_publish = lambda _c, _u, mid, rc, _p: post(self._on_acked, conn, mid, rc)
        client.on_subscribe = lambda _c, _u, mid, rcs, _p: post(self._on_suback, conn, mid, rcs)

    def _connect(self) -> None:
        self._reconnect_timer = None
        if self.mode is not Mode.RUNNING:
            return
        session = self.state.next_session(now_ms())
        self.session = session
        self.sessions.append(session)
        v5 = self._protocol is MqttProtocol.V5
        conn = _Connection(self._new_client(session, v5), session, v5, self._loop.create_future())
        self._bind(conn)
        self._conn = conn
        self.counters["connect_attempts"] += 1
        properties = None
        if v5:
            # paho's Properties.__init__ carries no annotations.
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = self.options.session_expiry_s
        params = ConnectParams(
            self.node.host, self.node.port, self.options.keepalive, v5, properties
        )
        try:
            self._driver.open(conn.client, params)
        except (OSError, ValueError) as exc:
            logger.info("%s: cannot reach %s: %s", self.device_id, self.node.url, exc)
            self._nodes.failed()
            self._closed(conn)
            self._conn = None
            self._schedule_reconnect(self._backoff.next_delay())
            return
        timeout = self.options.connect_timeout_s
        if v5 and not self._protocol_settled:
            timeout = min(timeout, self.options.protocol_probe_timeout_s)
        self._watchdog = self._loop.call_later(timeout, self._connect_timed_out, conn)

    def _connect_timed_out(self, conn: _Connection) -> None:
        self._watchdog = None
        if conn.connacked or conn.closed:
            return
        logger.info("%s: no CONNACK in time (%s)", self.device_id, "MQTT 5" if conn.v5 else "3.1.1")
        self._driver.abort(conn.client)
        # If paho had already lost the socket there will be no on_disconnect: force one.
        self._loop.call_later(5.0, self._force_close, conn)

    def _force_close(self, conn: _Connection) -> None:
        if not conn.closed:
            self._on_disconnect(conn, None)

    def _on_connack(self, conn: _Connection, reason: ReasonCode) -> None:
        if conn is not self._conn or conn.closed:
            return
        if reason.is_failure:
            conn.refused = reason.value
            self.counters["connack_refused"] += 1
            if reason.value in _CREDENTIALS_REFUSED:
                # Told apart from the rest: a kiosk that may claim can get a new one.
                self.counters["credentials_refused"] += 1
            if conn.v5 and not self._protocol_settled and reason.value == _UNSUPPORTED_PROTOCOL:
                logger.info("%s: broker refuses MQTT 5; retrying with 3.1.1", self.device_id)
            else:
                logger.warning("%s: connection refused: %s", self.device_id, reason)
            self._driver.abort(conn.client)
            return
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        conn.connacked = True
        self._protocol_settled = True
        if self.mode is not Mode.RUNNING:
            # stop() raced with the CONNACK; it waits for this connection to close.
            conn.client.disconnect()
            return
        # Birth first, then subscribe (KB-PRES-2): the retained value replayed on
        # subscribing is then our own birth, so a fresh session's first value needs no
        # answer; the backlog of a resumed one settles first (KB-PRES-7).
        birth = self._publish_birth(conn)
        conn.live = True
        subscribed = self._subscribe(conn)
        self._publish_status()
        self._schedule_status()
        for item in list(self._outbox.values()):
            self._publish_ack(conn, item)
        self._spawn(self._become_ready(conn, birth, subscribed))

    async def _become_ready(
        self, conn: _Connection, birth: asyncio.Future[None], subscribed: asyncio.Future[None]
    ) -> None:
        try:
            await asyncio.wait_for(
                asyncio.gather(birth, subscribed), self.options.publish_timeout_s * 2
            )
        except ConnectionError:
            return
        except TimeoutError:
            if not conn.closed and conn is self._conn:
                logger.warning("%s: broker did not acknowledge birth/subscribe", self.device_id)
                self._driver.abort(conn.client)
            return
        if conn is self._conn and not conn.closed and self.mode is Mode.RUNNING:
            self._backoff.reset()
            self._nodes.succeeded()
            self.counters["connects"] += 1
            if self.online_node != self.node.url:
                if self.online_node is not None or len(self._nodes.nodes) > 1:
                    logger.info("%s: online on broker node %s", self.device_id, self.node.url)
                self.online_node = self.node.url
            self.connected.set()
            if self.on_online is not None:
                self.on_online(self)
            logger.debug(
                "%s: online, session %d (%s)",
                self.device_id,
                conn.session,
                "MQTT 5" if conn.v5 else "MQTT 3.1.1",
            )

    def _on_disconnect(self, conn: _Connection, reason: ReasonCode | None) -> None:
        if conn.closed:
            return
        self._closed(conn)
        if conn is not self._conn:
            return
        self._conn = None
        self.connected.clear()
        self._cancel_timers()
        if self.mode is not Mode.RUNNING:
            return
        self.counters["connection_lost" if conn.connacked else "connect_failed"] += 1
        probing = not conn.connacked and not self._protocol_settled
        # Refused for its version, or no answer at all: what 3.1.1-only brokers do.
        # Bad credentials and the like are no reason to change protocol.
        if probing and conn.v5 and conn.refused in (None, _UNSUPPORTED_PROTOCOL):
            self._protocol = MqttProtocol.V311
            delay = 0.0
        else:
            if probing and not conn.v5:
                self._protocol = MqttProtocol.V5
            # The next node of the list (a node that died takes its connections along).
            self._nodes.failed()
            delay = self._backoff.next_delay()
        logger.info("%s: disconnected (%s); reconnecting in %.1fs", self.device_id, reason, delay)
        self._schedule_reconnect(delay)

    def _closed(self, conn: _Connection) -> None:
        conn.closed = True
        if conn.heal_timer is not None:
            conn.heal_timer.cancel()
            conn.heal_timer = None
        for fut in conn.pending.values():
            if not fut.done():
                fut.set_exception(ConnectionError("connection closed before the broker answered"))
        conn.pending.clear()
        if not conn.closed_future.done():
            conn.closed_future.set_result(None)
        self._driver.release(conn.client)

    def _schedule_reconnect(self, delay: float) -> None:
        if self._reconnect_timer is not None:
            self._reconnect_timer.cancel()
        self._reconnect_timer = self._loop.call_later(delay, self._connect)

    async def _announce_and_disconnect(
        self, conn: _Connection, reason: OfflineReason | None
    ) -> None:
        self.connected.clear()
        # Our own offline ends the session: its echo, and anything after it, is never
        # a reason to re-publish the birth (KB-PRES-5).
        conn.live = False
        if reason is not None:
            offline = PresenceOffline(session=conn.session, ts=now_ms(), reason=reason)
            sent = self._publish(conn, self._topics[TopicKind.PRESENCE], encode(offline), 1, True)
            try:
                await asyncio.wait_for(asyncio.shield(sent), self.options.publish_timeout_s)
            except (TimeoutError, ConnectionError) as exc:
                logger.warning("%s: offline announcement not confirmed: %r", self.device_id, exc)
        if not conn.closed:
            if conn.v5:
                conn.client.disconnect(
                    reasoncode=ReasonCode(PacketTypes.DISCONNECT, "Normal disconnection")
                )
            else:
                conn.client.disconnect()
            await self._wait_closed(conn)

    async def _wait_closed(self, conn: _Connection) -> None:
        try:
            await asyncio.wait_for(
                asyncio.shield(conn.closed_future), self.options.publish_timeout_s
            )
        except TimeoutError:
            logger.warning("%s: connection did not close in time; dropping it", self.device_id)
            self._driver.abort(conn.client)
            self._on_disconnect(conn, None)

    def _finish_stop(self) -> None:
        self._cancel_timers()
        self.mode = Mode.STOPPED
        self.connected.clear()
        self.stopped.set()

    def _cancel_timers(self) -> None:
        for name in ("_reconnect_timer", "_status_timer", "_watchdog"):
            timer: asyncio.TimerHandle | None = getattr(self, name)
            if timer is not None:
                timer.cancel()
                setattr(self, name, None)

    # -- publishing ----------------------------------------------------------------------

    def _publish(
        self,
        conn: _Connection,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        properties: Properties | None = None,
    ) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = self._loop.create_future()
        fut.add_done_callback(_consume)
        if conn.closed:
            fut.set_exception(ConnectionError("not connected"))
            return fut
        info = conn.client.publish(topic, payload, qos, retain, properties if conn.v5 else None)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            fut.set_exception(ConnectionError(mqtt.error_string(info.rc)))
            return fut
        conn.pending[info.mid] = fut
        return fut

    def _on_acked(self, conn: _Connection, mid: int, reason: ReasonCode) -> None:
        fut = conn.pending.pop(mid, None)
        if fut is None or fut.done():
            return
        if reason.is_failure:
            fut.set_exception(ConnectionError(f"broker refused the publish: {reason}"))
        else:
            fut.set_result(None)

    def _subscribe(self, conn: _Connection) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = self._loop.create_future()
        fut.add_done_callback(_consume)
        rc, mid = conn.client.subscribe(
            [
                (self._topics[kind], 1)
                for kind in (TopicKind.PRESENCE, TopicKind.CMD, TopicKind.CONFIG)
            ]
        )
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            fut.set_exception(ConnectionError(mqtt.error_string(rc)))
        else:
            conn.pending[mid] = fut
        return fut

    def _on_suback(self, conn: _Connection, mid: int, reasons: list[ReasonCode]) -> None:
        fut = conn.pending.pop(mid, None)
        if fut is None or fut.done():
            return
        refused = [str(r) for r in reasons if r.is_failure]
        if refused:
            fut.set_exception(ConnectionError(f"subscription refused: {', '.join(refused)}"))
        else:
            fut.set_result(None)

    def _birth(self, conn: _Connection) -> PresenceOnline:
        ip = self.options.ip_address
        if ip is None:
            sock: Any = conn.client.socket()  # a real socket; paho types it "socket-like"
            with contextlib.suppress(OSError, AttributeError, IndexError):
                ip = str(sock.getsockname()[0]) if sock is not None else None
        return PresenceOnline(
            session=conn.session,
            ts=now_ms(),
            app_version=self.options.app_version,
            android_version=self.options.android_version,
            ip_address=ip,
            mac_address=self.options.mac_address,
        )

    def _publish_birth(self, conn: _Connection) -> asyncio.Future[None]:
        self.counters["births"] += 1
        return self._publish(
            conn, self._topics[TopicKind.PRESENCE], encode(self._birth(conn)), 1, True
        )

    def _publish_status(self) -> None:
        conn = self._conn
        if conn is None or not conn.connacked or conn.closed:
            return
        # Reporting the applied config version makes drift from the desired config visible.
        config_version = self.config.version if self.config is not None else None
        status = Status(
            session=conn.session,
            seq=conn.seq,
            ts=now_ms(),
            config_version=config_version,
            **self._metrics,
        )
        conn.seq += 1
        self._reported = dict(self._metrics)
        self.counters["status_sent"] += 1
        self._publish(
            conn, self._topics[TopicKind.STATUS], encode(status), self.options.status_qos, True
        )

    def _schedule_status(self) -> None:
        if self._status_timer is not None:
            self._status_timer.cancel()
        # +-10% so a fleet that came up together does not report in lockstep forever.
        delay = self._status_interval * self._rng.uniform(0.9, 1.1)
        self._status_timer = self._loop.call_later(delay, self._status_tick)

    def _status_tick(self) -> None:
        self._status_timer = None
        self._publish_status()
        if self._conn is not None and self._conn.connacked:
            self._schedule_status()

    # -- acks (CommandHost) ------------------------------------------------------------------

    def send_ack(self, ack: Ack, route: ReplyRoute | None) -> asyncio.Future[None]:
        done: asyncio.Future[None] = self._loop.create_future()
        done.add_done_callback(_consume)
        key = next(self._outbox_keys)
        item = _Outgoing(ack, route, done)
        self._outbox[key] = item
        done.add_done_callback(lambda _f: self._outbox.pop(key, None))
        self.acks_sent.append(ack)
        conn = self._conn
        if conn is not None and conn.connacked and not conn.closed:
            self._publish_ack(conn, item)
        return done

    def _publish_ack(self, conn: _Connection, item: _Outgoing) -> None:
        # Always our own ack topic (KB-CMD-1): the broker's ACL lets a kiosk publish
        # nowhere else, and a Response Topic is informative only (it names this same
        # topic when the bridge sets it); the Correlation Data is echoed as received.
        topic = self._topics[TopicKind.ACK]
        properties = None
        if item.route is not None and conn.v5 and item.route.correlation_data is not None:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            properties.CorrelationData = item.route.correlation_data
        sent = self._publish(conn, topic, encode(item.ack), 1, False, properties)

        def settle(fut: asyncio.Future[None]) -> None:
            # A failure leaves the item in the outbox for the next connection.
            if not fut.cancelled() and fut.exception() is None and not item.done.done():
                item.done.set_result(None)

        sent.add_done_callback(settle)

    # -- receiving ------------------------------------------------------------------------

    def _on_message(self, conn: _Connection, msg: mqtt.MQTTMessage) -> None:
        if conn is not self._conn or conn.closed:
            return
        try:
            where = parse_topic(msg.topic, self.options.prefix)
        except (ContractError, UnicodeDecodeError):
            return
        if where.device_id != self.device_id:
            self._ack_delivery(conn, msg)
            return
        if where.kind is TopicKind.CMD:
            if self.mode in (Mode.STOPPING, Mode.STOPPED, Mode.HUNG):
                # Not acknowledged: the broker keeps it in our session and redelivers it
                # when we are back, instead of it dying with this process.
                return
            self.commands.handle(bytes(msg.payload), self._reply_route(conn, msg))
        elif where.kind is TopicKind.PRESENCE:
            self._on_presence(conn, bytes(msg.payload))
        elif where.kind is TopicKind.CONFIG:
            self._on_config(bytes(msg.payload))
        self._ack_delivery(conn, msg)

    def _ack_delivery(self, conn: _Connection, msg: mqtt.MQTTMessage) -> None:
        # Manual PUBACK, sent after the command id is persisted: a crash in between
        # gets the command redelivered (and de-duplicated), never silently dropped.
        if msg.qos > 0 and not conn.closed:
            conn.client.ack(msg.mid, msg.qos)

    def _reply_route(self, conn: _Connection, msg: mqtt.MQTTMessage) -> ReplyRoute | None:
        if not conn.v5 or msg.properties is None:
            return None
        topic = getattr(msg.properties, "ResponseTopic", None)
        correlation = getattr(msg.properties, "CorrelationData", None)
        if topic and topic != self._topics[TopicKind.ACK]:
            self.counters["response_topic_ignored"] += 1
        if not topic and correlation is None:
            return None
        return ReplyRoute(str(topic or self._topics[TopicKind.ACK]), correlation)

    def _on_presence(self, conn: _Connection, payload: bytes) -> None:
        if self.mode is not Mode.RUNNING or not conn.connacked:
            return
        try:
            seen = decode_presence(payload) if payload else None
        except InvalidPayload:
            seen = None
        # One topic's messages keep their order, so the last one received is what the
        # broker retains now; it is judged once it has stood for SETTLE_S, after the
        # backlog of a resumed session (our old Will, queued there) has passed.
        conn.last_presence = seen
        if seen is not None and seen.session > conn.session:
            # Never answered: two clients re-publishing over each other would not stop.
            self.counters["presence_newer_session"] += 1
            logger.warning(
                "%s: presence of a newer session %d than ours (%d): is this id used twice?",
                self.device_id,
                seen.session,
                conn.session,
            )
        if conn.heal_timer is not None:
            conn.heal_timer.cancel()
        conn.heal_timer = self._loop.call_later(SETTLE_S, self._settle_presence, conn)

    def _settle_presence(self, conn: _Connection) -> None:
        conn.heal_timer = None
        if conn is not self._conn or conn.closed:
            return
        seen = conn.last_presence
        verdict = classify_presence(
            seen, conn.session, live=conn.live and self.mode is Mode.RUNNING
        )
        if verdict is not Seen.HEAL:
            return
        # An older session's value (typically its late Will) overwrote our birth while
        # we are live: the truth is that we are online, so say it again (KB-PRES-6).
        now = time.monotonic()
        while conn.heals and now - conn.heals[0] > _HEAL_WINDOW_S:
            conn.heals.popleft()
        if len(conn.heals) >= _HEAL_LIMIT:
            self.counters["heals_suppressed"] += 1
            if self.counters["heals_suppressed"] == 1:
                logger.warning(
                    "%s: presence keeps being overwritten; not re-announcing", self.device_id
                )
            return
        conn.heals.append(now)
        self.counters["heals"] += 1
        logger.info(
            "%s: presence overwritten by session %d (%s); re-publishing birth",
            self.device_id,
            seen.session if seen is not None else 0,
            getattr(seen, "state", "invalid"),
        )
        self._publish_birth(conn)

    def _on_config(self, payload: bytes) -> None:
        if not payload:
            return
        try:
            config = decode(DeviceConfig, payload)
            self.apply_config(config)
        except (InvalidPayload, ValueError) as exc:
            self.counters["bad_config"] += 1
            logger.warning("%s: ignoring config: %s", self.device_id, exc)

    async def drain(self) -> None:
        """Let the agent's own background tasks finish (after stop or kill)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coro: Any) -> None:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
