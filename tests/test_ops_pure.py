"""The pure parts of the ops tooling: parsing, availability, filters, wording, judging."""

from __future__ import annotations

import uuid

import pytest
from rich.console import Console

from bridge.ops import consistency, doctor, fleet, skew, timeline, top, uptime, watch
from bridge.ops.durations import format_duration, parse_duration
from bridge.ops.mqtt import RetainedMessage
from schemas import (
    Ack,
    AckState,
    BridgePresence,
    Command,
    DeviceConfig,
    InvalidPayload,
    OfflineReason,
    PresenceLost,
    PresenceOffline,
    PresenceOnline,
    PresenceState,
    Status,
    TopicKind,
    bridge_presence_topic,
    device_topic,
    encode,
)
from schemas.topics import bridge_sync_topic

PREFIX = "kiosk/v1"
T0 = 1_764_331_200_000
MIN = 60_000
HOUR = 60 * MIN


def _text(renderable: object, width: int = 160) -> str:
    console = Console(record=True, width=width, force_terminal=False)
    console.print(renderable)
    return console.export_text()


# --- durations -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("5m", 300_000),
        ("7d", 604_800_000),
        ("1h30m", 5_400_000),
        ("90s", 90_000),
        ("250ms", 250),
        ("1.5h", 5_400_000),
        (" 2w ", 1_209_600_000),
        ("1H", 3_600_000),
    ],
)
def test_parse_duration(text: str, ms: int) -> None:
    assert parse_duration(text) == ms


@pytest.mark.parametrize("text", ["", "5", "m5", "5 minutes", "1h-30m", "5x", "h"])
def test_parse_duration_rejects_with_example(text: str) -> None:
    with pytest.raises(ValueError, match=r"e\.g\. 90s"):
        parse_duration(text)


def test_format_duration() -> None:
    assert format_duration(850) == "850ms"
    assert format_duration(61_000) == "1m 1s"
    assert format_duration(3 * 86_400_000 + 4 * HOUR + 5 * MIN) == "3d 4h"
    assert format_duration(HOUR) == "1h"
    assert format_duration(-90_000) == "-1m 30s"


# --- availability --------------------------------------------------------------------------


def test_availability_splits_online_announced_lost_and_unknown() -> None:
    transitions = [
        uptime.Transition(T0 + 10 * MIN, "online"),
        uptime.Transition(T0 + 40 * MIN, "offline", "reboot"),
        uptime.Transition(T0 + 45 * MIN, "online"),
        uptime.Transition(T0 + 50 * MIN, "lost"),
        uptime.Transition(T0 + 55 * MIN, "online"),
    ]
    a = uptime.availability(transitions, T0, T0 + HOUR)
    assert a.unknown_ms == 10 * MIN  # before the first event
    assert a.online_ms == 30 * MIN + 5 * MIN + 5 * MIN
    assert a.announced_ms == 5 * MIN
    assert a.announced_by_reason == {"reboot": 5 * MIN}
    assert a.lost_ms == 5 * MIN
    assert a.transitions == 5
    assert a.percent == pytest.approx(100 * 40 / 50)


def test_availability_starts_in_the_state_before_the_window_and_ignores_later() -> None:
    transitions = [
        uptime.Transition(T0 - 5 * HOUR, "online"),
        uptime.Transition(T0 - HOUR, "lost"),
        uptime.Transition(T0 + 30 * MIN, "online"),
        uptime.Transition(T0 + 2 * HOUR, "offline", "shutdown"),
    ]
    a = uptime.availability(reversed(transitions), T0, T0 + HOUR)
    assert (a.lost_ms, a.online_ms, a.unknown_ms, a.announced_ms) == (30 * MIN, 30 * MIN, 0, 0)
    assert a.transitions == 1
    assert a.percent == 50.0


def test_availability_of_nothing_known_is_none() -> None:
    a = uptime.availability([], T0, T0 + HOUR)
    assert (a.unknown_ms, a.ratio, a.percent) == (HOUR, None, None)
    unknown_after = uptime.availability(
        [uptime.Transition(T0, "online"), uptime.Transition(T0 + 15 * MIN, "unknown")],
        T0,
        T0 + HOUR,
    )
    assert unknown_after.percent == 100.0
    assert unknown_after.unknown_ms == 45 * MIN
    with pytest.raises(ValueError, match="ends before"):
        uptime.availability([], T0, T0 - 1)


@pytest.mark.parametrize(("text", "value"), [("99%", 99.0), ("99.5", 99.5), (" 0 % ", 0.0)])
def test_parse_percent(text: str, value: float) -> None:
    assert uptime.parse_percent(text) == value


