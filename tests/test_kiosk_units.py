"""Pure parts of the kiosk agent: backoff schedule, state file, metrics, scenarios, telemetry."""

from __future__ import annotations

import json
import random
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.backoff import Backoff, backoff_ceiling, full_jitter
from bridge.kiosk.metrics import is_significant, validate_metrics
from bridge.kiosk.options import AgentOptions
from bridge.kiosk.scenario import Scenario, ScenarioError, load_scenario
from bridge.kiosk.state import MAX_REMEMBERED_COMMANDS, STATE_FILE, AgentState
from bridge.kiosk.telemetry import DriftingTelemetry
from schemas import AckState, DeviceConfig, Status

# -- backoff ------------------------------------------------------------------------------


@given(
    attempt=st.integers(min_value=0, max_value=200),
    base=st.floats(min_value=0.01, max_value=10),
    cap=st.floats(min_value=10, max_value=600),
    seed=st.integers(),
)
def test_full_jitter_stays_within_zero_and_the_capped_exponential(
    attempt: int, base: float, cap: float, seed: int
) -> None:
    delay = full_jitter(attempt, base, cap, random.Random(seed))
    assert 0.0 <= delay <= min(cap, base * 2 ** min(attempt, 62))


def test_backoff_schedule_grows_until_the_cap_and_jitters() -> None:
    backoff = Backoff(base=1.0, cap=60.0, rng=random.Random(7))
    delays = [backoff.next_delay() for _ in range(12)]
    for n, delay in enumerate(delays):
        assert 0.0 <= delay <= min(60.0, 1.0 * 2**n)
    assert backoff_ceiling(11, 1.0, 60.0) == 60.0
    # Full jitter: the same attempt gives different delays, never a fixed schedule.
    same_attempt = [full_jitter(5, 1.0, 60.0, random.Random(seed)) for seed in range(20)]
    assert len(set(same_attempt)) > 1
    assert len(set(delays)) > 1


def test_backoff_reset_starts_again_from_the_base() -> None:
    backoff = Backoff(base=1.0, cap=60.0, rng=random.Random(1))
    for _ in range(10):
        backoff.next_delay()
    backoff.reset()
    assert backoff.attempt == 0
    assert backoff.next_delay() <= 1.0


# -- state file -----------------------------------------------------------------------------


def test_session_is_strictly_increasing_and_survives_reload(tmp_path: Path) -> None:
    state = AgentState(tmp_path / "k", fsync=False)
    first = state.next_session(1_000)
    # The wall clock stepped back: the session still grows.
    second = state.next_session(500)
    assert first == 1_000
    assert second == 1_001
    reloaded = AgentState(tmp_path / "k", fsync=False)
    assert reloaded.next_session(10) == 1_002
    assert reloaded.next_session(5_000) == 5_000


def test_state_file_is_replaced_atomically_without_leftovers(tmp_path: Path) -> None:
    state = AgentState(tmp_path, fsync=True)
    state.next_session(42)
    state.set_config(DeviceConfig(version=3, status_interval_s=12))
    assert [p.name for p in tmp_path.iterdir()] == [STATE_FILE]
    doc = json.loads((tmp_path / STATE_FILE).read_text())
    assert doc["last_session"] == 42
    assert doc["config"]["status_interval_s"] == 12
    assert AgentState(tmp_path).config == DeviceConfig(version=3, status_interval_s=12)


def test_only_the_last_command_ids_are_remembered(tmp_path: Path) -> None:
    assert MAX_REMEMBERED_COMMANDS == 1000
    state = AgentState(tmp_path, fsync=False, max_commands=50)
    ids = [uuid.uuid4() for _ in range(55)]
    for cid in ids:
        state.remember_command(cid, AckState.SUCCEEDED)
    reloaded = AgentState(tmp_path, fsync=False, max_commands=50)
    assert reloaded.remembered_commands == 50
    assert reloaded.command(ids[0]) is None
    assert reloaded.command(ids[4]) is None
    record = reloaded.command(ids[5])
    assert record is not None
    assert record.state is AckState.SUCCEEDED
    assert record.final


def test_a_corrupt_state_file_is_set_aside_not_fatal(tmp_path: Path) -> None:
    (tmp_path / STATE_FILE).write_text("{not json")
    state = AgentState(tmp_path, fsync=False)
    assert state.last_session == 0
    assert (tmp_path / "state.corrupt").read_text() == "{not json"
    assert state.next_session(77) == 77


