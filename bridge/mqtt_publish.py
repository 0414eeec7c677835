"""Whole MQTT 3.1.1 PUBLISH packets split off the front of a received buffer.

A restart's snapshot is 200,000 PUBLISH packets in a row on the presence connection.
paho reads each with three or four ``recv`` calls, fills a dict of read state, builds a
message object, logs, and queues and writes a PUBACK of its own: about a third of the
bridge's CPU per message, and one ``send`` system call per PUBACK. This module only
frames: it finds the whole QoS 0 and QoS 1 PUBLISH packets already in memory, and stops
at anything else, which paho reads as before (see :func:`bridge._compat.aiomqtt.take_messages`).

Spec: MQTT 3.1.1 sections 2.2 (fixed header, remaining length) and 3.3 (PUBLISH).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

#: The PUBLISH packet type in the first byte's high nibble.
PUBLISH = 0x30
_QOS_BITS = 0x06
#: A remaining length has at most four bytes (2.2.3).
_MAX_LENGTH_BYTES = 4


class Publish(NamedTuple):
    #: Offset just after this packet in the buffer it came from.
    end: int
    topic: bytes
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    #: The packet identifier (QoS 1), 0 for QoS 0.
    packet_id: int


def publishes(buffer: bytes, start: int) -> Iterator[Publish]:
    """Every whole QoS 0 or QoS 1 PUBLISH from ``buffer[start:]`` on, in order; stops
    silently before the first packet that is anything else: another type, QoS 2, a
    packet not wholly in ``buffer``, or one whose framing is broken (left for the full
    parser, which rejects it and closes the connection)."""
    end = len(buffer)
    at = start
    while at < end:
        first = buffer[at]
        qos = (first & _QOS_BITS) >> 1
        if first & 0xF0 != PUBLISH or qos > 1:
            return
        # Remaining length: 7 bits per byte, low first, high bit = more.
        length = 0
        shift = 0
        cursor = at + 1
        while True:
            if cursor >= end or cursor - at > _MAX_LENGTH_BYTES:
                return
            byte = buffer[cursor]
            cursor += 1
            length |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
            shift += 7
        packet_end = cursor + length
        if packet_end > end or length < 2:
            return
        topic_end = cursor + 2 + ((buffer[cursor] << 8) | buffer[cursor + 1])
        body = topic_end + 2 * qos
        if topic_end == cursor + 2 or body > packet_end:
            # An empty topic is a protocol violation in 3.1.1 (4.7.3); a topic or packet
            # id running past the packet is malformed.
            return
        yield Publish(
            packet_end,
            buffer[cursor + 2 : topic_end],
            buffer[body:packet_end],
            qos,
            bool(first & 0x01),
            bool(first & 0x08),
            ((buffer[topic_end] << 8) | buffer[topic_end + 1]) if qos else 0,
        )
        at = packet_end


def pubacks(packet_ids: list[int]) -> bytes:
    """One PUBACK (3.4) per packet id, concatenated for a single write."""
    return b"".join(b"\x40\x02" + packet_id.to_bytes(2, "big") for packet_id in packet_ids)
