"""``watch`` beyond the contract: any filter (other topics raw), ``--pretty``, a bad
filter as a usage error before connecting, and a SUBACK that refuses the filter."""

from __future__ import annotations

import asyncio
import json

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode
from typer.testing import CliRunner, Result

from bridge.cli import app
from bridge.ops import watch
from bridge.testing.mosquitto import MosquittoProcess
from schemas import PresenceOnline, TopicKind, device_topic, encode
from tests.support.devices import publish_raw
from tests.support.ports import free_port

T0 = 1_764_331_200_000
CLEAN_ENV = dict.fromkeys(("KB_DB", "KB_BROKER", "KB_PREFIX", "KB_MQTT_PROTOCOL", "COLUMNS"))


def invoke(*args: str) -> Result:
    return CliRunner().invoke(app, list(args), env=CLEAN_ENV)


async def test_other_topics_are_shown_raw(mosquitto: MosquittoProcess) -> None:
    await publish_raw(mosquitto.url, "other/a", b'{"x":1,"y":[2,3]}', True)
    await publish_raw(mosquitto.url, "other/b", b"plain text", True)
    human = await asyncio.to_thread(
        invoke, "watch", "other/#", "--retained-only", "--broker", mosquitto.url
    )
    assert human.exit_code == 0, human.output
    lines = human.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].endswith('R other/a {"x":1,"y":[2,3]}')
    assert lines[1].endswith("R other/b plain text")
    assert "INVALID" not in human.stdout

    as_json = await asyncio.to_thread(
        invoke, "watch", "other/#", "--retained-only", "--json", "--broker", mosquitto.url
    )
    events = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [(e["topic"], e["kind"], e["valid"]) for e in events] == [
        ("other/a", "other", True),
        ("other/b", "other", True),
    ]


async def test_pretty_indents_payloads(mosquitto: MosquittoProcess) -> None:
    topic = device_topic("p-1", TopicKind.PRESENCE)
    await publish_raw(mosquitto.url, topic, encode(PresenceOnline(session=3, ts=T0)), True)
    await publish_raw(mosquitto.url, "other/p", b'{"nested":{"k":1}}', True)
    result = await asyncio.to_thread(
        invoke, "watch", "#", "--retained-only", "--pretty", "--broker", mosquitto.url
    )
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert '  "state": "online",' in out and '  "session": 3,' in out
    assert '  "nested": {\n    "k": 1\n  }' in out
    as_json = await asyncio.to_thread(
        invoke,
        "watch",
        "other/p",
        "--retained-only",
        "--json",
        "--pretty",
        "--broker",
        mosquitto.url,
    )
    assert as_json.stdout.startswith("{\n  ")
    assert json.loads(as_json.stdout)["topic"] == "other/p"


@pytest.mark.parametrize("bad", ["kiosk/v1/#/bad", "kiosk/v1/a+/status", ""])
def test_invalid_filter_is_a_usage_error_before_connecting(bad: str) -> None:
    # Nothing listens there: reaching for the broker would exit 3, not 2.
    result = invoke("watch", bad, "--broker", f"mqtt://127.0.0.1:{free_port()}")
    assert result.exit_code == 2, result.output
    # The message as one line, out of rich's error box.
    flat = " ".join(result.output.replace("│", " ").split())
    assert f"{bad!r} is not a valid MQTT topic filter" in flat
    assert "Traceback" not in result.output


def test_a_refused_subscription_is_recognised() -> None:
    """A SUBACK failure code, as paho reports it for MQTT 5 and 3.1.1: watch then exits
    2 naming the filter instead of waiting for messages that never come."""
    granted = ReasonCode(PacketTypes.SUBACK, identifier=1)
    refused_v5 = ReasonCode(PacketTypes.SUBACK, "Not authorized")
    refused_v311 = ReasonCode(PacketTypes.SUBACK, identifier=0x80)
    assert not watch.subscription_refused([granted])
    assert watch.subscription_refused([refused_v5])
    assert watch.subscription_refused([granted, refused_v311])
    assert watch.subscription_refused([0x80]) and not watch.subscription_refused([1])
    error = watch.SubscriptionRefused("secret/#")
    assert error.exit_code == 2 and "'secret/#'" in str(error) and error.hint
