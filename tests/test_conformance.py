"""The conformance kit: its pure parts, the reference agent passing it, deliberately
broken kiosks failing exactly the clause they break, and the CLI's exit codes."""

from __future__ import annotations

import asyncio
import json
import shutil
import struct
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from bridge.conformance.clauses import CLAUSES, Outcome
from bridge.conformance.observations import LinkRecord, Observations, Recorder
from bridge.conformance.process import render_command
from bridge.conformance.runner import KitOptions, run_kit
from bridge.conformance.specimens.kiosk import FLAWS
from bridge.conformance.verdicts import backoff_problem, judge
from bridge.conformance.wire import Connack, Connect, Publish, StreamParser, Suback, Subscribe
from bridge.testing.mosquitto import MosquittoProcess

ALL_IDS = {c.id for c in CLAUSES}
SPECIMEN = (
    f"{sys.executable} -m bridge.conformance.specimens.kiosk --host {{host}} --port {{port}} "
    "--device-id {device_id} --state-dir {state_dir} --keepalive 2 --backoff-base 0.25"
)


def _cli() -> list[str]:
    found = shutil.which("kiosk-bridge")
    return [found] if found else [sys.executable, "-m", "bridge.cli"]


REFERENCE = (
    f"{_cli()[0]} kiosk --device-id {{device_id}} --broker mqtt://{{host}}:{{port}} "
    "--state-dir {state_dir} --keepalive 2"
)


# -- pure parts ------------------------------------------------------------------------------


def _mqtt_str(text: str) -> bytes:
    return struct.pack(">H", len(text)) + text.encode()


def _frame(first: int, body: bytes) -> bytes:
    assert len(body) < 128
    return bytes([first, len(body)]) + body


def test_wire_reads_a_v5_connect_with_will_and_credentials_split_anywhere() -> None:
    props = bytes([5, 0x11]) + struct.pack(">I", 86_400)
    will = b'{"state":"lost","session":7}'
    flags = 0x80 | 0x40 | 0x20 | 0x08 | 0x04  # user, password, will retain, will QoS 1, will
    body = (
        _mqtt_str("MQTT")
        + bytes([5, flags])
        + struct.pack(">H", 10)
        + props
        + _mqtt_str("k-1")
        + b"\x00"
        + _mqtt_str("kiosk/v1/k-1/presence")
        + struct.pack(">H", len(will))
        + will
        + _mqtt_str("k-1")
        + _mqtt_str("tok")
    )
    stream = _frame(0x10, body) + _frame(0x33, _mqtt_str("t") + b"\x00\x01" + b"\x00" + b"hi")
    parser = StreamParser()
    packets = [p for i in range(len(stream)) for p in parser.feed(stream[i : i + 1])]
    connect, publish = packets
    assert isinstance(connect, Connect) and isinstance(publish, Publish)
    assert (connect.client_id, connect.keepalive, connect.clean) == ("k-1", 10, False)
    assert connect.session_expiry == 86_400 and connect.password == b"tok"
    assert connect.will is not None and connect.will.retain and connect.will.qos == 1
    assert connect.will.payload == will
    assert (publish.topic, publish.qos, publish.retain, publish.payload) == ("t", 1, True, b"hi")
    down = StreamParser(v5=True)
    assert down.feed(_frame(0x20, b"\x00\x00")) == [Connack(0)]


def test_a_subscription_counts_once_its_suback_grants_it() -> None:
    # The kit sends its first command only once the kiosk's command filter is granted.
    links: list = []
    rec = Recorder("k-1", links)
    connect = _mqtt_str("MQTT") + bytes([4, 0x02]) + struct.pack(">H", 10) + _mqtt_str("k-1")
    subscribe = (
        struct.pack(">H", 7)
        + _mqtt_str("kiosk/v1/k-1/cmd")
        + b"\x01"
        + _mqtt_str("kiosk/v1/k-1/config")
        + b"\x01"
    )
    rec.tap(1, True, _frame(0x10, connect) + _frame(0x82, subscribe))
    (link,) = links
    assert not link.subscribed_to("kiosk/v1/k-1/cmd")
    assert StreamParser().feed(_frame(0x82, subscribe)) == [
        Subscribe(7, ("kiosk/v1/k-1/cmd", "kiosk/v1/k-1/config"))
    ]
    # The broker grants the first filter and refuses the second (0x80).
    rec.tap(1, False, _frame(0x90, struct.pack(">H", 7) + b"\x01\x80"))
    assert StreamParser().feed(_frame(0x90, struct.pack(">H", 7) + b"\x01\x80")) == [
        Suback(7, (1, 0x80))
    ]
    assert link.subscribed_to("kiosk/v1/k-1/cmd")
    assert not link.subscribed_to("kiosk/v1/k-1/config")


