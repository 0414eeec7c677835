"""Topic grammar: building and parsing every kind, and the device id rules on both sides."""

from __future__ import annotations

import string

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from schemas import (
    DEFAULT_PREFIX,
    ContractError,
    DeviceTopic,
    InvalidDeviceId,
    InvalidTopic,
    TopicKind,
    all_filter,
    bridge_presence_topic,
    device_filter,
    device_topic,
    is_valid_device_id,
    parse_topic,
    provision_topic,
    shared,
    validate_device_id,
)
from schemas.topics import is_bridge_topic

# --- table-driven build and parse ------------------------------------------------------------

BUILD_TABLE: list[tuple[str, TopicKind, str, str]] = [
    ("kiosk-0042", TopicKind.PRESENCE, DEFAULT_PREFIX, "kiosk/v1/kiosk-0042/presence"),
    ("kiosk-0042", TopicKind.STATUS, DEFAULT_PREFIX, "kiosk/v1/kiosk-0042/status"),
    ("kiosk-0042", TopicKind.CMD, DEFAULT_PREFIX, "kiosk/v1/kiosk-0042/cmd"),
    ("kiosk-0042", TopicKind.ACK, DEFAULT_PREFIX, "kiosk/v1/kiosk-0042/ack"),
    ("kiosk-0042", TopicKind.CONFIG, DEFAULT_PREFIX, "kiosk/v1/kiosk-0042/config"),
    ("8f14e45fceea167a", TopicKind.STATUS, DEFAULT_PREFIX, "kiosk/v1/8f14e45fceea167a/status"),
    ("A", TopicKind.CMD, DEFAULT_PREFIX, "kiosk/v1/A/cmd"),
    ("a" * 64, TopicKind.ACK, DEFAULT_PREFIX, f"kiosk/v1/{'a' * 64}/ack"),
    ("0_-x", TopicKind.CONFIG, DEFAULT_PREFIX, "kiosk/v1/0_-x/config"),
    ("kiosk-1", TopicKind.PRESENCE, "acme/kiosks/v1", "acme/kiosks/v1/kiosk-1/presence"),
    ("kiosk-1", TopicKind.STATUS, "single", "single/kiosk-1/status"),
    # "provision" is an ordinary id: its topics are one level shorter than provisioning's.
    ("provision", TopicKind.PRESENCE, DEFAULT_PREFIX, "kiosk/v1/provision/presence"),
]


@pytest.mark.parametrize(("device_id", "kind", "prefix", "topic"), BUILD_TABLE)
def test_build_and_parse(device_id: str, kind: TopicKind, prefix: str, topic: str) -> None:
    assert device_topic(device_id, kind, prefix) == topic
    assert parse_topic(topic, prefix) == DeviceTopic(device_id=device_id, kind=kind)


@pytest.mark.parametrize("kind", list(TopicKind))
def test_every_kind_is_covered_by_the_table(kind: TopicKind) -> None:
    assert any(k is kind for _, k, _, _ in BUILD_TABLE)


def test_kind_may_be_given_as_its_string() -> None:
    assert device_topic("k1", "status") == "kiosk/v1/k1/status"  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="status2"):
        device_topic("k1", "status2")  # type: ignore[arg-type]


NOT_DEVICE_TOPICS: list[tuple[str, str]] = [
    ("kiosk/v1/kiosk-0042", DEFAULT_PREFIX),
    ("kiosk/v1/kiosk-0042/", DEFAULT_PREFIX),
    ("kiosk/v1/kiosk-0042/heartbeat", DEFAULT_PREFIX),
    ("kiosk/v1/kiosk-0042/Status", DEFAULT_PREFIX),
    ("kiosk/v1/kiosk-0042/status/extra", DEFAULT_PREFIX),
    ("kiosk/v1/kiosk-0042/status/", DEFAULT_PREFIX),
    ("kiosk/v1/a/b/status", DEFAULT_PREFIX),
    ("kiosk/v2/kiosk-0042/status", DEFAULT_PREFIX),
    ("/kiosk/v1/kiosk-0042/status", DEFAULT_PREFIX),
    ("kiosk/v1/#", DEFAULT_PREFIX),
    ("kiosk/v1/provision/kiosk-0042/request", DEFAULT_PREFIX),
    ("kiosk/v1/provision/kiosk-0042/response", DEFAULT_PREFIX),
    ("$share/g/kiosk/v1/kiosk-0042/status", DEFAULT_PREFIX),
    ("", DEFAULT_PREFIX),
    ("kiosk/v1/kiosk-0042/status\n", DEFAULT_PREFIX),
    ("acme/kiosks/v1/kiosk-1/status", DEFAULT_PREFIX),
    ("kiosk/v1/kiosk-1/status", "acme/kiosks/v1"),
    # The prefix is matched literally, not as a regular expression.
    ("aXb/kiosk-1/status", "a.b"),
]


