"""Splitting whole MQTT 3.1.1 PUBLISH packets off a buffer (``bridge.mqtt_publish``),
checked against paho's own decoder: the same fields for every packet it takes, and it
stops at exactly the first packet it must leave to paho."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt._packet import decode_publish
from paho.mqtt.enums import MQTTProtocolVersion

from bridge.mqtt_publish import Publish, pubacks, publishes


def _length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def publish_packet(
    topic: bytes, payload: bytes, qos: int, *, retain: bool = False, dup: bool = False, mid: int = 1
) -> bytes:
    body = len(topic).to_bytes(2, "big") + topic + (mid.to_bytes(2, "big") if qos else b"")
    body += payload
    first = 0x30 | (qos << 1) | (0x08 if dup else 0) | (0x01 if retain else 0)
    return bytes([first]) + _length(len(body)) + body


def _fixed_header_end(packet: bytes) -> int:
    at = 1
    while packet[at] & 0x80:
        at += 1
    return at + 1


messages = st.tuples(
    st.binary(min_size=1, max_size=80),
    # Past 127 and 16,383 bytes: two- and three-byte remaining lengths.
    st.one_of(st.binary(max_size=200), st.binary(min_size=16_400, max_size=16_500)),
    st.integers(0, 1),
    st.booleans(),
    st.booleans(),
    st.integers(1, 65_535),
)


@settings(max_examples=200, deadline=None)
@given(items=st.lists(messages, min_size=1, max_size=6), cut=st.integers(0, 40_000))
def test_whole_packets_are_taken_as_paho_decodes_them(
    items: list[tuple[bytes, bytes, int, bool, bool, int]], cut: int
) -> None:
    packets = [
        publish_packet(topic, payload, qos, retain=retain, dup=dup, mid=mid)
        for topic, payload, qos, retain, dup, mid in items
    ]
    stream = b"".join(packets)
    # Any prefix of the stream: only the packets wholly inside it come out.
    buffer = b"junk" + stream[: min(cut, len(stream))]
    taken = list(publishes(buffer, 4))
    ends = []
    at = 4
    for packet in packets:
        at += len(packet)
        if at <= len(buffer):
            ends.append(at)
    assert [p.end for p in taken] == ends
    for publish, packet in zip(taken, packets, strict=False):
        header_end = _fixed_header_end(packet)
        expected = decode_publish(packet[0], packet[header_end:], MQTTProtocolVersion.MQTTv311)
        assert publish == Publish(
            publish.end,
            expected.topic,
            expected.payload,
            expected.qos,
            expected.retain,
            expected.dup,
            expected.mid,
        )


def test_it_stops_at_anything_paho_must_read() -> None:
    first = publish_packet(b"kiosk/a/status", b"{}", 1, mid=7)
    for other in (
        b"\x90\x03\x00\x01\x01",  # SUBACK
        b"\xd0\x00",  # PINGRESP
        publish_packet(b"kiosk/a/status", b"{}", 2),  # QoS 2: PUBREC and its state
        b"\x32\x02\x00\x00",  # an empty topic, a protocol violation paho rejects
        b"\x32\x03\x00\x05a",  # a topic longer than its packet
        b"\x30\xff\xff\xff\xff\x01",  # a remaining length of five bytes
        b"\x30",  # a packet cut after its first byte
    ):
        taken = list(publishes(first + other + first, 0))
        assert [p.end for p in taken] == [len(first)], other


def test_pubacks_are_concatenated_in_order() -> None:
    assert pubacks([1, 258, 65_535]) == b"\x40\x02\x00\x01\x40\x02\x01\x02\x40\x02\xff\xff"
    assert pubacks([]) == b""
