"""Reference kiosk agents a test starts on a broker, closed at its end (fast backoff,
no fsync), shared by the command tests (the ``agents`` fixture in tests/conftest.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from bridge.kiosk import KioskAgent


class Agents:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.made: list[KioskAgent] = []

    async def start(self, broker_url: str, device_id: str, **kwargs: Any) -> KioskAgent:
        agent = KioskAgent(
            device_id,
            broker_url,
            state_dir=self.tmp_path / device_id,
            fsync=False,
            backoff_base_s=0.1,
            backoff_cap_s=0.5,
            **kwargs,
        )
        self.made.append(agent)
        await asyncio.to_thread(agent.start, 20)
        return agent
