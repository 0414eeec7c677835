"""``kiosk-bridge demo``: the whole system on one machine with nothing installed.

The embedded broker, the bridge on SQLite and a simulated fleet run in this one process;
a few faults are injected on a schedule, one kiosk gets a tracked refresh, and a live
table shows the fleet as the CMS's dashboard would see it.

The broker is secure, as ``kiosk-bridge run`` starts it: the fixed credentials live in a
file in a temporary directory removed when the demo ends (the demo's broker is gone then,
and a password file must not be left in the working tree), every simulated kiosk but the
last is enrolled with its own token (as ``device enroll`` does), and the last provisions
itself with the claim credential, as a new kiosk in the field does.

Each fault is announced as it is injected, with the kiosks it hit and what the bridge
will make of it.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.text import Text

from bridge.clock import now_ms
from bridge.db.security_store import SecurityStore
from bridge.embedded_broker import EmbeddedBroker, pick_free_listen
from bridge.kiosk.credentials import claim_until_accepted
from bridge.kiosk.simulator import Fleet, fleet_ids
from bridge.ops.db import open_read_engine
from bridge.ops.fleet import load_fleet, summarize
from bridge.ops.render import fleet_summary_line, fleet_table
from bridge.outbox.api import enqueue
from bridge.passwords import hash_password, new_token
from bridge.security.bootstrap import BootstrapSecrets
from bridge.security.embedded import BrokerSecurity, load_or_create_credentials
from bridge.service.app import Bridge
from bridge.service.runner import embedded_bridge_settings
from bridge.settings import Settings
from schemas import ProvisionAccepted

log = logging.getLogger(__name__)

CLAIM_TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True)
class DemoFault:
    """One fault of the demo: when (seconds after the fleet is online), which of the
    simulator's faults, on what fraction of the fleet, and what the operator will see."""

    at_s: float
    kind: str
    fraction: float
    explanation: str


#: Fractions are of the 20-kiosk default fleet (at least one kiosk each).
DEMO_FAULTS = (
    DemoFault(
        6,
        "kill",
        0.05,
        "loses power: no goodbye, so the broker publishes its Last Will and the bridge "
        "marks it lost; it stays down",
    ),
    DemoFault(
        9,
        "reboot",
        0.05,
        "announces a reboot: offline (reason reboot) at once, then back online with a new "
        "session a few seconds later",
    ),
    DemoFault(
        12,
        "blackhole",
        0.05,
        "goes silent with its socket open (a frozen network): only the broker's keepalive "
        "notices, after 1.5 x the keepalive, and its Will makes it lost",
    ),
    DemoFault(
        15,
        "drop",
        0.1,
        "drop off the network without a goodbye: lost, then online again when they "
        "reconnect by themselves",
    ),
)


@dataclass
class DemoOptions:
    devices: int = 20
    duration_s: float = 30.0
    db_path: Path = field(default_factory=lambda: Path("kiosk-bridge-demo.db"))
    keepalive_s: int = 5
    refresh_after_s: float = 3.0


def _enroll(store: SecurityStore, device_ids: list[str]) -> dict[str, str]:
    """Blocking: a fresh token per device, recorded as ``device enroll`` would."""
    tokens = {device_id: new_token() for device_id in device_ids}
    for device_id, token in tokens.items():
        store.enroll(device_id, hash_password(token), "demo")
    return tokens


async def _claim(
    broker: EmbeddedBroker, credentials: BootstrapSecrets, device_id: str
) -> ProvisionAccepted:
    stop = threading.Event()
    claiming = asyncio.to_thread(
        claim_until_accepted,
        broker.url,
        credentials.users.claim,
        credentials.claim_password,
        device_id,
        stop=stop,
        app_version="sim-1.0",
    )
    try:
        return await asyncio.wait_for(claiming, CLAIM_TIMEOUT_S)
    finally:
        # A claim still retrying in its thread gives up at its next wait.
        stop.set()


async def run_demo(options: DemoOptions, console: Console) -> None:
    with tempfile.TemporaryDirectory(prefix="kiosk-bridge-demo-") as secrets:
        await _run_demo(options, console, Path(secrets))


