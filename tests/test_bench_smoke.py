"""The benchmarks still run, end to end, at a tiny scale (so they cannot rot).

Each calls a benchmark's ``collect`` exactly as ``bench/run_all`` does and checks the
figures it must produce, and the invariants that hold at any scale: the old pinger
cannot see a black hole before its 5 s timeout, the broker sees one within 1.5 x
keepalive, a slow-but-alive MQTT link (under keepalive/2 each way) is never shown
offline, no command is lost or executed twice, and the table equals the retained truth
after a soak.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from bridge.testing.mosquitto import MosquittoNotFound, find_binary
from tests.support.services import service_unavailable

BENCH = Path(__file__).resolve().parent.parent / "bench"
SCALE = 0.02

pytestmark = pytest.mark.mosquitto


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> Any:
    try:
        find_binary()
    except MosquittoNotFound as exc:
        service_unavailable(str(exc))
    monkeypatch.syspath_prepend(str(BENCH))

    def load(name: str) -> ModuleType:
        return importlib.import_module(name)

    return load


def test_legacy_side_by_side(bench: Any) -> None:
    legacy = bench("legacy")
    plan = legacy.Plan.for_scale(SCALE)
    results = legacy.collect(SCALE)
    assert [r.name.split(",")[0] for r in results] == [
        "legacy vs kiosk-bridge: black hole",
        "legacy vs kiosk-bridge: slow links",
        "legacy vs kiosk-bridge: process death",
        "legacy pinger cycle (one pass over the fleet",
    ]
    hole, slow, death, cycles = (r.figures for r in results)

    assert hole["old: never detected"] == 0
    assert hole["new: never detected"] == 0
    assert hole["old: -> Disconnected s"]["n"] == plan.holes
    assert hole["old: -> Disconnected s"]["p50"] >= legacy.PING_TIMEOUT_S
    assert hole["new: -> Disconnected s"]["n"] == plan.holes
    new_p50 = hole["new: -> Disconnected s"]["p50"]
    # The broker counts 1.5 x keepalive from the last packet it had, which the agent sent
    # at most one keepalive before the freeze; Mosquitto 2.0.11 was seen to act up to
    # ~5 s after that (whole seconds, a periodic check).
    assert 0.5 * plan.keepalive - 1 <= new_p50 <= 1.5 * plan.keepalive + 6
    assert hole["ratio old/new p50"] > 0

    # Below keepalive/2 each way the round trip of a PINGREQ fits in the keepalive.
    [margin] = [k for k in slow if k.startswith("new, 0.4 x keepalive") and "episodes" in k]
    assert slow[margin] == 0
    assert slow["new, not slowed: false offline episodes"] == 0
    assert slow["old: false offline episodes"] >= slow["old: devices shown offline"] >= 0

    assert death["old: never detected"] == death["new: never detected"] == 0
    assert death["new: -> Disconnected ms"]["n"] == plan.deaths
    assert death["new: -> Disconnected ms"]["p50"] < 1000
    assert death["old: -> Disconnected ms"]["n"] == plan.deaths

    # A black-holed device holds a worker for the whole timeout.
    assert cycles["10% black-holed s"]["max"] >= legacy.PING_TIMEOUT_S


def test_commands_round_trip_and_fan_out(bench: Any) -> None:
    commands = bench("commands")
    sizes = commands.Sizes.for_scale(SCALE)
    round_trip, fan_out, faults = commands.collect(SCALE)

    rt = round_trip.figures
    assert rt["lost"] == 0
    assert rt["probe 0.005s, poll 0.5s: enqueue -> succeeded ms"]["n"] == sizes.samples
    assert rt["probe off, poll 0.5s: enqueue -> succeeded ms"]["n"] == sizes.default_samples
    assert rt["probe 0.005s, poll 0.5s: enqueue -> succeeded ms"]["p50"] > 0
    assert {"p50", "p99", "max"} <= set(rt["stage received -> succeeded ms"])

    fo = fan_out.figures
    assert fo["final states"] == {"succeeded": sizes.total}
    assert fo["lost (not succeeded)"] == 0
    assert fo["executed twice"] == 0
    assert isinstance(fo["enqueue -> last succeeded s"], float)
    assert fo["per command (created -> finished) ms"]["n"] == sizes.total

    fr = faults.figures
    assert fr["final states"] == {"succeeded": sizes.total}
    assert fr["lost (not succeeded)"] == 0
    assert fr["executed twice"] == 0
    assert isinstance(fr["enqueue -> all final s"], float)
    assert fr["bridge kill -9 at s"] < fr["broker restart at s"]


def test_soak(bench: Any) -> None:
    soak = bench("soak")
    [result] = soak.collect(SCALE)
    figures = result.figures

    assert figures["consistency"]["ok"] is True, result.notes
    assert figures["consistency"]["checked"] == figures["consistency"]["agree"] > 0
    # The forced first drop: lost, then online again.
    assert figures["faults (drops + reboots)"] >= 1
    assert figures["transitions applied"] >= 2
    assert figures["commands enqueued"] >= 1
    assert figures["commands executed twice"] == 0
    assert figures["commands still open"] == 0
    assert sum(figures["commands final states"].values()) == figures["commands enqueued"]
    assert figures["bridge RSS MiB"]["samples"] >= 2
    assert figures["bridge RSS MiB"]["max"] >= figures["bridge RSS MiB"]["first"] > 0


def test_http_auth_401_path(bench: Any) -> None:
    http_auth = bench("http_auth")
    [result] = http_auth.collect(SCALE)
    figures = result.figures
    assert figures["answers"] == {"401": figures["401 ms (kiosk-bridge)"]["n"]}, result.notes
    assert figures["401 ms (kiosk-bridge)"]["p50"] > 0
    assert figures["401 ms (floor: bare starlette + dict)"]["p50"] > 0
    assert figures["ratio p99"] > 0


def test_restart_prints_every_figure_beside_its_floor(bench: Any) -> None:
    restart = bench("restart")
    result = restart.run("sqlite", 300, 0.5)
    figures = result.figures
    for key in ("cold", "warm"):
        assert figures[f"{key} / floor"] > 0
        assert figures[f"{key} / paho + SQLite floor"] > 0
    assert figures["floor: paho receive only s"] > 0
    assert figures["floor: mosquitto_sub retained set s"] > 0
    assert figures["RSS peak MiB"] > 0
    # At 300 devices the replay may end before the first kill: the figures are still
    # there, with n = 0, rather than missing.
    deaths = figures["kill -> lost during replay ms"]
    for key in (
        "kill -> bare MQTT 5 subscriber ms (floor)",
        "kill -> bridge received ms",
        "bridge received -> committed ms",
    ):
        assert figures[key]["n"] == deaths["n"]


def test_connected_kiosks_in_two_processes_are_each_killed_and_seen(bench: Any) -> None:
    result = bench("connected").run("sqlite", 40, 2, 6)
    figures = result.figures
    assert figures["kiosks connected (all rows Connected)"] == 40
    assert len(figures["each process connected its share in s"]) == 2
    deaths = figures["kill -> Disconnected ms"]
    assert deaths["n"] == 6
    assert 0 < deaths["p50"] <= deaths["max"]
    assert figures["bridge RSS MiB"] > 0


def test_cli_startup_times_each_command_beside_its_floor(bench: Any) -> None:
    result = bench("cli_startup").run(1)
    ratios = {k: v for k, v in result.figures.items() if k.endswith(" ratio")}
    assert set(ratios) == {
        "--help ratio",
        "devices --help ratio",
        "send --help ratio",
        "devices --json (100 rows) ratio",
    }
    assert all(ratio > 0 for ratio in ratios.values())
