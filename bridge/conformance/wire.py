"""Reading the MQTT packets that pass the kit's proxy (pure: bytes in, packets out).

Only what the clauses need is decoded: CONNECT (client id, clean flag, keepalive, Will,
credentials, session expiry), PUBLISH (topic, QoS, retain, payload, correlation data),
SUBSCRIBE (packet id, filters), SUBACK (packet id, reason codes), DISCONNECT (reason
code) and CONNACK (return code). Every other packet is framed and skipped. MQTT 3.1.1
(level 4) and 5 (level 5) are understood; 3.1 (level 3) is framed as 3.1.1.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

CONNECT, CONNACK, PUBLISH, SUBSCRIBE, SUBACK, DISCONNECT = 1, 2, 3, 8, 9, 14

# MQTT 5 property identifiers -> value kind (b byte, h 2 bytes, i 4 bytes, v varint,
# s UTF-8 string, d binary data, p string pair).
_PROPERTY_KINDS: dict[int, str] = {
    0x01: "b", 0x02: "i", 0x03: "s", 0x08: "s", 0x09: "d", 0x0B: "v", 0x11: "i",
    0x12: "s", 0x13: "h", 0x15: "s", 0x16: "d", 0x17: "b", 0x18: "i", 0x19: "b",
    0x1A: "s", 0x1C: "s", 0x1F: "s", 0x21: "h", 0x22: "h", 0x23: "h", 0x24: "b",
    0x25: "b", 0x26: "p", 0x27: "i", 0x28: "b", 0x29: "b", 0x2A: "b",
}  # fmt: skip
SESSION_EXPIRY = 0x11
CORRELATION_DATA = 0x09
RESPONSE_TOPIC = 0x08
TOPIC_ALIAS = 0x23


class MalformedPacket(ValueError):
    """Bytes that are not MQTT (the stream cannot be followed after this)."""


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass(frozen=True, slots=True)
class Connect:
    protocol_level: int
    client_id: str
    clean: bool
    keepalive: int
    will: Will | None
    username: str | None
    password: bytes | None
    session_expiry: int | None = None

    @property
    def v5(self) -> bool:
        return self.protocol_level == 5


@dataclass(frozen=True, slots=True)
class Publish:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    correlation_data: bytes | None = None
    response_topic: str | None = None


@dataclass(frozen=True, slots=True)
class Disconnect:
    reason_code: int = 0


@dataclass(frozen=True, slots=True)
class Connack:
    return_code: int


@dataclass(frozen=True, slots=True)
class Subscribe:
    packet_id: int
    filters: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Suback:
    packet_id: int
    #: One per filter: the granted QoS (0-2), or 0x80 and above for a refusal.
    reason_codes: tuple[int, ...]


Packet = Connect | Publish | Subscribe | Suback | Disconnect | Connack


class _Cursor:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise MalformedPacket("packet shorter than its fields")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def byte(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int(struct.unpack(">H", self.take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack(">I", self.take(4))[0])

    def varint(self) -> int:
        value, shift = 0, 0
        for _ in range(4):
            b = self.byte()
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                return value
            shift += 7
        raise MalformedPacket("variable byte integer longer than 4 bytes")

    def binary(self) -> bytes:
        return self.take(self.u16())

    def text(self) -> str:
        try:
            return self.binary().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedPacket("string is not UTF-8") from exc

    def rest(self) -> bytes:
        return self.take(len(self.data) - self.pos)


def _properties(cur: _Cursor) -> dict[int, object]:
    length = cur.varint()
    block = _Cursor(cur.take(length))
    found: dict[int, object] = {}
    while block.pos < len(block.data):
        ident = block.varint()
        kind = _PROPERTY_KINDS.get(ident)
        value: object
        if kind == "b":
            value = block.byte()
        elif kind == "h":
            value = block.u16()
        elif kind == "i":
            value = block.u32()
        elif kind == "v":
            value = block.varint()
        elif kind == "s":
            value = block.text()
        elif kind == "d":
            value = block.binary()
        elif kind == "p":
            value = (block.text(), block.text())
        else:
            raise MalformedPacket(f"unknown MQTT 5 property 0x{ident:02x}")
        found.setdefault(ident, value)
    return found


def parse_connect(body: bytes) -> Connect:
    cur = _Cursor(body)
    name = cur.text()
    if name not in ("MQTT", "MQIsdp"):
        raise MalformedPacket(f"protocol name {name!r}")
    level = cur.byte()
    flags = cur.byte()
    keepalive = cur.u16()
    props = _properties(cur) if level == 5 else {}
    client_id = cur.text()
    will = None
    if flags & 0x04:
        if level == 5:
            _properties(cur)
        topic = cur.text()
        payload = cur.binary()
        will = Will(topic, payload, (flags >> 3) & 0x03, bool(flags & 0x20))
    username = cur.text() if flags & 0x80 else None
    password = cur.binary() if flags & 0x40 else None
    expiry = props.get(SESSION_EXPIRY)
    return Connect(
        protocol_level=level,
        client_id=client_id,
        clean=bool(flags & 0x02),
        keepalive=keepalive,
        will=will,
        username=username,
        password=password,
        session_expiry=expiry if isinstance(expiry, int) else None,
    )


def parse_publish(flags: int, body: bytes, v5: bool, aliases: dict[int, str]) -> Publish:
    cur = _Cursor(body)
    topic = cur.text()
    qos = (flags >> 1) & 0x03
    if qos:
        cur.u16()
    props = _properties(cur) if v5 else {}
    alias = props.get(TOPIC_ALIAS)
    if isinstance(alias, int):
        if topic:
            aliases[alias] = topic
        else:
            topic = aliases.get(alias, "")
    correlation = props.get(CORRELATION_DATA)
    response = props.get(RESPONSE_TOPIC)
    return Publish(
        topic=topic,
        payload=cur.rest(),
        qos=qos,
        retain=bool(flags & 0x01),
        dup=bool(flags & 0x08),
        correlation_data=correlation if isinstance(correlation, bytes) else None,
        response_topic=response if isinstance(response, str) else None,
    )


def parse_subscribe(body: bytes, v5: bool) -> Subscribe:
    cur = _Cursor(body)
    packet_id = cur.u16()
    if v5:
        _properties(cur)
    filters: list[str] = []
    while cur.pos < len(cur.data):
        filters.append(cur.text())
        cur.byte()  # subscription options / requested QoS
    return Subscribe(packet_id, tuple(filters))


def parse_suback(body: bytes, v5: bool) -> Suback:
    cur = _Cursor(body)
    packet_id = cur.u16()
    if v5:
        _properties(cur)
    return Suback(packet_id, tuple(cur.rest()))


@dataclass
class StreamParser:
    """Frames one direction of one connection; feed chunks, get packets.

    The client-to-broker side learns its protocol level from the CONNECT; the other
    side is told with :attr:`v5` by its owner.
    """

    v5: bool = False
    _buffer: bytearray = field(default_factory=bytearray)
    _aliases: dict[int, str] = field(default_factory=dict)
    broken: str | None = None

    def feed(self, data: bytes) -> list[Packet]:
        if self.broken is not None:
            return []
        self._buffer += data
        packets: list[Packet] = []
        try:
            while True:
                framed = self._next_frame()
                if framed is None:
                    return packets
                kind, flags, body = framed
                packet = self._decode(kind, flags, body)
                if packet is not None:
                    packets.append(packet)
        except MalformedPacket as exc:
            self.broken = str(exc)
            return packets

    def _next_frame(self) -> tuple[int, int, bytes] | None:
        buf = self._buffer
        if len(buf) < 2:
            return None
        length, shift, index = 0, 0, 1
        while True:
            if index >= len(buf):
                return None
            if index > 4:
                raise MalformedPacket("remaining length longer than 4 bytes")
            b = buf[index]
            length |= (b & 0x7F) << shift
            index += 1
            if not b & 0x80:
                break
            shift += 7
        if len(buf) < index + length:
            return None
        first = buf[0]
        body = bytes(buf[index : index + length])
        del buf[: index + length]
        return first >> 4, first & 0x0F, body

    def _decode(self, kind: int, flags: int, body: bytes) -> Packet | None:
        if kind == CONNECT:
            connect = parse_connect(body)
            self.v5 = connect.v5
            return connect
        if kind == PUBLISH:
            return parse_publish(flags, body, self.v5, self._aliases)
        if kind == SUBSCRIBE:
            return parse_subscribe(body, self.v5)
        if kind == SUBACK:
            return parse_suback(body, self.v5)
        if kind == DISCONNECT:
            return Disconnect(body[0] if body else 0)
        if kind == CONNACK:
            if len(body) < 2:
                raise MalformedPacket("CONNACK shorter than 2 bytes")
            return Connack(body[1])
        return None