def test_an_unwritable_state_file_is_logged_and_the_kiosk_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / STATE_FILE).mkdir()  # neither readable nor replaceable as a file
    state = AgentState(tmp_path, fsync=False)
    assert state.next_session(10) == 10
    assert state.next_session(10) == 11
    assert "cannot write" in caplog.text
    assert not list(tmp_path.glob(".state-*"))


def test_wipe_removes_the_directory_but_not_the_session_floor(tmp_path: Path) -> None:
    state = AgentState(tmp_path / "dev", fsync=False)
    state.next_session(900)
    state.remember_command(uuid.uuid4(), AckState.FAILED, "x")
    state.wipe()
    assert not (tmp_path / "dev").exists()
    assert state.remembered_commands == 0
    assert state.next_session(10) == 901


# -- metrics --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reported", "current", "expected"),
    [
        ({}, {"battery_level": 80}, True),
        ({"battery_level": 80}, {"battery_level": 76}, False),
        ({"battery_level": 80}, {"battery_level": 75}, True),
        ({"battery_level": 80}, {"battery_level": 85}, True),
        ({"screen_on": True}, {"screen_on": True}, False),
        ({"screen_on": True}, {"screen_on": False}, True),
        ({"network_type": "wifi"}, {"network_type": "lte"}, True),
        ({"current_url": "a"}, {"current_url": "b"}, True),
        ({"cpu_temp": 40.0}, {"cpu_temp": 70.0}, False),
        ({"wifi_strength": -50}, {"wifi_strength": -90}, False),
    ],
)
def test_significant_changes(reported: dict, current: dict, expected: bool) -> None:
    assert is_significant(reported, current) is expected


def test_validate_metrics_names_the_bad_field() -> None:
    validate_metrics({"battery_level": 50, "screen_on": True, "cpu_temp": 41.5})
    with pytest.raises(ValueError, match="unknown status field"):
        validate_metrics({"batery": 5})
    with pytest.raises(ValueError, match="battery_level"):
        validate_metrics({"battery_level": 101})
    with pytest.raises(ValueError, match="session"):
        validate_metrics({"session": 5})


def test_agent_options_reject_nonsense() -> None:
    with pytest.raises(ValueError, match="keepalive"):
        AgentOptions(keepalive=0)
    with pytest.raises(ValueError, match="QoS"):
        AgentOptions(status_qos=2)
    with pytest.raises(ValueError, match="backoff"):
        AgentOptions(backoff_base_s=10, backoff_cap_s=1)


# -- telemetry ------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(), steps=st.integers(min_value=1, max_value=400))
def test_drifting_telemetry_always_makes_a_valid_status(seed: int, steps: int) -> None:
    telemetry = DriftingTelemetry(random.Random(seed))
    readings: dict = {}
    for _ in range(steps):
        readings = telemetry.step(60.0)
    Status(session=1, seq=0, ts=0, **readings)


def test_telemetry_drifts() -> None:
    telemetry = DriftingTelemetry(random.Random(3))
    samples = [telemetry.step(60.0) for _ in range(120)]
    assert len({s["wifi_strength"] for s in samples}) > 3
    assert len({s["battery_level"] for s in samples}) > 3
    assert len({s["cpu_temp"] for s in samples}) > 3


# -- scenarios ------------------------------------------------------------------------------


def test_scenario_loads_from_yaml_and_json(tmp_path: Path) -> None:
    yaml_file = tmp_path / "s.yaml"
    yaml_file.write_text(
        "devices: 20\nchurn_per_s: 0.5\nsteps:\n  - {at_s: 3, kill: 0.1}\n"
        "  - {blackhole: 0.2, blackhole_for_s: 30}\n"
    )
    scenario = load_scenario(yaml_file)
    assert scenario.devices == 20
    assert scenario.churn_per_s == 0.5
    assert [s.kill for s in scenario.steps] == [0.1, 0.0]
    assert scenario.steps[1].blackhole_for_s == 30
    json_file = tmp_path / "s.json"
    json_file.write_text(json.dumps({"duration_s": 5, "steps": [{"drop": 0.5}]}))
    assert load_scenario(json_file) == Scenario(duration_s=5, steps=[{"drop": 0.5}])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("steps:\n  - {kill: 1.5}\n", "steps.0.kill"),
        ("devices: 0\n", "devices"),
        ("chrun_per_s: 1\n", "chrun_per_s"),
        ("steps: [\n", "not valid YAML"),
    ],
)
def test_bad_scenarios_say_where(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ScenarioError, match=message):
        load_scenario(path)


def test_missing_scenario_file_is_a_scenario_error(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="cannot read"):
        load_scenario(tmp_path / "nope.yaml")