@pytest.mark.parametrize("text", ["abc", "101%", "-1"])
def test_parse_percent_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="percentage"):
        uptime.parse_percent(text)


# --- fleet -------------------------------------------------------------------------------


def _row(device_id: str, state: str, **kwargs: object) -> fleet.FleetRow:
    values: dict[str, object] = {
        "device_id": device_id,
        "name": None,
        "state": state,
        "since_ms": T0,
        "reason": None,
        "session": 1,
        "legacy_status": "Connected" if state == "online" else "Disconnected",
        "flapping": False,
        "battery": None,
        "wifi": None,
        "last_seen_ms": T0,
        "app_version": None,
    }
    values.update(kwargs)
    return fleet.FleetRow(**values)  # type: ignore[arg-type]


ROWS = [
    _row("lobby-1", "online", battery=80, name="Main lobby", app_version="2.4.1"),
    _row("hall-2", "lost", battery=15, last_seen_ms=T0 - HOUR),
    _row("desk-3", "offline", reason="reboot", flapping=True, last_seen_ms=None),
    _row("gone-4", "unknown", deleted=True),
]


def test_fleet_filters() -> None:
    def ids(flt: fleet.FleetFilter) -> list[str]:
        return [r.device_id for r in fleet.apply_filter(ROWS, flt, T0 + MIN)]

    assert ids(fleet.FleetFilter()) == ["lobby-1", "hall-2", "desk-3"]
    assert ids(fleet.FleetFilter(deleted=True))[-1] == "gone-4"
    assert ids(fleet.FleetFilter(state="lost")) == ["hall-2"]
    assert ids(fleet.FleetFilter(flapping=True)) == ["desk-3"]
    # Never seen counts as stale.
    assert ids(fleet.FleetFilter(stale_ms=5 * MIN)) == ["hall-2", "desk-3"]
    assert ids(fleet.FleetFilter(search="LOBBY")) == ["lobby-1"]
    assert ids(fleet.FleetFilter(search="2.4")) == ["lobby-1"]


def test_fleet_sort_puts_missing_values_last() -> None:
    by_battery = fleet.sort_rows(ROWS, "battery")
    assert [r.device_id for r in by_battery] == ["hall-2", "lobby-1", "desk-3", "gone-4"]
    desc = fleet.sort_rows(ROWS, "battery", descending=True)
    assert [r.device_id for r in desc][:2] == ["lobby-1", "hall-2"]
    assert fleet.sort_rows(ROWS, "state")[0].device_id == "hall-2"
    with pytest.raises(ValueError, match="cannot sort by"):
        fleet.sort_rows(ROWS, "colour")


def test_fleet_summary() -> None:
    summary = fleet.summarize(ROWS[:3])
    assert summary.total == 3
    assert summary.by_state == {"online": 1, "offline": 1, "lost": 1, "unknown": 0}
    assert (summary.connected, summary.disconnected, summary.flapping) == (1, 2, 1)


# --- watch --------------------------------------------------------------------------------


def _describe(topic: str, payload: bytes, retained: bool = False) -> watch.WatchEvent:
    return watch.describe(topic, payload, retained=retained, received_ms=T0, prefix=PREFIX)


def test_watch_describes_every_kind() -> None:
    presence = device_topic("k-1", TopicKind.PRESENCE)
    cmd_id = uuid.uuid4()
    cases = [
        (presence, PresenceOnline(session=7, ts=T0, app_version="2.4.1"), "online session=7"),
        (
            presence,
            PresenceOffline(session=7, ts=T0, reason=OfflineReason.REBOOT),
            "offline reason=reboot",
        ),
        (presence, PresenceLost(session=7), "lost (Last Will) session=7"),
        (
            device_topic("k-1", TopicKind.STATUS),
            Status(session=7, seq=3, ts=T0, battery_level=85, config_version=4),
            "battery=85%",
        ),
        (
            device_topic("k-1", TopicKind.CMD),
            Command(id=cmd_id, type="refresh", issued_at=T0, expires_at=T0 + HOUR),
            f"refresh id={cmd_id}",
        ),
        (
            device_topic("k-1", TopicKind.ACK),
            Ack(id=cmd_id, state=AckState.FAILED, ts=T0, detail="no network"),
            "failed",
        ),
        (device_topic("k-1", TopicKind.CONFIG), DeviceConfig(version=3), "version=3"),
        (
            bridge_presence_topic(),
            BridgePresence(state=PresenceState.ONLINE, instance="b-1"),
            "online instance=b-1",
        ),
    ]
    for topic, model, expected in cases:
        event = _describe(topic, encode(model), retained=True)
        assert event.valid, event.error
        assert expected in event.summary
        assert event.data is not None
    assert _describe(presence, encode(PresenceLost(session=7))).state == "lost"
    assert _describe(bridge_presence_topic(), encode(cases[-1][1])).device_id == "_bridge"


