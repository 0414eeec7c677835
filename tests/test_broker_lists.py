"""Broker lists (``--broker mqtt://n1,mqtt://n2``) and what the probes' answers choose."""

from __future__ import annotations

import pytest

from bridge.broker_url import NodeCursor, parse_broker_list, parse_broker_url
from bridge.ops.mqtt import connect
from bridge.service.probe import (
    Answer,
    BrokerFeatures,
    BrokerUnsuitable,
    choose_mode,
    probe_features,
)
from bridge.settings import Settings
from bridge.testing.ports import free_port


def test_one_url_parses_as_before() -> None:
    address = parse_broker_url("mqtt://u:p@host:1884")
    assert (address.host, address.port, address.username, address.password) == (
        "host",
        1884,
        "u",
        "p",
    )
    assert address.others == () and address.nodes == (address,)
    assert address.urls == "mqtt://host:1884"


def test_a_list_keeps_its_order_and_shares_the_credentials() -> None:
    address = parse_broker_url("mqtt://u:p@n1:1883, mqtt://n2:1884,mqtts://x:y@n3")
    assert [node.url for node in address.nodes] == [
        "mqtt://n1:1883",
        "mqtt://n2:1884",
        "mqtts://n3:8883",
    ]
    # Credentials on the first URL apply to the nodes that have none of their own.
    assert [(n.username, n.password) for n in address.nodes] == [
        ("u", "p"),
        ("u", "p"),
        ("x", "y"),
    ]
    assert address.url == "mqtt://n1:1883"
    configured = Settings(broker="mqtt://n1:1883,mqtt://n2:1883").broker_address
    assert configured is not None
    assert [node.url for node in configured.nodes] == ["mqtt://n1:1883", "mqtt://n2:1883"]


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("mqtt://n1,", "empty entry"),
        ("mqtt://n1:1883,mqtt://n1:1883", "twice"),
        ("mqtt://n1,http://n2", "must start with mqtt://"),
    ],
)
def test_bad_lists_are_refused_with_a_reason(value: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        parse_broker_list(value)


def test_the_cursor_walks_the_list_and_says_when_a_round_failed() -> None:
    cursor = NodeCursor(parse_broker_url("mqtt://a,mqtt://b,mqtt://c"))
    seen = [cursor.current.host]
    rounds = []
    for _ in range(6):
        rounds.append(cursor.failed())
        seen.append(cursor.current.host)
    assert seen == ["a", "b", "c", "a", "b", "c", "a"]
    assert rounds == [False, False, True, False, False, True]
    cursor.failed()
    cursor.succeeded()  # connected to b: a new round starts from here
    assert [cursor.failed(), cursor.failed(), cursor.failed()] == [False, False, True]


def _features(**answers: Answer) -> BrokerFeatures:
    values = {
        "retained": Answer.YES,
        "wildcard_retained": Answer.YES,
        "shared_subscriptions": Answer.YES,
        **answers,
    }
    return BrokerFeatures(node="mqtt://n1:1883", took_ms=3, **values)


def test_the_mode_follows_the_answers() -> None:
    assert not choose_mode(_features(), reconcile="auto", shared_group="g").per_device_reconcile
    rabbit = _features(wildcard_retained=Answer.NO, shared_subscriptions=Answer.NO)
    assert choose_mode(rabbit, reconcile="auto", shared_group=None).per_device_reconcile
    with pytest.raises(BrokerUnsuitable, match=r"--shared-group \(KB_SHARED_GROUP\)"):
        choose_mode(rabbit, reconcile="auto", shared_group="fleet")
    with pytest.raises(BrokerUnsuitable, match="KB_RECONCILE=per_device"):
        choose_mode(rabbit, reconcile="wildcard", shared_group=None)
    with pytest.raises(BrokerUnsuitable, match="retained messages"):
        choose_mode(_features(retained=Answer.NO), reconcile="auto", shared_group=None)
    assert choose_mode(_features(), reconcile="per_device", shared_group=None).per_device_reconcile


async def test_mosquitto_answers_every_probe(mosquitto: object) -> None:
    url = mosquitto.url  # type: ignore[attr-defined]
    features = await probe_features(
        parse_broker_url(url), topic="kiosk/v1/_bridge/t1/probe", identifier="t1-probe"
    )
    assert (features.retained, features.wildcard_retained, features.shared_subscriptions) == (
        Answer.YES,
        Answer.YES,
        Answer.YES,
    )


async def test_ops_commands_try_the_next_node(mosquitto: object) -> None:
    dead = f"mqtt://127.0.0.1:{free_port()}"
    address = parse_broker_url(f"{dead},{mosquitto.url}")  # type: ignore[attr-defined]
    async with connect(address, protocol="3.1.1") as client:
        await client.publish("kiosk/v1/_bridge/sync/x", b"1", qos=1)
