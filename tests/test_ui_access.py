"""Who gets into the fleet page, answered as an attacker would ask (issue 21).

A real bridge and its HTTP face on a free port, a real Mosquitto, SQLite; an httpx
client plays each visitor: anonymous, a kiosk holding its device token, a holder of the
read-only page key, a holder of the CMS API key, and a page on another site.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from bridge.http.ui.auth import COOKIE, make_session
from bridge.http.ui.routes import ASSETS, STATIC
from bridge.testing.mosquitto import MosquittoProcess
from tests.support.bridge_harness import Db, eventually
from tests.support.devices import FakeKiosk
from tests.test_http_harness import API_KEY, Served, served

UI_KEY = "ui-read-only-key-0123456789"
DATA_PATHS = (
    "/ui/api/fleet",
    "/ui/api/uptime",
    "/ui/api/devices/kiosk001",
    "/ui/api/commands",
    "/ui/api/status",
    "/ui/api/events",
)


@pytest.fixture
async def face(mosquitto: MosquittoProcess, sqlite_url: str) -> AsyncIterator[Served]:
    async with served(mosquitto.url, sqlite_url, http={"ui_keys": UI_KEY}) as face:
        yield face


@pytest.fixture
async def online_kiosk(
    face: Served, mosquitto: MosquittoProcess, sqlite_url: str
) -> AsyncIterator[FakeKiosk]:
    kiosk = FakeKiosk(mosquitto.url, "kiosk001", session=1_000)
    await kiosk.come_online()
    db = Db(sqlite_url)
    try:
        await eventually(lambda: db.status_of("kiosk001"), lambda s: s == "Connected")
        yield kiosk
    finally:
        db.close()
        kiosk.close()


def fresh(face: Served) -> httpx.AsyncClient:
    """A client of its own: no cookie from another test step."""
    return httpx.AsyncClient(base_url=str(face.client.base_url), timeout=30)


async def login(client: httpx.AsyncClient, key: str, **headers: str) -> httpx.Response:
    return await client.post(
        "/ui/login",
        content=httpx.QueryParams({"key": key}).__str__(),
        headers={"Content-Type": "application/x-www-form-urlencoded", **headers},
    )


async def test_anonymous_visitor_gets_the_login_form_and_no_device_data(
    face: Served, online_kiosk: FakeKiosk
) -> None:
    async with fresh(face) as client:
        page = await client.get("/")
        assert page.status_code == 200
        assert 'action="/ui/login"' in page.text
        assert "kiosk001" not in page.text
        for path in DATA_PATHS:
            answer = await client.get(path)
            assert answer.status_code == 401, path
            assert answer.json()["error"]["code"] == "not_signed_in"
            assert "kiosk001" not in answer.text
        # A made-up or tampered cookie is no better.
        forged = make_session("a guess")
        for cookie in (forged, "1." + "0" * 64, forged[:-1] + "x", ""):
            client.cookies.set(COOKIE, cookie)
            assert (await client.get("/ui/api/fleet")).status_code == 401
            assert 'action="/ui/login"' in (await client.get("/")).text


async def test_kiosk_token_holder_cannot_get_in(face: Served) -> None:
    token = (await face.register("kiosk002"))["token"]
    async with fresh(face) as client:
        refused = await login(client, token)
        assert refused.status_code == 401
        assert COOKIE not in refused.cookies
        bearer = {"Authorization": f"Bearer {token}"}
        assert (await client.get("/ui/api/fleet", headers=bearer)).status_code == 401
        # Nor a cookie made with the token as if it were a key.
        client.cookies.set(COOKIE, make_session(token))
        assert (await client.get("/ui/api/fleet")).status_code == 401


async def test_ui_key_reads_the_fleet_but_sends_no_command(
    face: Served, online_kiosk: FakeKiosk
) -> None:
    async with fresh(face) as client:
        signed = await login(client, UI_KEY)
        assert signed.status_code == 303 and signed.headers["location"] == "/"
        cookie = signed.headers["set-cookie"]
        assert re.search(r"(?i)\bhttponly\b", cookie)
        assert re.search(r"(?i)samesite=strict", cookie)
        assert UI_KEY not in cookie  # the cookie holds a MAC, never the key
        fleet = (await client.get("/ui/api/fleet")).json()
        [row] = [r for r in fleet["rows"] if r[0] == "kiosk001"]
        assert dict(zip(fleet["columns"], row, strict=True))["state"] == "online"
        assert "kiosk001" in (await client.get("/ui/api/devices/kiosk001")).text
        assert (await client.get("/ui/api/status")).json()["stale"] is False

        body = {"type": "refresh", "device_ids": ["kiosk001"]}
        # The signed-in browser: the CMS API ignores the cookie.
        assert (await client.post("/api/v2/commands", json=body)).status_code == 401
        # The page key itself as an API key: refused for commands, and for reads.
        as_api = {"X-API-Key": UI_KEY}
        sent = await client.post("/api/v2/commands", json=body, headers=as_api)
        assert sent.status_code == 401 and sent.json()["error"]["code"] == "invalid_api_key"
        assert (await client.get("/api/v2/devices", headers=as_api)).status_code == 401
        # The page has no write of its own.
        for path in DATA_PATHS[:-1]:
            assert (await client.post(path, json=body)).status_code == 405, path
        commands = (await client.get("/ui/api/commands")).json()
        assert commands["commands"] == []


async def test_cms_api_key_opens_the_page_too(face: Served, online_kiosk: FakeKiosk) -> None:
    async with fresh(face) as client:
        assert (await login(client, API_KEY)).status_code == 303
        page = await client.get("/")
        assert 'src="/ui/static/app.js"' in page.text
        assert (await client.get("/ui/api/fleet")).status_code == 200


async def test_login_from_another_site_is_refused(face: Served) -> None:
    async with fresh(face) as client:
        for headers in (
            {"Origin": "http://evil.example"},
            {"Origin": "null"},
            {"Sec-Fetch-Site": "cross-site"},
            {"Sec-Fetch-Site": "same-site", "Origin": "http://kiosks.evil.example"},
        ):
            refused = await login(client, UI_KEY, **headers)
            assert refused.status_code == 403, headers
            assert COOKIE not in refused.cookies
        # The page's own form: same origin.
        host = client.base_url.netloc.decode()
        own = await login(
            client, UI_KEY, Origin=f"http://{host}", **{"Sec-Fetch-Site": "same-origin"}
        )
        assert own.status_code == 303


async def test_expired_session_and_removed_key_end_access(
    mosquitto: MosquittoProcess, sqlite_url: str
) -> None:
    async with (
        served(mosquitto.url, sqlite_url, http={"ui_keys": UI_KEY, "ui_session_s": 60}) as face,
        fresh(face) as client,
    ):
        client.cookies.set(COOKIE, make_session(UI_KEY, int(time.time()) - 61))
        assert (await client.get("/ui/api/fleet")).status_code == 401
        client.cookies.set(COOKIE, make_session(UI_KEY))
        assert (await client.get("/ui/api/fleet")).status_code == 200
        client.cookies.set(COOKIE, make_session("an-old-key-no-longer-configured"))
        assert (await client.get("/ui/api/fleet")).status_code == 401


async def test_page_is_framed_by_nobody(face: Served) -> None:
    page = await face.client.get("/")
    csp = page.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp
    assert page.headers["x-frame-options"] == "DENY"
    for name in ASSETS:
        served_file = await face.client.get(f"/ui/static/{name}")
        assert served_file.status_code == 200, name
    assert (await face.client.get("/ui/static/login.html")).status_code == 404
    assert (await face.client.get("/ui/static/..%2Fauth.py")).status_code == 404


async def test_repeated_bad_logins_are_limited_per_address(
    mosquitto: MosquittoProcess, sqlite_url: str
) -> None:
    async with (
        served(
            mosquitto.url,
            sqlite_url,
            http={"ui_keys": UI_KEY, "auth_fail_burst": 3, "auth_fail_per_s": 0.01},
        ) as face,
        fresh(face) as client,
    ):
        codes = [(await login(client, f"guess-{i}")).status_code for i in range(5)]
        assert codes[:3] == [401, 401, 401] and codes[3:] == [429, 429]
        # Blocked means blocked: even the right key waits.
        assert (await login(client, UI_KEY)).status_code == 429


def test_page_files_load_nothing_from_outside() -> None:
    """Offline on a LAN: no URL with a host in any file of the page (an SVG's xmlns is
    a name, not a fetch), no imported stylesheet, no web font."""
    for path in Path(STATIC).iterdir():
        text = path.read_text(encoding="utf-8").replace('xmlns="http://www.w3.org/2000/svg"', "")
        assert not re.search(r"(?i)(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text), path.name
        assert "@import" not in text and "@font-face" not in text, path.name
