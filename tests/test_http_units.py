"""Pure pieces of the HTTP face: rate limiting, uptime, telemetry, idempotent ids."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from sqlalchemy import insert

from bridge.db import token_index
from bridge.db.engine import create_schema, make_engine
from bridge.db.models import Remote
from bridge.db.token_index import CmsTokenIndex
from bridge.http.clients import client_address, limit_key
from bridge.http.limits import RateLimiter, retry_after_header
from bridge.http.refresh import refresh_id
from bridge.http.routes_devices import broker_takes_device_tokens
from bridge.http.settings import HttpSettings, parse_listen, parse_networks
from bridge.http.telemetry import METRICS, telemetry
from bridge.http.tokens import new_token, token_hash
from bridge.presence.uptime import Change, uptime
from bridge.settings import Settings
from schemas import Status


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_allows_a_burst_then_the_sustained_rate() -> None:
    clock = FakeClock()
    limiter = RateLimiter(3, 0.5, clock=clock)
    assert [limiter.check("a") for _ in range(3)] == [None, None, None]
    wait = limiter.check("a")
    assert wait == pytest.approx(2.0)
    assert retry_after_header(wait) == "2"
    assert limiter.check("b") is None  # buckets are per key
    clock.now += 2.0
    assert limiter.check("a") is None
    assert limiter.check("a") is not None
    clock.now += 3600
    # Refill is capped at the burst.
    assert [limiter.check("a") is None for _ in range(4)] == [True, True, True, False]


def test_token_bucket_map_is_bounded() -> None:
    limiter = RateLimiter(1, 1.0, clock=FakeClock(), max_keys=3)
    for key in "abcde":
        limiter.check(key)
    assert len(limiter) == 3
    # "a" was evicted, so it starts with a full bucket again.
    assert limiter.check("a") is None


def test_retry_after_is_whole_seconds_and_at_least_one() -> None:
    assert retry_after_header(0.01) == "1"
    assert retry_after_header(2.2) == "3"


def test_uptime_counts_only_known_time() -> None:
    changes = [Change(0, "online"), Change(600, "lost"), Change(900, "online")]
    result = uptime(changes, 500, 1000)
    assert (result.window_ms, result.online_ms, result.known_ms) == (500, 200, 500)
    assert result.percent == 40.0
    unknown_start = uptime([Change(700, "online")], 500, 1000)
    assert (unknown_start.online_ms, unknown_start.known_ms, unknown_start.percent) == (
        300,
        300,
        100.0,
    )
    assert uptime([], 0, 1000).percent is None
    assert uptime([Change(0, "online"), Change(200, "unknown")], 0, 1000).percent == 100.0


def test_telemetry_drops_values_out_of_range_and_keeps_the_rest() -> None:
    values, ignored = telemetry(
        {"battery_level": 101, "wifi_strength": -40, "cpu_temp": 500.0, "network_type": "wifi"}
    )
    assert values == {"wifi_strength": -40, "network_type": "wifi"}
    assert ignored == ["battery_level", "cpu_temp"]
    assert telemetry(None) == ({}, [])
    assert telemetry({"current_url": "a\x00b"}) == ({}, ["current_url"])


def test_lax_legacy_types_are_accepted() -> None:
    assert telemetry({"battery_level": "85", "screen_on": "true"}) == (
        {"battery_level": 85, "screen_on": True},
        [],
    )


def test_wrong_types_are_ignored_not_coerced() -> None:
    body = {"cpu_temp": False, "battery_level": True, "wifi_strength": "strong", "x": [1]}
    values, ignored = telemetry({**body, "network_type": 4, "screen_on": False})
    assert values == {"screen_on": False}
    assert ignored == ["battery_level", "wifi_strength", "cpu_temp", "network_type"]
    assert telemetry({"battery_level": None}) == ({}, [])


def test_telemetry_ranges_are_the_mqtt_status_ranges() -> None:
    # No copy of the ranges: the HTTP metrics are exactly the Status fields, judged by it.
    assert set(METRICS) <= set(Status.model_fields)
    for value, ok in ((0, True), (100, True), (-1, False), (101, False)):
        assert ("battery_level" in telemetry({"battery_level": value})[0]) is ok


def test_refresh_ids_are_stable_per_device_and_key() -> None:
    first = refresh_id("kiosk-1", "job-7")
    assert first == refresh_id("kiosk-1", "job-7")
    assert uuid.UUID(first).version == 5
    assert first != refresh_id("kiosk-2", "job-7")
    assert first != refresh_id("kiosk-1", "job-8")


def test_tokens_are_64_hex_and_hashed() -> None:
    token = new_token()
    assert len(token) == 64 and int(token, 16) >= 0
    assert new_token() != token
    assert len(token_hash(token)) == 64 and token_hash(token) != token


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KB_HTTP__API_KEYS", " one, two ,,")
    monkeypatch.setenv("KB_HTTP__HEARTBEAT_INTERVAL_S", "10")
    settings = Settings().http
    assert settings.api_key_list == ("one", "two")
    assert settings.timeout_ms == 25_000
    assert settings.sweep_interval_s == pytest.approx(2.5)


def test_listen_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_listen("0.0.0.0:8080") == ("0.0.0.0", 8080)
    assert parse_listen("[::1]:9000") == ("::1", 9000)
    assert HttpSettings(listen="127.0.0.1:81").listen_address == ("127.0.0.1", 81)
    monkeypatch.delenv("KB_HTTP__LISTEN", raising=False)
    assert Settings().http.listen_address is None
    for bad in ("8080", "host:", "host:http", "host:70000"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            parse_listen(bad)


@pytest.mark.parametrize(
    ("values", "takes_tokens"),
    [
        ({"broker": "mqtt://127.0.0.1:1883"}, True),
        ({"broker": "mqtt://_bridge:secret@127.0.0.1:1883"}, False),
        ({}, False),  # the embedded broker is secure by default
        ({"embedded_open": True}, True),
    ],
)
def test_the_http_token_is_an_mqtt_password_only_on_an_open_broker(
    values: dict[str, object], takes_tokens: bool
) -> None:
    assert broker_takes_device_tokens(Settings(**values)) is takes_tokens  # type: ignore[arg-type]


def test_failed_auth_bucket_peeks_and_charges_into_debt() -> None:
    clock = FakeClock()
    limiter = RateLimiter(3, 1.0, clock=clock)
    assert limiter.peek("a") is None and len(limiter) == 0  # peeking creates nothing
    for _ in range(5):  # five let in together, all charged: two into debt
        limiter.charge("a")
    assert limiter.peek("a") == pytest.approx(3.0)
    clock.now += 2.9
    assert limiter.peek("a") is not None
    clock.now += 0.1
    assert limiter.peek("a") is None
    for _ in range(100):
        limiter.charge("a")
    assert limiter.peek("a") == pytest.approx(4.0)  # debt is capped at minus the burst


def _scope(peer: str | None, *forwarded: str) -> dict[str, object]:
    headers = [(b"x-forwarded-for", value.encode()) for value in forwarded]
    return {"type": "http", "client": (peer, 5000) if peer else None, "headers": headers}


def test_client_address_trusts_forwarded_for_only_from_proxies() -> None:
    proxies = parse_networks("10.0.0.0/8, ::1")
    assert client_address(_scope("192.0.2.1", "203.0.113.9"), proxies) == "192.0.2.1"
    assert client_address(_scope("127.0.0.1", "203.0.113.9"), proxies) == "127.0.0.1"
    assert client_address(_scope("10.1.1.1", "203.0.113.9"), proxies) == "203.0.113.9"
    # The nearest untrusted hop wins; what the client wrote further left is never read.
    assert client_address(_scope("10.1.1.1", "1.2.3.4, 203.0.113.9"), proxies) == "203.0.113.9"
    assert client_address(_scope("10.1.1.1", "1.2.3.4", "203.0.113.9, 10.2.2.2"), proxies) == (
        "203.0.113.9"
    )
    assert client_address(_scope("::1", "[2001:db8::7]:443"), proxies) == "2001:db8::7"
    assert client_address(_scope("10.1.1.1", "garbage, 203.0.113.9"), proxies) == "203.0.113.9"
    assert client_address(_scope("10.1.1.1", "203.0.113.9, garbage"), proxies) == "10.1.1.1"
    assert client_address(_scope("::ffff:192.0.2.1"), proxies) == "192.0.2.1"
    assert client_address(_scope(None), proxies) == "unknown"
    assert client_address(_scope("10.1.1.1", "203.0.113.9"), ()) == "10.1.1.1"


def test_abuse_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KB_HTTP__TRUSTED_PROXIES", "127.0.0.1, 10.0.0.0/8")
    monkeypatch.setenv("KB_HTTP__REGISTRATION_SECRET", "s3cret")
    monkeypatch.setenv("KB_HTTP__BODY_TIMEOUT_S", "4")
    settings = Settings().http
    assert [str(n) for n in settings.trusted_proxy_networks] == ["127.0.0.1/32", "10.0.0.0/8"]
    assert settings.registration_secret is not None
    assert settings.registration_secret.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings)
    assert (settings.auth_fail_burst, settings.auth_fail_per_s) == (60, 1.0)
    assert settings.body_timeout_s == 4.0
    monkeypatch.setenv("KB_HTTP__REGISTRATION_SECRET", "")
    assert Settings().http.registration_secret is None
    monkeypatch.setenv("KB_HTTP__TRUSTED_PROXIES", "10.0.0.0/8, proxy.local")
    with pytest.raises(ValueError, match=r"proxy\.local"):
        Settings()


def test_token_map_files_digests_and_keeps_puts_made_during_a_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'tokens.db'}")
    create_schema(engine)
    with engine.begin() as conn:
        conn.execute(
            insert(Remote.__table__),
            [
                {"device_identifier": "cms-plain", "token": "L" * 64, "status": "Connected"},
                {"device_identifier": "cms-none", "token": None, "status": "Connected"},
            ],
        )
    index = CmsTokenIndex(engine, "plaintext")
    misses: list[int] = []
    index.on_miss = lambda: misses.append(1)
    assert index.load() == 1
    assert index.lookup(token_hash("L" * 64)) == "cms-plain"
    assert index.lookup(token_hash("M" * 64)) is None and misses == [1]
    assert index.lookup("not a hash") is None
    index.put("bridge-made", "b" * 64)
    assert index.lookup(token_hash("b" * 64)) == "bridge-made"
    # The map mirrors the table: a pass drops what is not in it ...
    index.load()
    assert index.lookup(token_hash("b" * 64)) is None
    # ... except what put() recorded while the pass ran (committed after its read).
    monkeypatch.setattr(token_index.time, "sleep", lambda _s: index.put("mid-pass", "c" * 64))
    index.load()
    monkeypatch.undo()
    assert index.lookup(token_hash("c" * 64)) == "mid-pass"
    # ... and in sha256 mode the column holds the hash: the hash presented finds nothing.
    hashed = CmsTokenIndex(engine, "sha256")
    with engine.begin() as conn:
        conn.execute(
            insert(Remote.__table__),
            [{"device_identifier": "cms-hash", "token": token_hash("T" * 64), "status": "x"}],
        )
    hashed.load()
    assert hashed.lookup(token_hash("T" * 64)) == "cms-hash"
    assert hashed.lookup(token_hash(token_hash("T" * 64))) is None
    engine.dispose()


def test_ipv6_clients_are_limited_by_their_64() -> None:
    assert limit_key("2001:db8:1:2:aaaa::1") == limit_key("2001:db8:1:2:ffff::9")
    assert limit_key("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert limit_key("2001:db8:1:3::1") != limit_key("2001:db8:1:2::1")
    assert limit_key("192.0.2.1") == "192.0.2.1"
    assert limit_key("unknown") == "unknown"