def test_watch_flags_invalid_payloads_and_topics() -> None:
    presence = device_topic("k-1", TopicKind.PRESENCE)
    bad_field = _describe(presence, b'{"state":"online","session":"7","ts":1}')
    assert not bad_field.valid
    assert bad_field.error is not None and bad_field.error.startswith("session")
    assert bad_field.device_id == "k-1"
    assert not _describe(presence, b"{not json").valid
    bad_topic = _describe("kiosk/v1/bad id/presence", b"{}")
    assert (bad_topic.valid, bad_topic.kind, bad_topic.device_id) == (False, "unknown", None)
    line = watch.render_line(bad_field).plain
    assert "INVALID" in line and "session" in line and "k-1" in line


def test_watch_cleared_marker_and_json() -> None:
    cleared = _describe(device_topic("k-1", TopicKind.PRESENCE), b"", retained=False)
    assert cleared.valid and "cleared" in cleared.summary
    marker = _describe(bridge_sync_topic(uuid.uuid4().hex), b"x")
    assert marker.kind == watch.SYNC
    event = _describe(
        device_topic("k-1", TopicKind.PRESENCE), encode(PresenceOnline(session=7, ts=T0)), True
    )
    out = watch.to_json(event)
    assert set(out) == {
        "received_ms",
        "received_at",
        "topic",
        "retained",
        "device",
        "kind",
        "valid",
        "error",
        "summary",
        "payload",
    }
    assert out["payload"]["session"] == 7
    assert isinstance(watch.to_json(event, raw=True)["payload"], str)
    assert watch.render_line(event).plain.startswith("12:00:00.000 R k-1")
    assert "kiosk/v1/k-1/presence {" in watch.render_line(event, raw=True).plain


# --- device show wording ----------------------------------------------------------------------


def _hist(
    id_: int, state: str, session: int, verdict: str, at: int, **kw: object
) -> timeline.HistoryRow:
    values: dict[str, object] = {
        "id": id_,
        "state": state,
        "prev_state": None,
        "session": session,
        "reason": None,
        "verdict": verdict,
        "device_ts_ms": None,
        "received_ms": at,
        "committed_ms": at + 5,
        "writer": "b-1",
    }
    values.update(kw)
    return timeline.HistoryRow(**values)  # type: ignore[arg-type]


def _conn(state: str, session: int, **kw: object) -> timeline.ConnectivityView:
    values: dict[str, object] = {
        "state": state,
        "session": session,
        "since_ms": T0,
        "reason": None,
        "status_session": session,
        "last_seq": 0,
        "last_status_ms": None,
        "last_device_ts_ms": None,
        "flapping": False,
        "transitions": 1,
        "legacy_status": "Disconnected",
        "writer": "b-1",
        "updated_ms": T0,
    }
    values.update(kw)
    return timeline.ConnectivityView(**values)  # type: ignore[arg-type]


def test_explain_lost_with_ignored_events_and_newer_telemetry() -> None:
    history = [
        _hist(1, "online", 5, "applied", T0 - HOUR),
        _hist(2, "lost", 5, "applied", T0, prev_state="online"),
        _hist(3, "lost", 4, "stale", T0 + MIN),
    ]
    lines = timeline.explain(_conn("lost", 5, status_session=6), history, None, T0 + 2 * MIN)
    text = "\n".join(lines)
    assert "Lost since" in text and "Last Will (session 5)" in text
    assert "online -> lost" in text
    assert "1 event(s) were ignored: 1 stale" in text
    assert "newer session (6)" in text


def test_explain_offline_reason_grace_and_never_seen() -> None:
    offline = _conn("offline", 9, reason="app_update", legacy_status="Connected")
    remote = timeline.RemoteView(None, "Connected", None, None, None, None, None, None, None)
    text = "\n".join(timeline.explain(offline, [], remote, T0 + MIN))
    assert "announced it (app_update)" in text
    assert "No newer session" in text
    assert "grace period" in text
    never = "\n".join(timeline.explain(_conn("unknown", 0, since_ms=0), [], None, T0))
    assert never.startswith("Never seen")
    assert "only in the CMS" in "\n".join(timeline.explain(None, [], None, T0))