async def _run_demo(options: DemoOptions, console: Console, secrets: Path) -> None:
    port = pick_free_listen("127.0.0.1", 1883)
    settings = Settings(
        listen=f"127.0.0.1:{port}",
        db=f"sqlite:///{options.db_path}",
        instance="demo",
        keepalive_s=options.keepalive_s,
        embedded_credentials=str(secrets / "broker-credentials.json"),
    )
    path = settings.embedded_credentials_path
    credentials, _ = await asyncio.to_thread(
        load_or_create_credentials, path, settings.security.users
    )
    security = BrokerSecurity(db_url=settings.db, credentials=credentials, prefix=settings.prefix)
    console.print(
        f"[bold]kiosk-bridge demo[/]: embedded broker mqtt://127.0.0.1:{port} (authentication "
        f"and ACL on; passwords in {path}, removed at the end), database {options.db_path}, "
        f"{options.devices} simulated kiosks, {options.duration_s:.0f}s"
    )
    ids = fleet_ids(options.devices, "kiosk-")
    claimant = ids[-1]
    async with EmbeddedBroker(host="127.0.0.1", port=port, security=security) as broker:
        bridge_settings = embedded_bridge_settings(settings, broker, credentials)
        async with Bridge(bridge_settings, protocol="3.1.1") as bridge:
            # Subscribed to provisioning requests before the claim below asks.
            await asyncio.wait_for(bridge.wait_synced(), 30)
            with console.status(f"enrolling {len(ids) - 1} kiosks, {claimant} claims..."):
                tokens = await asyncio.to_thread(_enroll, bridge.security.store, ids[:-1])
                accepted = await _claim(broker, credentials, claimant)
            tokens[claimant] = accepted.token
            console.print(
                f"{len(ids) - 1} kiosks enrolled with their own token; {claimant} provisioned "
                f"itself with the claim credential (remote {accepted.remote_id})"
            )
            await _run_fleet(options, console, bridge, broker, tokens)
            # The fleet has stopped (running kiosks announced offline, the others' Wills
            # went out): the table must say so before the bridge stops, or it would keep
            # showing kiosks that no longer exist as Connected.
            with console.status("waiting for the bridge to record the stopped fleet..."):
                states = await _fleet_settled(bridge, SETTLE_S)
            shown = ", ".join(f"{count} {state}" for state, count in sorted(states.items()))
            console.print(
                f"The demo's kiosks are stopped; the table shows them {shown}. The bridge now "
                "stops and records that the states are no longer live: `kiosk-bridge "
                "devices` will warn that they are frozen and exit 4."
            )
    console.print(
        f"\nThe database is [bold]{options.db_path.resolve()}[/]. Look around with:\n"
        f"  kiosk-bridge devices --db sqlite:///{options.db_path}\n"
        f"  kiosk-bridge device show kiosk-00000 --db sqlite:///{options.db_path}\n"
        f"  kiosk-bridge uptime --db sqlite:///{options.db_path}"
    )


#: How long the demo waits for the bridge to write the stopped fleet.
SETTLE_S = 15.0


async def _fleet_settled(bridge: Bridge, within_s: float) -> dict[str, int]:
    """Until no kiosk is online in the table (or ``within_s``); the states by count."""
    reader = open_read_engine(bridge.settings.db)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    try:
        while True:
            rows = await asyncio.to_thread(load_fleet, reader)
            states: dict[str, int] = {}
            for row in rows:
                states[row.state] = states.get(row.state, 0) + 1
            if not states.get("online") or loop.time() >= deadline:
                return states
            await asyncio.sleep(0.2)
    finally:
        reader.dispose()


async def _run_fleet(
    options: DemoOptions,
    console: Console,
    bridge: Bridge,
    broker: EmbeddedBroker,
    tokens: dict[str, str],
) -> None:
    settings = bridge.settings
    async with Fleet(
        options.devices,
        broker.url,
        id_prefix="kiosk-",
        keepalive=options.keepalive_s,
        status_interval_s=10,
        protocol="3.1.1",
        passwords=tokens,
        seed=7,
    ) as fleet:
        with console.status("connecting the fleet..."):
            async with asyncio.timeout(60):
                await fleet.connect_all()
        reader = open_read_engine(settings.db)
        refresh_ids: list[str] = []

        def frame() -> Group:
            rows = load_fleet(reader)
            table = fleet_table(rows, now_ms(), compact=True)
            lines: list[RenderableType] = [table, fleet_summary_line(summarize(rows), len(rows))]
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
            faults = asyncio.create_task(
                _inject_faults(fleet, live.console.print, options.keepalive_s), name="demo-faults"
            )
            try:
                await fleet.run(options.duration_s)
            finally:
                for task in (refresher, painter, faults):
                    task.cancel()
                await asyncio.gather(refresher, painter, faults, return_exceptions=True)
            live.update(await asyncio.to_thread(frame))
        reader.dispose()


async def _inject_faults(fleet: Fleet, say: Callable[[Text], None], keepalive_s: int) -> None:
    """Inject :data:`DEMO_FAULTS` on time and say what each did, above the live table."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    inject: dict[str, Callable[[int], list[str]]] = {
        "kill": fleet.kill,
        "reboot": fleet.reboot,
        "blackhole": fleet.blackhole,
        "drop": fleet.drop,
    }
    for fault in DEMO_FAULTS:
        # The schedule of the demo, not synchronisation.
        await asyncio.sleep(max(0.0, started + fault.at_s - loop.time()))
        hit = inject[fault.kind](max(1, fleet.count_for(fault.fraction)))
        if not hit:
            continue
        line = Text(f"+{fault.at_s:.0f}s fault ", style="bold yellow")
        line.append(f"{fault.kind}: {', '.join(hit)} ", style="bold")
        line.append(fault.explanation.replace("the keepalive", f"the {keepalive_s}s keepalive"))
        say(line)
