"""Shared pieces of the HTTP face tests: a running bridge with its HTTP face on a free
port, and an httpx client speaking to it over real HTTP. (No tests in this module.)"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from bridge.db.device_store import DeviceStore
from bridge.http import HttpFace, HttpSettings
from bridge.service.app import Bridge
from tests.support.bridge_harness import running_bridge

API_KEY = "test-api-key-0123456789"
CLIENT_TIMEOUT_S = 30.0

#: SQLite and MariaDB, the two the issue asks for (PostgreSQL runs elsewhere).
HTTP_DBS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("mariadb", id="mariadb", marks=pytest.mark.mariadb),
]


@dataclass
class Served:
    bridge: Bridge
    face: HttpFace
    client: httpx.AsyncClient

    @property
    def devices(self) -> DeviceStore:
        assert self.face.ctx is not None
        return self.face.ctx.devices

    @property
    def cms(self) -> dict[str, str]:
        return {"X-API-Key": API_KEY}

    async def register(self, device_id: str, **meta: Any) -> dict[str, Any]:
        response = await self.client.post(
            "/api/devices/register", json={"device_id": device_id, **meta}
        )
        assert response.status_code == 200, response.text
        return dict(response.json())

    async def heartbeat(self, token: str, **metrics: Any) -> httpx.Response:
        return await self.client.post(
            "/api/devices/heartbeat",
            json=metrics,
            headers={"Authorization": f"Bearer {token}"},
        )


def http_settings(**overrides: Any) -> HttpSettings:
    values: dict[str, Any] = {"api_keys": API_KEY, "mqtt_url": None}
    values.update(overrides)
    return HttpSettings(**values)


@contextlib.asynccontextmanager
async def served(
    broker_url: str,
    db_url: str,
    *,
    http: dict[str, Any] | None = None,
    **bridge_overrides: Any,
) -> AsyncIterator[Served]:
    """A synced bridge, its HTTP face on 127.0.0.1:<free port>, and a client."""
    # The face's section is the bridge's, as in `run --http`: with the face serving,
    # remotes.token defaults to plaintext storage (Settings.security.token_storage).
    settings = http_settings(listen="127.0.0.1:0", **(http or {}))
    async with running_bridge(
        broker_url, db_url, http=settings, serve_http=("127.0.0.1", 0), **bridge_overrides
    ) as bridge:
        face = bridge.http_face
        assert face is not None
        async with httpx.AsyncClient(base_url=face.url, timeout=CLIENT_TIMEOUT_S) as client:
            yield Served(bridge, face, client)
