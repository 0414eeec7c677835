"""Commands through the HTTP face: the CMS's legacy refresh URL, the CMS API, HTTP acks
from kiosks not yet on MQTT, and the live event stream (SQLite, MariaDB)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bridge.kiosk.agent import KioskAgent
from bridge.testing.mosquitto import MosquittoProcess
from tests.support.bridge_harness import Db, eventually
from tests.test_http_harness import HTTP_DBS, Served, served

TERMINAL = {"succeeded", "failed", "rejected", "expired", "cancelled", "superseded"}


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
    async with served(mosquitto.url, http_db_url, http={"rate_burst": 20}) as face:
        yield face


@pytest.fixture
async def agents(tmp_path: Path) -> AsyncIterator[list[KioskAgent]]:
    made: list[KioskAgent] = []
    yield made
    for agent in made:
        await asyncio.to_thread(agent.close)


async def command(api: Served, command_id: str) -> dict[str, Any]:
    response = await api.client.get(f"/api/v2/commands/{command_id}", headers=api.cms)
    assert response.status_code == 200, response.text
    return dict(response.json()["data"])


async def finished(api: Served, command_id: str) -> dict[str, Any]:
    return await eventually(
        lambda: command(api, command_id),
        lambda c: c["state"] in TERMINAL,
        what=f"command {command_id} finished",
    )


async def ack(api: Served, token: str, command_id: str, state: str) -> httpx.Response:
    return await api.client.post(
        f"/api/devices/commands/{command_id}/ack",
        json={"id": command_id, "state": state, "ts": 1_764_332_500_000},
        headers={"Authorization": f"Bearer {token}"},
    )


async def test_legacy_refresh_url_is_tracked_to_succeeded(
    api: Served, db: Db, agents: list[KioskAgent], tmp_path: Path
) -> None:
    token = (await api.register("agent001"))["token"]
    agent = KioskAgent(
        "agent001",
        api.bridge.settings.broker,
        state_dir=tmp_path / "agent001",
        fsync=False,
        backoff_base_s=0.1,
        backoff_cap_s=0.5,
    )
    agents.append(agent)
    await asyncio.to_thread(agent.start, 20)
    await eventually(lambda: db.status_of("agent001"), lambda s: s == "Connected")

    key = {"Idempotency-Key": "refresh-job-42"}
    first = await api.client.get("/send_refresh_device", params={"token": token}, headers=key)
    assert first.status_code == 202, first.text
    data = first.json()["data"]
    assert (data["device_id"], data["replayed"]) == ("agent001", False)
    # The job's retry with the same key names the same command and queues nothing new.
    again = await api.client.get("/send_refresh_device", params={"token": token}, headers=key)
    assert again.status_code == 202
    assert again.json()["data"]["command_id"] == data["command_id"]
    assert again.json()["data"]["replayed"] is True

    done = await finished(api, data["command_id"])
    assert done["state"] == "succeeded"
    assert done["requested_by"] == "cms:send_refresh_device"
    assert done["delivered_at"] and done["acked_at"] and done["finished_at"]
    assert agent.executed[uuid.UUID(data["command_id"])] == 1
    assert sum(agent.executed.values()) == 1

    unknown = await api.client.get("/send_refresh_device", params={"token": "x" * 64})
    assert unknown.status_code == 401
    assert unknown.json()["error"]["code"] == "invalid_token"


async def test_http_only_kiosk_gets_commands_in_heartbeats_and_acks_over_http(
    api: Served, db: Db
) -> None:
    token = (await api.register("legacy01"))["token"]
    other = (await api.register("legacy02"))["token"]
    assert (await api.heartbeat(token)).status_code == 200
    await eventually(lambda: db.status_of("legacy01"), lambda s: s == "Connected")

    created = await api.client.post(
        "/api/v2/commands",
        json={
            "type": "reconnect",
            "device_ids": ["legacy01"],
            "args": {"delay_s": 7, "reason": "broker move"},
        },
        headers=api.cms,
    )
    assert created.status_code == 202, created.text
    [ref] = created.json()["data"]["commands"]
    assert ref["device_id"] == "legacy01"

    beat = (await api.heartbeat(token)).json()["data"]
    assert beat["should_reconnect"] is True
    assert (beat["reconnect_delay_seconds"], beat["reconnect_reason"]) == (7, "broker move")
    [pending] = beat["pending_commands"]
    assert (pending["id"], pending["type"], pending["device_id"]) == (
        ref["id"],
        "reconnect",
        "legacy01",
    )
    assert pending["args"] == {"delay_s": 7, "reason": "broker move"}
    assert pending["expires_at"] > pending["issued_at"]
    assert (await command(api, ref["id"]))["state"] == "delivered"

    # Another kiosk cannot acknowledge it, nor can a mismatched body.
    assert (await ack(api, other, ref["id"], "succeeded")).status_code == 404
    mismatch = await api.client.post(
        f"/api/devices/commands/{ref['id']}/ack",
        json={"id": str(uuid.uuid4()), "state": "received", "ts": 1},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert mismatch.status_code == 422 and mismatch.json()["error"]["code"] == "id_mismatch"

    received = await ack(api, token, ref["id"], "received")
    assert received.json()["data"] == {
        "command_id": ref["id"],
        "state": "received",
        "applied": True,
    }
    assert (await api.heartbeat(token)).json()["data"]["pending_commands"] == []
    succeeded = await ack(api, token, ref["id"], "succeeded")
    assert succeeded.json()["data"]["state"] == "succeeded"
    duplicate = await ack(api, token, ref["id"], "succeeded")
    assert duplicate.json()["data"] == {
        "command_id": ref["id"],
        "state": "succeeded",
        "applied": False,
    }
    final = await command(api, ref["id"])
    assert final["state"] == "succeeded" and final["attempts"] == 1
    beat = (await api.heartbeat(token)).json()["data"]
    assert beat["should_reconnect"] is False and "reconnect_delay_seconds" not in beat


async def test_cms_api_commands_and_devices(api: Served, db: Db) -> None:
    tokens = {d: (await api.register(d))["token"] for d in ("fleet001", "fleet002", "fleet003")}
    await api.heartbeat(tokens["fleet001"])
    await eventually(lambda: db.status_of("fleet001"), lambda s: s == "Connected")

    many = await api.client.post(
        "/api/v2/commands",
        json={"type": "refresh", "device_ids": ["fleet001", "fleet002"], "args": {}},
        headers=api.cms,
    )
    assert many.status_code == 202
    refs = many.json()["data"]["commands"]
    assert [r["device_id"] for r in refs] == ["fleet001", "fleet002"]
    assert len({r["id"] for r in refs}) == 2
    for body, word in (
        ({"type": "refresh", "device_ids": ["nobody01"]}, "unknown"),
        ({"type": "selfdestruct", "device_ids": ["fleet001"]}, "unknown command type"),
        ({"type": "wipe", "device_ids": ["fleet001"], "ttl_s": 60}, "reason"),
    ):
        refused = await api.client.post("/api/v2/commands", json=body, headers=api.cms)
        assert refused.status_code == 422, refused.text
        assert refused.json()["error"]["code"] == "invalid_command"
        assert word in refused.json()["error"]["message"]
    no_key = await api.client.get("/api/v2/devices")
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "missing_api_key"
    bad_key = await api.client.get("/api/v2/devices", headers={"X-API-Key": "nope"})
    assert bad_key.status_code == 401 and bad_key.json()["error"]["code"] == "invalid_api_key"
    missing = await api.client.get(f"/api/v2/commands/{uuid.uuid4()}", headers=api.cms)
    assert missing.status_code == 404

    page = (await api.client.get("/api/v2/devices?limit=2", headers=api.cms)).json()["data"]
    assert [d["device_id"] for d in page["devices"]] == ["fleet001", "fleet002"]
    assert page["next_after"] == "fleet002"
    rest = await api.client.get("/api/v2/devices?after=fleet002", headers=api.cms)
    assert [d["device_id"] for d in rest.json()["data"]["devices"]] == ["fleet003"]
    online = await api.client.get("/api/v2/devices?state=online", headers=api.cms)
    [only] = online.json()["data"]["devices"]
    assert (only["device_id"], only["status"], only["transport"]) == (
        "fleet001",
        "Connected",
        "http",
    )

    detail = (await api.client.get("/api/v2/devices/fleet001", headers=api.cms)).json()["data"]
    assert detail["state"] == "online"
    assert [h["state"] for h in detail["history"]] == ["online"]
    assert detail["uptime"]["24h"]["percent"] == 100.0
    assert detail["uptime"]["24h"]["known_ms"] > 0
    assert [c["id"] for c in detail["recent_commands"]] == [refs[0]["id"]]
    unknown = await api.client.get("/api/v2/devices/nobody01", headers=api.cms)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_device"


async def read_event(lines: AsyncIterator[str], want: Any) -> dict[str, Any]:
    """The next event for which ``want(kind, data)`` holds (others are skipped)."""
    kind = None
    async for line in lines:
        if line.startswith("event: "):
            kind = line.removeprefix("event: ")
        elif line.startswith("data: ") and kind is not None:
            data = json.loads(line.removeprefix("data: "))
            if want(kind, data):
                return dict(data)
            kind = None
    raise AssertionError("the event stream ended")


async def test_event_stream_reports_transitions_and_command_updates(api: Served, db: Db) -> None:
    token = (await api.register("live0001"))["token"]
    async with api.client.stream("GET", "/api/v2/events", headers=api.cms) as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        lines = stream.aiter_lines()
        assert await asyncio.wait_for(anext(lines), 20) == ": connected"

        assert (await api.heartbeat(token)).status_code == 200
        online = await asyncio.wait_for(
            read_event(lines, lambda k, d: k == "presence" and d["device_id"] == "live0001"), 20
        )
        assert (online["from"], online["to"], online["status"]) == (
            "unknown",
            "online",
            "Connected",
        )

        refresh = await api.client.get("/send_refresh_device", params={"token": token})
        command_id = refresh.json()["data"]["command_id"]
        queued = await asyncio.wait_for(
            read_event(lines, lambda k, d: k == "command" and d["id"] == command_id), 20
        )
        assert queued["device_id"] == "live0001" and queued["type"] == "refresh"
        await api.heartbeat(token)  # hands the refresh out: delivered
        await ack(api, token, command_id, "succeeded")
        done = await asyncio.wait_for(
            read_event(
                lines,
                lambda k, d: k == "command" and d["id"] == command_id and d["state"] == "succeeded",
            ),
            20,
        )
        assert done["device_id"] == "live0001"


async def test_cms_api_disabled_without_keys(mosquitto: MosquittoProcess, sqlite_url: str) -> None:
    async with served(mosquitto.url, sqlite_url, http={"api_keys": ""}) as api:
        response = await api.client.get("/api/v2/devices", headers=api.cms)
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "api_disabled"