@pytest.mark.parametrize(("topic", "prefix"), NOT_DEVICE_TOPICS)
def test_parse_rejects_topics_that_are_not_device_topics(topic: str, prefix: str) -> None:
    with pytest.raises(InvalidTopic) as caught:
        parse_topic(topic, prefix)
    assert caught.value.field == "topic"
    assert caught.value.reason == "bad_topic"


def test_literal_dot_in_a_prefix_still_parses() -> None:
    assert parse_topic("a.b/kiosk-1/status", "a.b") == DeviceTopic("kiosk-1", TopicKind.STATUS)


def test_very_long_topic_is_rejected_with_a_short_message() -> None:
    topic = "kiosk/v1/" + "x" * 100_000 + "/status"
    with pytest.raises(ContractError) as caught:
        parse_topic(topic)
    assert len(str(caught.value)) < 600


@pytest.mark.parametrize("prefix", ["", "/kiosk", "kiosk/", "kiosk/+/v1", "kiosk/#", "k\x00"])
def test_bad_prefix_is_refused_by_every_builder(prefix: str) -> None:
    builders = [
        lambda: device_topic("k1", TopicKind.STATUS, prefix),
        lambda: device_filter(TopicKind.STATUS, prefix),
        lambda: all_filter(prefix),
        lambda: bridge_presence_topic(prefix),
        lambda: provision_topic("k1", "request", prefix),
    ]
    for build in builders:
        with pytest.raises(ValueError, match="prefix"):
            build()


# --- filters, shared subscriptions, the bridge and provisioning ------------------------------


@pytest.mark.parametrize("kind", list(TopicKind))
def test_device_filter(kind: TopicKind) -> None:
    assert device_filter(kind) == f"kiosk/v1/+/{kind.value}"
    assert device_filter(kind, "acme/v1") == f"acme/v1/+/{kind.value}"


def test_all_filter() -> None:
    assert all_filter() == "kiosk/v1/#"
    assert all_filter("acme/v1") == "acme/v1/#"


@pytest.mark.parametrize(
    ("group", "expected"),
    [
        (None, "kiosk/v1/+/presence"),
        ("", "kiosk/v1/+/presence"),
        ("bridges", "$share/bridges/kiosk/v1/+/presence"),
        ("kiosk-bridge_1", "$share/kiosk-bridge_1/kiosk/v1/+/presence"),
    ],
)
def test_shared_wraps_a_filter(group: str | None, expected: str) -> None:
    assert shared(device_filter(TopicKind.PRESENCE), group) == expected


@pytest.mark.parametrize("group", ["a/b", "a+", "#", "+"])
def test_shared_refuses_group_names_with_topic_syntax(group: str) -> None:
    with pytest.raises(ValueError, match="group"):
        shared(device_filter(TopicKind.STATUS), group)


def test_bridge_presence_topic_is_not_a_device_topic() -> None:
    topic = bridge_presence_topic()
    assert topic == "kiosk/v1/_bridge/presence"
    assert is_bridge_topic(topic)
    assert not is_bridge_topic(device_topic("bridge", TopicKind.PRESENCE))
    with pytest.raises((InvalidDeviceId, InvalidTopic)):
        parse_topic(topic)
    # No device can be given the bridge's topic, whatever its id.
    with pytest.raises(InvalidDeviceId):
        device_topic("_bridge", TopicKind.PRESENCE)
    assert bridge_presence_topic("acme/v1") == "acme/v1/_bridge/presence"
    assert is_bridge_topic("acme/v1/_bridge/presence", "acme/v1")


@pytest.mark.parametrize("leaf", ["request", "response"])
def test_provision_topic(leaf: str) -> None:
    assert provision_topic("kiosk-0042", leaf) == f"kiosk/v1/provision/kiosk-0042/{leaf}"


def test_provision_topic_refuses_bad_leaf_and_client_id() -> None:
    with pytest.raises(ValueError, match="leaf"):
        provision_topic("kiosk-0042", "reply")
    with pytest.raises(InvalidDeviceId):
        provision_topic("kiosk/0042", "request")


