"""What the kit saw and did, recorded as plain data (times are ``time.monotonic()``).

:class:`Recorder` turns the proxy's byte stream into :class:`LinkRecord`\\ s, thread-safe
(the proxy calls it from its own thread). :class:`Observations` is everything the
verdicts need; building one by hand is how the verdicts are unit-tested.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from paho.mqtt.client import topic_matches_sub

from bridge.conformance.wire import (
    Connack,
    Connect,
    Disconnect,
    Publish,
    StreamParser,
    Suback,
    Subscribe,
)


@dataclass
class LinkRecord:
    """One TCP connection of one kiosk through the kit's proxy."""

    device_id: str
    number: int
    opened_t: float
    connect: Connect | None = None
    connect_t: float | None = None
    connack: Connack | None = None
    connack_t: float | None = None
    publishes: list[tuple[float, Publish]] = field(default_factory=list)
    disconnect: Disconnect | None = None
    disconnect_t: float | None = None
    closed_t: float | None = None
    malformed: str | None = None
    #: SUBSCRIBEs waiting for their SUBACK, by packet id.
    pending_subscribes: dict[int, tuple[str, ...]] = field(default_factory=dict)
    #: Filters the broker granted on this link, with the time of their SUBACK.
    subscribed: list[tuple[float, str]] = field(default_factory=list)

    def subscribed_to(self, topic: str) -> bool:
        """Whether a granted filter on this link matches ``topic``."""
        return any(topic_matches_sub(f, topic) for _, f in list(self.subscribed))

    @property
    def accepted(self) -> bool:
        return self.connack is not None and self.connack.return_code == 0


@dataclass(frozen=True, slots=True)
class BrokerMessage:
    """A message the kit's own client received from the broker."""

    t: float
    topic: str
    payload: bytes
    retain: bool


@dataclass(frozen=True, slots=True)
class SentCommand:
    purpose: str
    command_id: str
    payload: bytes
    sent_t: float
    correlated: bool


@dataclass
class Observations:
    device_id: str
    second_device_id: str
    keepalive_range: tuple[int, int] = (10, 30)
    links: list[LinkRecord] = field(default_factory=list)
    broker_messages: list[BrokerMessage] = field(default_factory=list)
    #: By purpose: refresh, redelivery, expired, unknown, foreign_wipe, set_config,
    #: rotate_token, reconnect.
    commands: dict[str, SentCommand] = field(default_factory=dict)
    config_version: int | None = None
    rotate_token: str | None = None
    rotate_drop_t: float | None = None
    reconnect_delay_s: float = 2.0
    heal_injected_t: float | None = None
    heal_injected_session: int | None = None
    sigterm_t: float | None = None
    stop_exited: int | None = None
    stop_retained: bytes | None = None
    stop_checked_t: float | None = None
    kill_t: float | None = None
    backoff_drop_t: float | None = None
    backoff_attempts: list[float] = field(default_factory=list)
    backoff_restore_t: float | None = None
    blackhole_t: float | None = None
    #: Why a step could not be taken (step -> reason), shown in the verdicts it affects.
    skipped: dict[str, str] = field(default_factory=dict)

    def device_links(self, device_id: str) -> list[LinkRecord]:
        links = [link for link in self.links if link.device_id == device_id]
        return sorted(links, key=lambda link: link.opened_t)


class Recorder:
    """Feeds :class:`LinkRecord`\\ s from one proxy's tap (one device per proxy)."""

    def __init__(self, device_id: str, into: list[LinkRecord]) -> None:
        self.device_id = device_id
        self._links = into
        self._mine: dict[int, LinkRecord] = {}
        self._parsers: dict[tuple[int, bool], StreamParser] = {}
        self._lock = threading.Lock()

    def tap(self, number: int, upward: bool, data: bytes) -> None:
        now = time.monotonic()
        with self._lock:
            link = self._mine.get(number)
            if link is None:
                link = LinkRecord(self.device_id, number, now)
                self._mine[number] = link
                self._links.append(link)
            if not data:
                if upward and link.closed_t is None:
                    link.closed_t = now
                return
            parser = self._parsers.setdefault((number, upward), StreamParser())
            if not upward:
                up = self._parsers.get((number, True))
                parser.v5 = up.v5 if up is not None else False
            for packet in parser.feed(data):
                self._record(link, packet, upward, now)
            if parser.broken is not None and link.malformed is None:
                link.malformed = parser.broken

    def _record(self, link: LinkRecord, packet: object, upward: bool, now: float) -> None:
        if upward and isinstance(packet, Connect) and link.connect is None:
            link.connect, link.connect_t = packet, now
        elif upward and isinstance(packet, Publish):
            link.publishes.append((now, packet))
        elif upward and isinstance(packet, Subscribe):
            link.pending_subscribes[packet.packet_id] = packet.filters
        elif not upward and isinstance(packet, Suback):
            filters = link.pending_subscribes.pop(packet.packet_id, ())
            for topic_filter, code in zip(filters, packet.reason_codes, strict=False):
                if code < 0x80:
                    link.subscribed.append((now, topic_filter))
        elif upward and isinstance(packet, Disconnect) and link.disconnect is None:
            link.disconnect, link.disconnect_t = packet, now
        elif not upward and isinstance(packet, Connack) and link.connack is None:
            link.connack, link.connack_t = packet, now

    def snapshot(self) -> list[LinkRecord]:
        """This device's links so far (the records are shared: read, do not keep)."""
        with self._lock:
            return sorted(self._mine.values(), key=lambda link: link.opened_t)

    def mark_closed(self, before: float) -> None:
        """The proxy reset every link it had at ``before``: close those records."""
        now = time.monotonic()
        with self._lock:
            for link in self._mine.values():
                if link.closed_t is None and link.opened_t < before:
                    link.closed_t = now
