"""What a holder of the CMS API key can and cannot do (mosquitto/README.md, the threat
table): it queues the commands the CMS queues, and reads states; it never gets a
token, never mints a credential (``rotate_token``), and is no kiosk bearer. A real
bridge and HTTP face over real HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from bridge.passwords import token_sha256
from bridge.testing.mosquitto import MosquittoProcess
from tests.support.bridge_harness import Db, eventually
from tests.test_http_harness import API_KEY, Served, served


@pytest.fixture
async def api(mosquitto: MosquittoProcess, sqlite_url: str) -> AsyncIterator[Served]:
    async with served(mosquitto.url, sqlite_url) as face:
        yield face


def _keys(value: Any) -> set[str]:
    """Every key anywhere in a JSON document."""
    if isinstance(value, dict):
        return set(value) | {k for v in value.values() for k in _keys(v)}
    if isinstance(value, list):
        return {k for v in value for k in _keys(v)}
    return set()


async def test_the_cms_key_queues_commands_but_never_sees_or_mints_a_token(
    api: Served, sqlite_url: str
) -> None:
    token = (await api.register("cmskey01"))["token"]
    assert (await api.heartbeat(token)).status_code == 200
    db = Db(sqlite_url)
    try:
        await eventually(lambda: db.status_of("cmskey01"), lambda s: s == "Connected")
    finally:
        db.close()
    # What the CMS does: queue a refresh.
    queued = await api.client.post(
        "/api/v2/commands",
        json={"type": "refresh", "device_ids": ["cmskey01"], "args": {}},
        headers=api.cms,
    )
    assert queued.status_code == 202, queued.text
    # A rotate_token would hand the device a token the CMS chose (or learnt): refused.
    rotate = await api.client.post(
        "/api/v2/commands",
        json={"type": "rotate_token", "device_ids": ["cmskey01"], "args": {"token": "0" * 64}},
        headers=api.cms,
    )
    assert rotate.status_code == 422, rotate.text
    assert "rotate" in rotate.json()["error"]["message"]
    # No read the key allows carries the token (nor its hash).
    reads = [
        await api.client.get("/api/v2/devices", headers=api.cms),
        await api.client.get("/api/v2/devices/cmskey01", headers=api.cms),
        await api.client.get(
            f"/api/v2/commands/{queued.json()['data']['commands'][0]['id']}", headers=api.cms
        ),
    ]
    for response in reads:
        assert response.status_code == 200, response.text
        assert "token" not in _keys(response.json())
        assert token not in response.text and token_sha256(token) not in response.text
    # The key is not a kiosk's bearer token.
    as_kiosk = await api.heartbeat(API_KEY)
    assert as_kiosk.status_code == 401