def test_backoff_verdicts() -> None:
    assert backoff_problem([]) == "no reconnection attempt"
    assert "fixed interval" in (backoff_problem([0.5, 0.52, 0.49, 0.5]) or "")
    assert "tight" in (backoff_problem([0.01, 0.0, 0.02, 0.5]) or "")
    assert "shrink" in (backoff_problem([4.0, 3.0, 0.2, 0.1]) or "")
    assert backoff_problem([0.6, 1.2, 1.9, 0.4, 6.4]) is None


def test_nothing_seen_fails_every_clause_with_a_reason() -> None:
    verdicts = judge(Observations("k-1", "k-1-b"))
    assert {v.clause.id for v in verdicts if v.outcome is Outcome.FAIL} == ALL_IDS
    assert all(v.detail for v in verdicts)


def test_a_birth_after_the_own_offline_fails_pres_5() -> None:
    topic = "kiosk/v1/k-1/presence"
    link = LinkRecord("k-1", 1, 0.0)
    offline = b'{"state":"offline","session":5,"ts":1,"reason":"shutdown"}'
    online = b'{"state":"online","session":5,"ts":2}'
    link.publishes += [
        (1.0, Publish(topic, offline, 1, True, False)),
        (1.1, Publish(topic, online, 1, True, False)),
    ]
    obs = Observations("k-1", "k-1-b", links=[link])
    verdict = {v.clause.id: v for v in judge(obs)}["KB-PRES-5"]
    assert verdict.outcome is Outcome.FAIL and "re-published" in verdict.detail


def test_placeholders_are_filled_per_word_and_other_braces_stay() -> None:
    argv = render_command(
        "kiosk --at {host}:{port} --json '{\"a\": 1}'", {"host": "h", "port": "1"}
    )
    assert argv == ["kiosk", "--at", "h:1", "--json", '{"a": 1}']


# -- real kiosks against real Mosquitto --------------------------------------------------------


def _failed(report: dict[str, object]) -> set[str]:
    clauses = report["clauses"]
    assert isinstance(clauses, list)
    return {c["id"] for c in clauses if c["outcome"] == "fail"}


@pytest.mark.timeout(150)
def test_the_reference_agent_passes_every_clause(
    mosquitto: MosquittoProcess, tmp_path: Path
) -> None:
    done = subprocess.run(
        [
            *_cli(),
            "conformance",
            "--kiosk-cmd",
            REFERENCE,
            "--broker",
            mosquitto.url,
            "--keepalive-range",
            "1-30",
            "--json",
            "--work-dir",
            str(tmp_path / "kit"),
        ],
        capture_output=True,
        text=True,
        timeout=140,
        check=False,
    )
    report = json.loads(done.stdout)
    failed = {c["id"]: c["detail"] for c in report["clauses"] if c["outcome"] != "pass"}
    assert failed == {}, done.stderr[-2000:]
    assert done.returncode == 0
    assert report["passed"] is True and len(report["clauses"]) == len(CLAUSES)


@pytest.mark.timeout(170)
async def test_each_broken_kiosk_fails_exactly_its_clauses(
    mosquitto: MosquittoProcess, tmp_path: Path
) -> None:
    async def run(flaw: str) -> tuple[str, set[str], dict[str, str]]:
        options = KitOptions(
            kiosk_cmd=f"{SPECIMEN} --flaw {flaw}",
            work_dir=tmp_path / flaw,
            device_id=f"spec-{uuid.uuid4().hex[:6]}",
            broker_url=mosquitto.url,
            keepalive_range=(1, 30),
        )
        (tmp_path / flaw).mkdir()
        kit = await run_kit(options)
        verdicts = judge(kit.observations)
        failed = {v.clause.id for v in verdicts if v.outcome is Outcome.FAIL}
        return flaw, failed, {v.clause.id: v.detail for v in verdicts}

    results = await asyncio.gather(*(run(flaw) for flaw in FLAWS))
    wrong = {
        flaw: {
            "expected": sorted(FLAWS[flaw]),
            "failed": {clause: details[clause] for clause in sorted(failed)},
        }
        for flaw, failed, details in results
        if failed != set(FLAWS[flaw])
    }
    assert wrong == {}


def test_cli_exit_codes_for_a_bad_command_and_an_unreachable_broker(
    mosquitto: MosquittoProcess, tmp_path: Path
) -> None:
    def conformance(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*_cli(), "conformance", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    missing = conformance("--kiosk-cmd", "no-such-kiosk-binary {host}", "--broker", mosquitto.url)
    assert missing.returncode == 2
    assert missing.stderr.strip().count("\n") == 0 and "no-such-kiosk-binary" in missing.stderr
    exits = conformance("--kiosk-cmd", "sh -c 'exit 4'", "--broker", mosquitto.url, "--json")
    assert exits.returncode == 2 and "exited with code 4" in exits.stderr
    assert "Traceback" not in exits.stderr + missing.stderr
    port = mosquitto.port
    mosquitto.stop()
    down = conformance("--kiosk-cmd", "true", "--broker", f"mqtt://127.0.0.1:{port}")
    assert down.returncode == 3 and "cannot reach" in down.stderr
    helped = conformance("--help")
    for clause in CLAUSES:
        assert clause.id in helped.stdout