# --- device ids: properties ----------------------------------------------------------------

_FIRST = string.ascii_letters + string.digits
_REST = _FIRST + "_-"

#: Valid ids built from the grammar's parts, independently of DEVICE_ID_PATTERN.
valid_ids = st.builds(
    lambda first, rest: first + rest,
    st.sampled_from(_FIRST),
    st.text(alphabet=_REST, max_size=63),
)

# Look-alikes spelled as escapes: KELVIN SIGN, ARABIC-INDIC DIGIT ONE, FULLWIDTH A.
_BAD_CHARS = [
    *"+#/ \n\t.:$",
    "\x00",
    "\u00e9",
    "\u00df",
    "\u212a",
    "\u0661",
    "\uff21",
    "\U0001f600",
]


@st.composite
def invalid_ids(draw: st.DrawFn) -> str:
    """Ids that break the grammar in one of the ways a kiosk or an attacker might."""
    base = draw(valid_ids)
    how = draw(st.sampled_from(["inject", "leading", "too-long", "empty", "unicode"]))
    if how == "inject":
        position = draw(st.integers(0, len(base)))
        return base[:position] + draw(st.sampled_from(_BAD_CHARS)) + base[position:]
    if how == "leading":
        return draw(st.sampled_from("_-")) + base[:63]
    if how == "too-long":
        return base + draw(st.text(alphabet=_REST, min_size=65 - len(base), max_size=100))
    if how == "unicode":
        # Any non-ASCII character makes an id invalid, however letter-like it looks.
        extra = draw(st.text(st.characters(min_codepoint=0x80), min_size=1, max_size=3))
        return base[:60] + extra
    return ""


@given(device_id=valid_ids, kind=st.sampled_from(list(TopicKind)))
@example(device_id="a" * 64, kind=TopicKind.STATUS)
@example(device_id="0", kind=TopicKind.ACK)
def test_any_valid_id_round_trips(device_id: str, kind: TopicKind) -> None:
    assert is_valid_device_id(device_id)
    assert validate_device_id(device_id) == device_id
    topic = device_topic(device_id, kind)
    assert parse_topic(topic) == DeviceTopic(device_id=device_id, kind=kind)
    assert parse_topic(device_topic(device_id, kind, "acme/x"), "acme/x").device_id == device_id


@given(device_id=invalid_ids(), kind=st.sampled_from(list(TopicKind)))
@example(device_id="", kind=TopicKind.STATUS)
@example(device_id="a" * 65, kind=TopicKind.STATUS)
@example(device_id="+", kind=TopicKind.PRESENCE)
@example(device_id="#", kind=TopicKind.PRESENCE)
@example(device_id="a/b", kind=TopicKind.CMD)
@example(device_id="_bridge", kind=TopicKind.PRESENCE)
@example(device_id="-kiosk", kind=TopicKind.ACK)
@example(device_id="kiosk\n", kind=TopicKind.STATUS)
@example(device_id="kiosk\x00", kind=TopicKind.CONFIG)
@example(device_id="kiosk-ü", kind=TopicKind.STATUS)
def test_invalid_ids_are_rejected_by_build_and_parse(device_id: str, kind: TopicKind) -> None:
    assert not is_valid_device_id(device_id)
    with pytest.raises(InvalidDeviceId) as caught:
        validate_device_id(device_id)
    assert caught.value.field == "device_id"
    with pytest.raises(InvalidDeviceId):
        device_topic(device_id, kind)
    # A hostile topic is built by hand here: that is what arrives from the broker.
    raw = f"{DEFAULT_PREFIX}/{device_id}/{kind.value}"
    with pytest.raises((InvalidDeviceId, InvalidTopic)):
        parse_topic(raw)


def test_parse_names_the_error_kind_for_a_bad_id_in_the_right_shape() -> None:
    with pytest.raises(InvalidDeviceId) as caught:
        parse_topic("kiosk/v1/+/status")
    assert caught.value.field == "device_id"
    assert caught.value.reason == "bad_device_id"
    with pytest.raises(InvalidDeviceId):
        parse_topic("kiosk/v1//status")


def test_non_string_id_is_an_invalid_device_id() -> None:
    with pytest.raises(InvalidDeviceId):
        validate_device_id(42)  # type: ignore[arg-type]