def test_timeline_merges_and_marks_ignored_events() -> None:
    history = [
        _hist(1, "online", 5, "applied", T0, device_ts_ms=T0 + 20_000),
        _hist(2, "online", 5, "duplicate", T0 + 2 * MIN),
        _hist(3, "lost", 4, "stale", T0 + 3 * MIN),
    ]
    cmd = timeline.CommandView(
        "abcdef12-0000", "refresh", "succeeded", T0 + MIN, T0 + MIN + 1500, None, 2, None
    )
    entries = timeline.build_timeline(
        history, [cmd], _conn("online", 5, last_status_ms=T0 + 30_000), T0 + 10 * MIN
    )
    assert [e.kind for e in entries] == ["birth", "status", "command", "birth", "will", "status"]
    assert "device clock +20s" in entries[0].text
    assert entries[3].ignored and "duplicate" in entries[3].text
    assert "stale" in entries[4].text and "session 5 is newer" in entries[4].text
    assert "refresh abcdef12 -> succeeded after 1s (2 attempts)" in entries[2].text
    assert entries[-1].text.startswith("status gap: online but silent for 9m 30s")


def test_config_view() -> None:
    assert "unknown" in timeline.config_view(None, None, source=None).note
    view = timeline.config_view(
        DeviceConfig(version=8), Status(session=1, seq=0, ts=T0, config_version=7), source="x"
    )
    assert (view.desired_version, view.reported_version, view.in_sync) == (8, 7, False)
    assert "not the desired 8" in view.note


# --- consistency, skew, doctor ------------------------------------------------------------


def test_consistency_compare() -> None:
    retained = {
        "same": PresenceOnline(session=3, ts=T0),
        "down-alike": PresenceLost(session=4),
        "newer": PresenceOnline(session=9, ts=T0),
        "flipped": PresenceLost(session=2),
        "untracked": PresenceOnline(session=1, ts=T0),
        "broken": InvalidPayload("state: bad", field="state"),
        "retired": PresenceOnline(session=1, ts=T0),
    }
    table = {
        "same": consistency.TableState("online", 3),
        "down-alike": consistency.TableState("offline", 4),
        "newer": consistency.TableState("online", 8),
        "flipped": consistency.TableState("online", 2),
        "vanished": consistency.TableState("online", 5),
        "never": consistency.TableState("unknown", 0),
        "broken": consistency.TableState("online", 1),
    }
    report = consistency.compare(retained, table, deleted={"retired"})
    kinds = {m.device_id: m.kind for m in report.mismatches}
    assert kinds == {
        "newer": consistency.SESSION_DIFFERS,
        "flipped": consistency.STATE_DIFFERS,
        "untracked": consistency.MISSING_IN_TABLE,
        "broken": consistency.INVALID_RETAINED,
        "vanished": consistency.MISSING_ON_BROKER,
    }
    assert (report.checked, report.agree, report.ignored_deleted) == (7, 2, 1)
    assert not report.ok
    partial = consistency.compare(
        {}, {"vanished": consistency.TableState("lost", 5)}, (), snapshot_complete=False
    )
    assert partial.mismatches == () and not partial.ok


def test_decode_retained_keeps_presence_only() -> None:
    messages = [
        RetainedMessage(device_topic("a-1", TopicKind.PRESENCE), encode(PresenceLost(session=2))),
        RetainedMessage(device_topic("a-1", TopicKind.STATUS), b"{}"),
        RetainedMessage(device_topic("b-1", TopicKind.PRESENCE), b"nope"),
        RetainedMessage(bridge_presence_topic(), b"{}"),
    ]
    decoded = consistency.decode_retained(messages, PREFIX)
    assert set(decoded) == {"a-1", "b-1"}
    assert isinstance(decoded["b-1"], InvalidPayload)


def test_device_skew_pairs_the_right_times() -> None:
    status_last = skew.SkewRow("a", "online", T0 + 4_000, T0, T0 - MIN)
    birth_last = skew.SkewRow("b", "online", T0 - 2_000, T0 - MIN, T0)
    will_last = skew.SkewRow("c", "lost", T0, T0 - MIN, T0)
    never = skew.SkewRow("d", "unknown", None, None, T0)
    assert skew.device_skew(status_last) == 4_000
    assert skew.device_skew(birth_last) == -2_000
    assert skew.device_skew(will_last) is None
    assert skew.device_skew(never) is None
    report = skew.skew_report([status_last, birth_last, will_last, never], threshold_ms=3_000)
    assert (report.samples, report.median_ms, report.max_abs_ms) == (2, 1_000, 4_000)
    assert report.beyond == [("a", 4_000)]


