"""``kiosk-bridge demo``: the whole system on one machine with nothing installed.

The embedded broker, the bridge on SQLite and a simulated fleet run in this one process;
a few faults are injected on a schedule, one kiosk gets a tracked refresh, and a live
table shows the fleet as the CMS's dashboard would see it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from bridge.clock import now_ms
from bridge.commands.api import enqueue
from bridge.embedded_broker import EmbeddedBroker, pick_free_listen
from bridge.kiosk.scenario import FaultStep, Scenario
from bridge.kiosk.simulator import Fleet
from bridge.ops.db import open_read_engine
from bridge.ops.fleet import load_fleet, summarize
from bridge.ops.render import fleet_summary_line, fleet_table
from bridge.service.app import Bridge
from bridge.settings import Settings

log = logging.getLogger(__name__)

#: Seconds after the fleet is online. Fractions are of the 20-kiosk default fleet.
DEMO_SCENARIO = Scenario(
    steps=[
        FaultStep(at_s=6, kill=0.05),  # one kiosk loses power: its Will says lost
        FaultStep(at_s=9, reboot=0.05),  # one announces a reboot and comes back
        FaultStep(at_s=12, blackhole=0.05),  # one goes silent: only keepalive notices
        FaultStep(at_s=15, drop=0.1),  # two drop off Wi-Fi and reconnect
    ]
)


@dataclass
class DemoOptions:
    devices: int = 20
    duration_s: float = 30.0
    db_path: Path = field(default_factory=lambda: Path("kiosk-bridge-demo.db"))
    keepalive_s: int = 5
    refresh_after_s: float = 3.0


async def run_demo(options: DemoOptions, console: Console) -> None:
    port = pick_free_listen("127.0.0.1", 1883)
    settings = Settings(
        listen=f"127.0.0.1:{port}",
        db=f"sqlite:///{options.db_path}",
        instance="demo",
        keepalive_s=options.keepalive_s,
    )
    console.print(
        f"[bold]kiosk-bridge demo[/]: embedded broker mqtt://127.0.0.1:{port}, "
        f"database {options.db_path}, {options.devices} simulated kiosks, "
        f"{options.duration_s:.0f}s"
    )
    async with (
        EmbeddedBroker(host="127.0.0.1", port=port) as broker,
        Bridge(settings, protocol="3.1.1") as bridge,
        Fleet(
            options.devices,
            broker.url,
            id_prefix="kiosk-",
            keepalive=options.keepalive_s,
            status_interval_s=10,
            protocol="3.1.1",
            seed=7,
        ) as fleet,
    ):
        with console.status("connecting the fleet..."):
            async with asyncio.timeout(60):
                await fleet.connect_all()
        reader = open_read_engine(settings.db)
        refresh_ids: list[str] = []

        def frame() -> Group:
            rows = load_fleet(reader)
            table = fleet_table(rows, now_ms(), compact=True)
            lines = [table, fleet_summary_line(summarize(rows), len(rows))]
            if refresh_ids:
                [row] = bridge.command_store.get(refresh_ids)
                lines.append(Text(f"refresh to {row.device_id}: {row.state}"))
            return Group(*lines)

        async def send_refresh() -> None:
            await asyncio.sleep(options.refresh_after_s)
            target = sorted(fleet.by_id)[0]
            refresh_ids.extend(
                await asyncio.to_thread(enqueue, bridge.engine, "refresh", [target], {})
            )
            bridge.commands.poke()

        with Live(frame(), console=console, refresh_per_second=2, transient=False) as live:
            refresher = asyncio.create_task(send_refresh(), name="demo-refresh")

            async def redraw() -> None:
                while True:
                    await asyncio.sleep(1)
                    live.update(await asyncio.to_thread(frame))

            painter = asyncio.create_task(redraw(), name="demo-redraw")
            try:
                await fleet.run(options.duration_s, DEMO_SCENARIO)
            finally:
                for task in (refresher, painter):
                    task.cancel()
                await asyncio.gather(refresher, painter, return_exceptions=True)
            live.update(await asyncio.to_thread(frame))
        reader.dispose()
    console.print(
        f"\nThe database is [bold]{options.db_path.resolve()}[/]. Look around with:\n"
        f"  kiosk-bridge devices --db sqlite:///{options.db_path}\n"
        f"  kiosk-bridge device show kiosk-00000 --db sqlite:///{options.db_path}\n"
        f"  kiosk-bridge uptime --db sqlite:///{options.db_path}"
    )
