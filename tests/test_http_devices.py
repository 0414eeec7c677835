"""The legacy device endpoints over real HTTP, inside a real bridge (SQLite, MariaDB)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from bridge.db.models import Remote
from bridge.http.tokens import token_hash
from bridge.testing.mosquitto import MosquittoProcess
from schemas import TopicKind, device_topic
from tests.support.bridge_harness import Db, eventually
from tests.support.devices import FakeKiosk
from tests.test_http_harness import HTTP_DBS, Served, served

REMOTES = Remote.__table__


@pytest.fixture(params=HTTP_DBS)
def http_db_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue(f"{request.param}_url"))


@pytest.fixture
def db(http_db_url: str) -> Iterator[Db]:
    handle = Db(http_db_url)
    yield handle
    handle.close()


@pytest.fixture
async def api(mosquitto: MosquittoProcess, http_db_url: str) -> AsyncIterator[Served]:
    limits = {"rate_burst": 20, "token_refresh_s": 0.5}
    async with served(mosquitto.url, http_db_url, http=limits) as face:
        yield face


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert body["success"] is False, body
    assert set(body["error"]) >= {"code", "message"}
    return dict(body["error"])


async def set_remote(db: Db, device_id: str, **values: Any) -> None:
    def write() -> None:
        with db.engine.begin() as conn:
            conn.execute(
                update(REMOTES).where(REMOTES.c.device_identifier == device_id).values(**values)
            )

    await asyncio.to_thread(write)


async def test_register_new_then_existing_device(api: Served, db: Db) -> None:
    first = await api.register("a1b2c3d4e5f60718", app_version="3.0.0", ip_address="10.1.2.3")
    assert set(first) == {"remote_id", "token", "remote_control_enabled", "websocket_url", "mqtt"}
    token = first["token"]
    assert len(token) == 64 and all(ch in "0123456789abcdef" for ch in token)
    assert first["remote_control_enabled"] is False
    mqtt = first["mqtt"]
    # The test broker is open: the token is the MQTT password.
    assert (mqtt["client_id"], mqtt["username"], mqtt["password"], mqtt["credentials"]) == (
        "a1b2c3d4e5f60718",
        "a1b2c3d4e5f60718",
        token,
        "token",
    )
    assert mqtt["topics"]["cmd"] == device_topic("a1b2c3d4e5f60718", TopicKind.CMD)
    assert mqtt["url"] == api.bridge.settings.broker_address.url
    row = await db.remote("a1b2c3d4e5f60718")
    assert (row.id, row.token, row.app_version, row.ip_address) == (
        first["remote_id"],
        token,
        "3.0.0",
        "10.1.2.3",
    )
    assert row.status == "Disconnected"  # registering is not presence; a heartbeat is

    again = await api.register("a1b2c3d4e5f60718", app_version="3.1.0")
    assert again["remote_id"] == first["remote_id"]
    assert again["token"] != token
    assert await db.remote_count("a1b2c3d4e5f60718") == 1
    row = await db.remote("a1b2c3d4e5f60718")
    assert (row.token, row.app_version, row.ip_address) == (again["token"], "3.1.0", "10.1.2.3")
    # The replaced token is refused with a reason the kiosk can act on.
    stale = await api.heartbeat(token)
    assert stale.status_code == 401
    assert error_of(stale)["code"] == "token_revoked"
    assert (await api.heartbeat(again["token"])).status_code == 200


async def test_register_soft_deleted_device_is_gone(api: Served, db: Db) -> None:
    first = await api.register("gone0001")
    await set_remote(db, "gone0001", deleted_at=datetime(2026, 1, 2, 3, 4, 5))
    response = await api.client.post("/api/devices/register", json={"device_id": "gone0001"})
    assert response.status_code == 410
    assert error_of(response)["code"] == "device_deleted"
    assert await db.remote_count("gone0001") == 1
    assert (await db.remote("gone0001")).token == first["token"]
    heartbeat = await api.heartbeat(first["token"])
    assert heartbeat.status_code == 410
    assert error_of(heartbeat)["code"] == "device_deleted"


async def test_concurrent_registrations_make_one_row(api: Served, db: Db) -> None:
    answers = await asyncio.gather(
        *(
            api.client.post("/api/devices/register", json={"device_id": "race0001"})
            for _ in range(5)
        )
    )
    assert [a.status_code for a in answers] == [200] * 5
    assert len({a.json()["remote_id"] for a in answers}) == 1
    assert await db.remote_count("race0001") == 1


async def test_register_rejects_a_bad_device_id(api: Served) -> None:
    response = await api.client.post("/api/devices/register", json={"device_id": "bad/id+#"})
    assert response.status_code == 422
    error = error_of(response)
    assert error["code"] == "invalid_request" and "device_id" in error["message"]


async def test_heartbeat_brings_device_online_with_telemetry(api: Served, db: Db) -> None:
    token = (await api.register("beat0001"))["token"]
    response = await api.heartbeat(
        token, battery_level=77, wifi_strength=-50, screen_on=True, cpu_temp=41.5
    )
    assert response.status_code == 200, response.text
    assert response.json() == {
        "success": True,
        "data": {
            "remote_control_enabled": False,
            "should_reconnect": False,
            "pending_commands": [],
        },
    }
    row = await eventually(
        lambda: db.remote("beat0001"),
        lambda r: r.status == "Connected" and r.battery_level == 77,
        what="beat0001 Connected with telemetry",
    )
    assert (row.wifi_strength, bool(row.screen_on), row.cpu_temp) == (-50, True, 41.5)
    conn = await db.connectivity("beat0001")
    assert conn.state == "online" and conn.session > 0
    # A value out of the contract's range is left out, the rest still counts.
    response = await api.heartbeat(token, battery_level=150, wifi_strength=-60)
    assert response.json()["data"]["ignored_fields"] == ["battery_level"]
    row = await eventually(
        lambda: db.remote("beat0001"), lambda r: r.wifi_strength == -60, what="second heartbeat"
    )
    assert row.battery_level == 77
    # Same session: a steady device does not start a new one at every heartbeat.
    assert (await db.connectivity("beat0001")).session == conn.session
    detail = await api.client.get("/api/v2/devices/beat0001", headers=api.cms)
    assert detail.json()["data"]["transport"] == "http"


async def test_heartbeat_with_missing_invalid_or_revoked_token(api: Served, db: Db) -> None:
    token = (await api.register("auth0001"))["token"]
    missing = await api.client.post("/api/devices/heartbeat", json={})
    assert missing.status_code == 401 and error_of(missing)["code"] == "missing_token"
    invalid = await api.heartbeat("f" * 64)
    assert invalid.status_code == 401 and error_of(invalid)["code"] == "invalid_token"
    # The CMS revokes by clearing the column, or by writing another token into it.
    await set_remote(db, "auth0001", token=None)
    revoked = await api.heartbeat(token)
    assert revoked.status_code == 401 and error_of(revoked)["code"] == "token_revoked"
    assert revoked.headers["www-authenticate"] == "Bearer"
    await set_remote(db, "auth0001", token="0" * 64)
    replaced = await api.heartbeat(token)
    assert replaced.status_code == 401 and error_of(replaced)["code"] == "token_revoked"
    assert await db.connectivity("auth0001") is None  # no refused heartbeat made it online


async def test_token_issued_by_the_cms_is_accepted(api: Served, db: Db) -> None:
    await api.register("cms00001")
    await set_remote(db, "cms00001", token="L" * 64)  # what Laravel's Str::random(64) left
    # remotes.token is read into an in-memory map (never scanned per request): a token the
    # CMS writes while the bridge runs is accepted from the map's next pass, which the
    # first miss brings forward.
    tokens = api.devices.tokens
    await eventually(lambda: tokens.lookup(token_hash("L" * 64)), lambda d: d == "cms00001")
    response = await api.heartbeat("L" * 64, battery_level=12)
    assert response.status_code == 200, response.text
    await eventually(lambda: db.status_of("cms00001"), lambda s: s == "Connected")


async def test_heartbeat_too_fast_is_rate_limited(
    mosquitto: MosquittoProcess, http_db_url: str
) -> None:
    limits = {"rate_burst": 3, "rate_per_s": 0.01}
    async with served(mosquitto.url, http_db_url, http=limits) as api:
        token = (await api.register("fast0001"))["token"]
        codes = [(await api.heartbeat(token)).status_code for _ in range(5)]
        assert codes == [200, 200, 200, 429, 429]
        refused = await api.heartbeat(token)
        assert error_of(refused)["code"] == "rate_limited"
        assert int(refused.headers["retry-after"]) >= 1
        # Per token: another kiosk is not held back by a noisy one.
        other = (await api.register("fast0002"))["token"]
        assert (await api.heartbeat(other)).status_code == 200


async def test_oversized_bodies_are_refused(api: Served) -> None:
    token = (await api.register("big00001"))["token"]
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    huge = b'{"current_url": "' + b"x" * 40_000 + b'"}'
    declared = await api.client.post("/api/devices/heartbeat", content=huge, headers=headers)
    assert declared.status_code == 413
    assert error_of(declared)["code"] == "payload_too_large"

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(huge), 4096):
            yield huge[start : start + 4096]

    streamed = await api.client.post("/api/devices/heartbeat", content=chunks(), headers=headers)
    assert streamed.status_code == 413
    assert error_of(streamed)["code"] == "payload_too_large"
    # The server is still fine afterwards.
    assert (await api.heartbeat(token)).status_code == 200


async def test_unknown_path_and_method_are_structured(api: Served) -> None:
    missing = await api.client.get("/api/devices/nothing-here")
    assert missing.status_code == 404 and error_of(missing)["code"] == "not_found"
    wrong = await api.client.get("/api/devices/heartbeat")
    assert wrong.status_code == 405 and error_of(wrong)["code"] == "method_not_allowed"
    garbage = await api.client.post(
        "/api/devices/register", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    # Not JSON at all: 400 (issue 14), where a field that fails validation is a 422.
    assert garbage.status_code == 400 and error_of(garbage)["code"] == "malformed_body"


async def test_http_only_device_times_out_to_lost_and_comes_back(
    mosquitto: MosquittoProcess, http_db_url: str, db: Db
) -> None:
    fast = {"heartbeat_interval_s": 0.4, "sweep_s": 0.1}  # lost after 1 s
    async with served(mosquitto.url, http_db_url, http=fast) as api:
        token = (await api.register("quiet001"))["token"]
        assert (await api.heartbeat(token)).status_code == 200
        await eventually(lambda: db.status_of("quiet001"), lambda s: s == "Connected")
        first = (await db.connectivity("quiet001")).session
        conn = await eventually(
            lambda: db.connectivity("quiet001"),
            lambda c: c.state == "lost",
            what="quiet001 lost after the HTTP timeout",
        )
        assert (conn.session, conn.reason) == (first, "http_timeout")
        assert await db.status_of("quiet001") == "Disconnected"
        assert (await api.heartbeat(token)).status_code == 200
        conn = await eventually(
            lambda: db.connectivity("quiet001"), lambda c: c.state == "online", what="back"
        )
        assert conn.session > first
        history = [(h.state, h.verdict, h.session) for h in await db.history("quiet001")]
        assert history[:3] == [
            ("online", "applied", first),
            ("lost", "applied", first),
            ("online", "applied", conn.session),
        ]


async def test_mqtt_device_heartbeats_only_refresh_telemetry(
    mosquitto: MosquittoProcess, http_db_url: str, db: Db
) -> None:
    fast = {"heartbeat_interval_s": 0.2, "sweep_s": 0.1}
    kiosk = FakeKiosk(mosquitto.url, "both0001", session=100)
    try:
        async with served(mosquitto.url, http_db_url, http=fast) as api:
            await kiosk.come_online()
            await eventually(lambda: db.status_of("both0001"), lambda s: s == "Connected")
            token = (await api.register("both0001"))["token"]
            assert (await api.heartbeat(token, battery_level=55)).status_code == 200
            await eventually(
                lambda: db.remote("both0001"), lambda r: r.battery_level == 55, what="telemetry"
            )
            await kiosk.crash()
            await eventually(lambda: db.status_of("both0001"), lambda s: s == "Disconnected")
            # An HTTP heartbeat of a device on MQTT cannot bring it back online, and the
            # HTTP timeout never applies to it.
            assert (await api.heartbeat(token, battery_level=44)).status_code == 200
            await eventually(
                lambda: db.remote("both0001"), lambda r: r.battery_level == 44, what="telemetry"
            )
            assert await api.face.sweeper.sweep() == []
            conn = await db.connectivity("both0001")
            assert (conn.state, conn.session) == ("lost", 100)
            detail = await api.client.get("/api/v2/devices/both0001", headers=api.cms)
            assert detail.json()["data"]["transport"] == "mqtt"
    finally:
        kiosk.close()


async def test_reconciliation_leaves_http_devices_alone(api: Served, db: Db) -> None:
    token = (await api.register("recon001"))["token"]
    await api.heartbeat(token)
    await eventually(lambda: db.status_of("recon001"), lambda s: s == "Connected")
    other = (await api.register("recon002"))["token"]
    assert other  # registered, never heartbeated: reconciliation may set it unknown
    # What the MQTT link does after every (re)connect: nothing seen on MQTT.
    changed = await asyncio.wait_for(api.bridge.writer.request_reconcile(set()), 20)
    assert "recon002" in changed and "recon001" not in changed
    assert (await db.connectivity("recon001")).state == "online"
    assert await db.status_of("recon001") == "Connected"
