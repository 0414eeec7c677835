"""``watch`` against a real Mosquitto (and the embedded amqtt broker for 3.1.1 fallback)."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from bridge.embedded_broker import EmbeddedBroker
from bridge.testing.mosquitto import MosquittoProcess
from schemas import (
    OfflineReason,
    PresenceOffline,
    PresenceOnline,
    Status,
    TopicKind,
    device_topic,
    encode,
)
from tests.support.devices import publish_raw
from tests.support.ports import free_port
from tests.test_ops_cli import invoke

DEADLINE_S = 30.0
T0 = 1_764_331_200_000

# The ops commands are not wired into the ``kiosk-bridge`` script yet: compose them here.
_ENTRY = (
    "import typer; from bridge.cli import ops_cmd; "
    "app = typer.Typer(pretty_exceptions_enable=False); ops_cmd.register(app); "
    "app(prog_name='kiosk-bridge')"
)


class LineReader:
    """Lines of a child's stdout, readable with a deadline."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        assert proc.stdout is not None
        stream = proc.stdout

        def pump() -> None:
            for line in stream:
                self.lines.put(line.rstrip("\n"))
            self.lines.put(None)

        threading.Thread(target=pump, daemon=True).start()

    def next(self) -> str:
        line = self.lines.get(timeout=DEADLINE_S)
        assert line is not None, "watch exited early"
        return line


@pytest.fixture
def watch_process(mosquitto: MosquittoProcess) -> Iterator[subprocess.Popen[str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KB_") and k != "COLUMNS"}
    proc = subprocess.Popen(
        [sys.executable, "-c", _ENTRY, "watch", "--broker", mosquitto.url, "--count", "4"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


async def test_watch_tails_live_messages_and_flags_invalid_ones(
    mosquitto: MosquittoProcess, watch_process: subprocess.Popen[str]
) -> None:
    presence = device_topic("w-1", TopicKind.PRESENCE)
    await publish_raw(
        mosquitto.url, presence, encode(PresenceOnline(session=3, ts=T0, app_version="9.1")), True
    )
    reader = LineReader(watch_process)
    # The retained birth arrives once watch has subscribed: live messages are safe now.
    first = await asyncio.to_thread(reader.next)
    assert " R w-1" in first and "presence" in first and "online session=3 app=9.1" in first
    await publish_raw(
        mosquitto.url,
        device_topic("w-1", TopicKind.STATUS),
        encode(Status(session=3, seq=1, ts=T0, battery_level=64)),
    )
    await publish_raw(mosquitto.url, presence, b'{"state":"offline","session":3,"ts":1}')
    await publish_raw(mosquitto.url, "kiosk/v1/no good/status", b"{}")
    status, bad_payload, bad_topic = [await asyncio.to_thread(reader.next) for _ in range(3)]
    assert "w-1" in status and "status" in status and "battery=64%" in status
    assert " R " not in status[:16]
    assert "INVALID" in bad_payload and "reason: Field required" in bad_payload
    assert "INVALID" in bad_topic and "invalid device id 'no good'" in bad_topic
    code = await asyncio.to_thread(watch_process.wait, DEADLINE_S)
    assert code == 0, watch_process.stderr.read() if watch_process.stderr else ""


async def test_watch_retained_only_json(mosquitto: MosquittoProcess) -> None:
    await publish_raw(
        mosquitto.url,
        device_topic("r-1", TopicKind.PRESENCE),
        encode(PresenceOffline(session=4, ts=T0, reason=OfflineReason.REBOOT)),
        True,
    )
    await publish_raw(mosquitto.url, device_topic("r-2", TopicKind.PRESENCE), b"[1,2]", True)
    await publish_raw(mosquitto.url, device_topic("r-3", TopicKind.CMD), b"not retained")
    result = await asyncio.to_thread(
        invoke, "watch", "--retained-only", "--json", "--broker", mosquitto.url
    )
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [e["topic"] for e in events] == [
        "kiosk/v1/r-1/presence",
        "kiosk/v1/r-2/presence",
    ]
    good, bad = events
    assert good["valid"] and good["retained"] and good["device"] == "r-1"
    assert good["payload"] == {
        "schema_version": 1,
        "state": "offline",
        "session": 4,
        "ts": T0,
        "reason": "reboot",
    }
    assert not bad["valid"] and bad["error"] and bad["payload"] == "[1,2]"
    assert "warning" not in result.output


async def test_watch_raw_with_count_and_protocol(mosquitto: MosquittoProcess) -> None:
    topic = device_topic("raw-1", TopicKind.PRESENCE)
    payload = encode(PresenceOnline(session=8, ts=T0))
    await publish_raw(mosquitto.url, topic, payload, True)
    for protocol in ("5", "3.1.1"):
        result = await asyncio.to_thread(
            invoke,
            "watch",
            topic,
            "--raw",
            "--count",
            "1",
            "--protocol",
            protocol,
            "--broker",
            mosquitto.url,
        )
        assert result.exit_code == 0, result.output
        assert result.stdout.rstrip().endswith(f"R {topic} {payload.decode()}")


def test_watch_unreachable_broker_and_bad_options() -> None:
    url = f"mqtt://127.0.0.1:{free_port()}"
    result = invoke("watch", "--count", "1", "--broker", url)
    assert result.exit_code == 3
    assert f"cannot connect to broker {url}" in result.stderr
    assert "Traceback" not in result.output
    assert invoke("watch", "--broker", "http://x").exit_code == 2
    assert invoke("watch", "--protocol", "4", "--broker", url).exit_code == 2
    assert invoke("watch", "--count", "0", "--broker", url).exit_code == 2


async def test_watch_falls_back_to_mqtt_311(embedded_broker: EmbeddedBroker) -> None:
    topic = device_topic("emb-1", TopicKind.PRESENCE)
    await publish_raw(embedded_broker.url, topic, encode(PresenceOnline(session=2, ts=T0)), True)
    result = await asyncio.to_thread(
        invoke, "watch", "--retained-only", "--json", "--broker", embedded_broker.url
    )
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(e["device"], e["payload"]["session"]) for e in events] == [("emb-1", 2)]
