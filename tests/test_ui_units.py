"""The fleet page's pure parts: uptime segments, fan-out grouping, the stale judgement,
the login cookie, the same-origin rule and the settings names (issue 21)."""

from __future__ import annotations

from datetime import datetime
from types import SimpleNamespace

import pytest
from starlette.requests import Request

from bridge.http.ui.auth import make_session, matching_key, same_origin_post, session_valid
from bridge.http.ui.queries import group_fanouts, judge_freshness, segments
from bridge.ops.uptime import Transition
from bridge.settings import RENAMED_VARIABLES, Settings

H = 3_600_000


@pytest.mark.parametrize(
    ("transitions", "expected"),
    [
        ([], [[0, "u"]]),
        ([Transition(-5, "online")], [[0, "o"]]),
        (
            [Transition(-5, "online"), Transition(2 * H, "lost"), Transition(3 * H, "online")],
            [[0, "o"], [2 * H, "l"], [3 * H, "o"]],
        ),
        # Repeats merge; reasons do not split a segment; after the window is ignored.
        (
            [
                Transition(H, "offline", "reboot"),
                Transition(2 * H, "offline", "user"),
                Transition(25 * H, "lost"),
            ],
            [[0, "u"], [H, "f"]],
        ),
        # Two changes at one instant: the later one wins.
        ([Transition(H, "online"), Transition(H, "lost")], [[0, "u"], [H, "l"]]),
        # Reconciliation's unknown is unknown.
        ([Transition(-1, "online"), Transition(H, "unknown")], [[0, "o"], [H, "u"]]),
    ],
)
def test_segments(transitions: list[Transition], expected: list[list[object]]) -> None:
    assert segments(transitions, 0, 24 * H) == expected


def test_fanouts_group_one_request_and_count_progress() -> None:
    at = datetime(2026, 12, 7, 8, 0, 0, 123000)
    later = datetime(2026, 12, 7, 9, 0, 0)

    def row(created: datetime, type_: str, state: str, n: int, by: str = "ops") -> object:
        return SimpleNamespace(created_at=created, type=type_, requested_by=by, state=state, n=n)

    [fan] = group_fanouts(
        [
            row(at, "refresh", "succeeded", 7),
            row(at, "refresh", "sent", 2),
            row(at, "refresh", "failed", 1),
            row(later, "wipe", "queued", 1),  # one device: not a fan-out
            row(at, "refresh", "queued", 1, by="cms"),  # another requester
        ]
    )
    assert (fan.type, fan.requested_by, fan.total, fan.open) == ("refresh", "ops", 10, 2)
    assert fan.to_json()["by_state"] == {"failed": 1, "sent": 2, "succeeded": 7}


@pytest.mark.parametrize(
    ("newest", "online", "now", "stale"),
    [
        (None, 0, 10**6, None),  # nothing written ever
        (0, 0, 10**9, None),  # nobody online: silence is normal
        (1_000_000, 3, 1_000_000 + 300_000, False),
        (1_000_000, 3, 1_000_000 + 300_001, True),
    ],
)
def test_stale_judgement(newest: int | None, online: int, now: int, stale: bool | None) -> None:
    assert judge_freshness(newest, online, now).stale is stale


def test_session_cookie() -> None:
    keys = ("api-key", "ui-key")
    now = 1_800_000_000
    cookie = make_session("ui-key", now)
    assert "ui-key" not in cookie
    assert session_valid(cookie, keys, 3600, now + 3600)
    assert not session_valid(cookie, keys, 3600, now + 3601)  # aged out
    assert not session_valid(cookie, ("api-key",), 3600, now)  # its key was removed
    assert not session_valid(make_session("ui-key", now + 3600), keys, 3600, now)  # future
    issued, mac = cookie.split(".")
    assert not session_valid(f"{int(issued) + 1}.{mac}", keys, 3600, now)  # time changed
    for junk in ("", ".", "x.y", f"{issued}.", "1" * 20 + "." + mac, cookie + "0"):
        assert not session_valid(junk, keys, 3600, now), junk
    assert matching_key("ui-key", keys) and not matching_key("ui-ke", keys)
    assert not matching_key("\udcff", keys)


def _request(**headers: str) -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in {"Host": "kb:8080", **headers}.items()]
    return Request({"type": "http", "method": "POST", "headers": raw, "path": "/ui/login"})


@pytest.mark.parametrize(
    ("headers", "allowed"),
    [
        ({}, True),  # not a browser: nothing another site could forge
        ({"Origin": "http://kb:8080"}, True),
        ({"Origin": "https://kb:8080"}, True),  # behind a TLS-terminating proxy
        ({"Origin": "http://kb:8081"}, False),
        ({"Origin": "http://evil.example"}, False),
        ({"Origin": "null"}, False),
        ({"Sec-Fetch-Site": "same-origin", "Origin": "null"}, True),
        ({"Sec-Fetch-Site": "none"}, True),  # typed into the address bar
        ({"Sec-Fetch-Site": "same-site", "Origin": "http://kb:8080"}, False),
        ({"Sec-Fetch-Site": "cross-site"}, False),
    ],
)
def test_same_origin_post(headers: dict[str, str], allowed: bool) -> None:
    assert same_origin_post(_request(**headers)) is allowed


def test_ui_keys_setting_names(monkeypatch: pytest.MonkeyPatch) -> None:
    for old, new, _ in RENAMED_VARIABLES:
        monkeypatch.delenv(old, raising=False)
        monkeypatch.delenv(new, raising=False)
    monkeypatch.setenv("KB_HTTP__UI_KEYS", "a, b,")
    assert Settings().http.ui_key_list == ("a", "b")
    monkeypatch.delenv("KB_HTTP__UI_KEYS")
    monkeypatch.setenv("KB_UI_KEYS", "c")
    with pytest.warns(DeprecationWarning, match="KB_UI_KEYS is deprecated: use KB_HTTP__UI_KEYS"):
        assert Settings().http.ui_key_list == ("c",)
