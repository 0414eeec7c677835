"""Every topic of the contract, built and parsed in one place.

No other module concatenates topic strings: build with the functions here and parse a
received topic with :func:`parse_topic`, which returns the device id and the kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache

from schemas.constants import BRIDGE_SEGMENT, DEFAULT_PREFIX, PROVISION_SEGMENT
from schemas.device_id import is_valid_device_id, validate_device_id
from schemas.errors import InvalidDeviceId, InvalidTopic


class TopicKind(StrEnum):
    PRESENCE = "presence"
    STATUS = "status"
    CMD = "cmd"
    ACK = "ack"
    CONFIG = "config"


@dataclass(frozen=True, slots=True)
class DeviceTopic:
    device_id: str
    kind: TopicKind


# Called for every message received (parse_topic): a deployment has one or two prefixes.
@lru_cache(maxsize=64)
def _check_prefix(prefix: str) -> str:
    if not prefix or prefix.startswith("/") or prefix.endswith("/"):
        raise ValueError(f"topic prefix {prefix!r} must be non-empty, without leading/trailing '/'")
    if any(ch in prefix for ch in "+#\x00"):
        raise ValueError(f"topic prefix {prefix!r} must not contain wildcards or NUL")
    return prefix


def device_topic(device_id: str, kind: TopicKind, prefix: str = DEFAULT_PREFIX) -> str:
    """``{prefix}/{device_id}/{kind}``; raises :class:`InvalidDeviceId` for a bad id."""
    validate_device_id(device_id)
    return f"{_check_prefix(prefix)}/{device_id}/{TopicKind(kind).value}"


def device_filter(kind: TopicKind, prefix: str = DEFAULT_PREFIX) -> str:
    """Subscription filter for ``kind`` on every device: ``{prefix}/+/{kind}``."""
    return f"{_check_prefix(prefix)}/+/{TopicKind(kind).value}"


def all_filter(prefix: str = DEFAULT_PREFIX) -> str:
    """Everything under the prefix: ``{prefix}/#``."""
    return f"{_check_prefix(prefix)}/#"


def shared(filter_: str, group: str | None) -> str:
    """Wrap a filter in an MQTT 5 shared subscription when ``group`` is set."""
    if not group:
        return filter_
    if any(ch in group for ch in "/+#"):
        raise ValueError(f"shared group name {group!r} must not contain '/', '+' or '#'")
    return f"$share/{group}/{filter_}"


def bridge_presence_topic(prefix: str = DEFAULT_PREFIX) -> str:
    """Contract 1.0's one topic for every bridge's birth and Will. Bridges since 1.1
    publish on :func:`bridge_instance_topic` instead (several bridges, and bridges of
    other databases, share a broker); this name is only read, for old bridges."""
    return f"{_check_prefix(prefix)}/{BRIDGE_SEGMENT}/presence"


def bridge_instance_topic(instance: str, prefix: str = DEFAULT_PREFIX) -> str:
    """Where bridge ``instance`` publishes its retained birth and Last Will."""
    if not instance or any(ch in instance for ch in "/+#\x00") or instance == "sync":
        raise ValueError(f"invalid bridge instance name {instance!r}")
    return f"{_check_prefix(prefix)}/{BRIDGE_SEGMENT}/{instance}/presence"


def bridge_instances_filter(prefix: str = DEFAULT_PREFIX) -> str:
    """Every bridge instance's presence."""
    return f"{_check_prefix(prefix)}/{BRIDGE_SEGMENT}/+/presence"


def parse_bridge_instance_topic(topic: str, prefix: str = DEFAULT_PREFIX) -> str | None:
    """The instance a :func:`bridge_instance_topic` names, or ``None``."""
    head = f"{_check_prefix(prefix)}/{BRIDGE_SEGMENT}/"
    if not topic.startswith(head) or not topic.endswith("/presence"):
        return None
    instance = topic[len(head) : -len("/presence")]
    if not instance or "/" in instance or instance == "sync":
        return None
    return instance


def bridge_sync_topic(nonce: str, prefix: str = DEFAULT_PREFIX) -> str:
    """A private topic on which a bridge publishes a marker to itself after subscribing:
    when the marker comes back, the broker has sent every retained message before it."""
    validate_device_id(nonce)
    return f"{_check_prefix(prefix)}/{BRIDGE_SEGMENT}/sync/{nonce}"


def provision_topic(client_id: str, leaf: str, prefix: str = DEFAULT_PREFIX) -> str:
    """``{prefix}/provision/{client_id}/{request|response}``."""
    if leaf not in ("request", "response"):
        raise ValueError(f"provision leaf must be 'request' or 'response', not {leaf!r}")
    validate_device_id(client_id)
    return f"{_check_prefix(prefix)}/{PROVISION_SEGMENT}/{client_id}/{leaf}"


_KINDS: dict[str, TopicKind] = {kind.value: kind for kind in TopicKind}


def parse_topic(topic: str, prefix: str = DEFAULT_PREFIX) -> DeviceTopic:
    """Split a received device topic into device id and kind.

    Raises :class:`InvalidTopic` for anything that is not ``{prefix}/{id}/{kind}`` and
    :class:`InvalidDeviceId` when the shape is right but the id breaks the grammar.
    """
    # Called for every message received: string splits, not a regular expression (a
    # fifth of the time of a snapshot's message in the ingest, profiled).
    head = _check_prefix(prefix) + "/"
    device_id, slash, kind = topic[len(head) :].partition("/")
    found = _KINDS.get(kind) if slash and topic.startswith(head) else None
    if found is None:
        raise InvalidTopic(f"not a device topic under {prefix!r}: {topic[:200]!r}", field="topic")
    if not is_valid_device_id(device_id):
        raise InvalidDeviceId(
            f"invalid device id {device_id[:80]!r} in topic {topic[:200]!r}", field="device_id"
        )
    return DeviceTopic(device_id, found)


def is_bridge_topic(topic: str, prefix: str = DEFAULT_PREFIX) -> bool:
    return topic == bridge_presence_topic(prefix)


__all__ = [
    "DeviceTopic",
    "InvalidDeviceId",
    "InvalidTopic",
    "TopicKind",
    "all_filter",
    "bridge_instance_topic",
    "bridge_instances_filter",
    "bridge_presence_topic",
    "bridge_sync_topic",
    "device_filter",
    "device_topic",
    "is_bridge_topic",
    "parse_bridge_instance_topic",
    "parse_topic",
    "provision_topic",
    "shared",
]