def test_judge_bridge_presence() -> None:
    def judge(*models: BridgePresence, database: str | None = "db-a") -> doctor.Check:
        payloads = {model.instance: encode(model) for model in models}
        return doctor.judge_bridge_presence(payloads, T0, prefix=PREFIX, database_id=database)

    def online(instance: str, role: str = "leader", database: str = "db-a") -> BridgePresence:
        return BridgePresence(
            state=PresenceState.ONLINE,
            instance=instance,
            ts=T0 - MIN,
            version="0.1",
            database=database,
            role=role,
        )

    assert judge().level is doctor.Level.FAIL
    lost = judge(BridgePresence(state=PresenceState.LOST, instance="b-1", database="db-a"))
    assert lost.level is doctor.Level.FAIL and "Last Will" in lost.summary
    offline = judge(BridgePresence(state=PresenceState.OFFLINE, instance="b-1", ts=T0))
    assert offline.level is doctor.Level.FAIL and "stopped cleanly" in offline.summary
    ok = judge(online("b-1"))
    assert ok.level is doctor.Level.OK and "instance b-1 (0.1), leader" in ok.summary
    # A standby beside the leader is named; a standby alone means nobody writes.
    pair = judge(online("b-1"), online("b-2", "standby"))
    assert pair.level is doctor.Level.OK and "b-2" in pair.details[0]
    alone = judge(online("b-2", "standby"))
    assert alone.level is doctor.Level.FAIL and "none writes" in alone.summary
    # Per database: a live bridge of another database does not count for this one, and
    # this one's own live bridge is judged although another database's died.
    other = judge(online("x-1", database="db-b"))
    assert other.level is doctor.Level.FAIL and "other databases" in other.summary
    mixed = judge(
        online("b-1"),
        BridgePresence(state=PresenceState.LOST, instance="x-1", database="db-b"),
    )
    assert mixed.level is doctor.Level.OK and "x-1 (lost)" in mixed.details[0]
    invalid = doctor.judge_bridge_presence({"b-9": b"{}"}, T0, prefix=PREFIX)
    assert invalid.level is doctor.Level.FAIL and "mosquitto_pub -r -n" in (invalid.hint or "")


def test_judge_skew_and_consistency() -> None:
    quiet = doctor.judge_skew(skew.skew_report([], 30_000))
    assert quiet.level is doctor.Level.OK
    ahead = doctor.judge_skew(
        skew.skew_report([skew.SkewRow("a", "online", T0 + 90_000, T0, 0)], 30_000)
    )
    assert ahead.level is doctor.Level.WARN and ahead.details == ["a: +1m 30s"]
    gone = consistency.compare({}, {"v": consistency.TableState("online", 5)})
    assert doctor.judge_consistency(gone).level is doctor.Level.WARN
    bad = consistency.compare(
        {"x": PresenceLost(session=1)}, {"x": consistency.TableState("online", 1)}
    )
    check = doctor.judge_consistency(bad)
    assert check.level is doctor.Level.FAIL and "restart the bridge" in (check.hint or "")
    report = doctor.DoctorReport([quiet, check])
    assert report.exit_code == 1
    assert doctor.DoctorReport([quiet], unreachable=True).exit_code == 3
    assert doctor.DoctorReport([quiet]).exit_code == 0


# --- top -----------------------------------------------------------------------------------


def test_percentile() -> None:
    assert top.percentile([], 0.5) is None
    assert top.percentile([5, 1, 3], 0.5) == 3
    assert top.percentile(list(range(1, 101)), 0.95) == 95
    assert top.percentile([7], 0.99) == 7


def test_render_frame_shows_every_section() -> None:
    snap = top.TopSnapshot(
        now_ms=T0,
        by_state={"online": 40, "offline": 2, "lost": 3, "unknown": 1},
        connected=39,
        disconnected=7,
        recent=[top.RecentTransition(T0 - 5_000, "hall-2", "online", "lost", None, "applied")],
        events={"applied": 12, "stale": 2},
        flapping=[("flappy-7", 9, T0 - MIN)],
        commands_active={"queued": 4},
        commands_finished={"succeeded": 10, "failed": 5},
        commands_created=16,
        lag=top.Lag(samples=14, p50_ms=12, p95_ms=250, max_ms=1_200),
    )
    text = _text(top.render_frame(snap))
    assert "46 devices" in text
    for expected in (
        "online",
        "40",
        "hall-2",
        "online -> lost",
        "5s ago",
        "flappy-7",
        "3.0/min",  # 15 finished over 5 minutes
        "12ms",
        "250ms",
        "1s",
        "stale",
    ):
        assert expected in text, expected
    empty = _text(top.render_frame(top.TopSnapshot(now_ms=T0)))
    assert "no transitions yet" in empty and "0 devices" in empty
