"""``kiosk-bridge kiosk`` (one reference agent) and ``kiosk-bridge simulate`` (a fleet)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from bridge.broker_url import parse_broker_url
from bridge.kiosk.agent import KioskAgent
from bridge.kiosk.fleet_view import connect_progress, live_summary, summary_line
from bridge.kiosk.options import MqttProtocol
from bridge.kiosk.scenario import FaultStep, Scenario, ScenarioError, load_scenario
from bridge.kiosk.simulator import Fleet, FleetStats
from bridge.logs import configure_logging
from schemas import InvalidDeviceId, OfflineReason, validate_device_id

ProtocolOption = Annotated[
    MqttProtocol, typer.Option(help="MQTT version: auto (5, falling back to 3.1.1), 5 or 3.1.1")
]


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _check_broker(url: str) -> None:
    try:
        parse_broker_url(url)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--broker") from None


def kiosk(
    device_id: Annotated[
        str, typer.Option(help="Device id (also the MQTT client id and username)")
    ],
    broker: Annotated[str, typer.Option(help="mqtt[s]://[user:pass@]host:port")],
    password: Annotated[
        str | None, typer.Option(help="MQTT password (or put it in the URL)", envvar="KB_PASSWORD")
    ] = None,
    keepalive: Annotated[int, typer.Option(min=1, max=65535, help="Seconds")] = 10,
    status_interval: Annotated[
        float, typer.Option(min=1.0, help="Seconds between status reports (retained config wins)")
    ] = 30.0,
    state_dir: Annotated[
        Path | None, typer.Option(help="Default: ~/.kiosk-bridge/<device-id>/")
    ] = None,
    protocol: ProtocolOption = MqttProtocol.AUTO,
    app_version: Annotated[str | None, typer.Option(help="Reported in the birth")] = None,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING, ERROR")] = "INFO",
) -> None:
    """Run one reference kiosk agent until SIGINT/SIGTERM, then announce offline and leave."""
    try:
        validate_device_id(device_id)
    except InvalidDeviceId as exc:
        raise typer.BadParameter(str(exc), param_hint="--device-id") from None
    _check_broker(broker)
    configure_logging(log_level.upper())
    agent = KioskAgent(
        device_id,
        broker,
        password=password,
        state_dir=state_dir,
        keepalive=keepalive,
        status_interval_s=status_interval,
        protocol=protocol,
        app_version=app_version,
    )
    quit_requested = threading.Event()

    def request_quit(signum: int, _frame: object) -> None:
        quit_requested.set()

    previous = {sig: signal.signal(sig, request_quit) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        # No wait: an unreachable broker is retried with backoff, not a startup error.
        agent.start(timeout=None)
        typer.echo(f"kiosk {device_id} connecting to {parse_broker_url(broker).url}", err=True)
        while not quit_requested.wait(0.5):
            if agent.stopped.is_set():
                break
        if agent.wiped:
            typer.echo(f"kiosk {device_id} was wiped; state and credentials cleared", err=True)
    finally:
        agent.stop(OfflineReason.SHUTDOWN)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def simulate(
    broker: Annotated[str, typer.Option(help="mqtt[s]://[user:pass@]host:port")],
    devices: Annotated[
        int | None, typer.Option(min=1, max=100_000, help="Number of kiosks (or from --scenario)")
    ] = None,
    duration: Annotated[
        float | None, typer.Option(min=0.0, help="Seconds to run after all are online (default 60)")
    ] = None,
    kill: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Fraction killed (no DISCONNECT, stay down)")
    ] = 0.0,
    blackhole: Annotated[
        float,
        typer.Option(
            min=0.0, max=1.0, help="Fraction whose link freezes (broker keepalive finds out)"
        ),
    ] = 0.0,
    churn: Annotated[
        float, typer.Option(min=0.0, help="Unannounced drops per second, fleet-wide (they return)")
    ] = 0.0,
    reboot: Annotated[
        float, typer.Option(min=0.0, help="Announced reboots per second, fleet-wide")
    ] = 0.0,
    scenario: Annotated[
        Path | None, typer.Option(help="YAML/JSON fault scenario (see bridge/kiosk/scenario.py)")
    ] = None,
    id_prefix: Annotated[str, typer.Option(help="Device ids are <prefix><number>")] = "sim-",
    keepalive: Annotated[
        int | None, typer.Option(min=1, max=65535, help="Seconds (default 10)")
    ] = None,
    status_interval: Annotated[float, typer.Option(min=1.0, help="Seconds")] = 30.0,
    protocol: ProtocolOption = MqttProtocol.AUTO,
    connect_timeout: Annotated[
        float, typer.Option(min=1.0, help="Give up waiting for all to be online after this")
    ] = 300.0,
    seed: Annotated[int | None, typer.Option(help="Random seed (repeatable faults)")] = None,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING, ERROR")] = "WARNING",
) -> None:
    """Simulate a fleet of kiosks in one process, with optional fault injection."""
    _check_broker(broker)
    plan = Scenario()
    if scenario is not None:
        try:
            plan = load_scenario(scenario)
        except ScenarioError as exc:
            raise typer.BadParameter(str(exc), param_hint="--scenario") from None
    count = devices if devices is not None else plan.devices
    if count is None:
        raise _fail("give --devices, or a --scenario that sets devices")
    width = max(5, len(str(count - 1)))
    try:
        validate_device_id(f"{id_prefix}{'0' * width}")
    except InvalidDeviceId:
        raise typer.BadParameter(
            f"{id_prefix!r} + a number is not a valid device id "
            "(letters, digits, '_' or '-', at most 64 characters)",
            param_hint="--id-prefix",
        ) from None
    steps = list(plan.steps)
    if kill or blackhole:
        steps.append(FaultStep(kill=kill, blackhole=blackhole))
    plan = plan.model_copy(
        update={
            "steps": steps,
            "churn_per_s": churn or plan.churn_per_s,
            "reboot_per_s": reboot or plan.reboot_per_s,
        }
    )
    run_for = duration if duration is not None else (plan.duration_s or 60.0)
    configure_logging(log_level.upper())
    fleet = Fleet(
        count,
        broker,
        id_prefix=id_prefix,
        keepalive=keepalive or plan.keepalive or 10,
        status_interval_s=status_interval,
        protocol=protocol,
        seed=seed,
    )
    console = Console(stderr=True)
    try:
        asyncio.run(_simulate(fleet, plan, run_for, connect_timeout, console))
    except KeyboardInterrupt:
        console.print("interrupted")


async def _simulate(
    fleet: Fleet, plan: Scenario, duration_s: float, connect_timeout_s: float, console: Console
) -> None:
    main = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if main is not None:
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signal.SIGTERM, main.cancel)
    started = time.monotonic()
    last: list[FleetStats] = []
    try:
        async with fleet:
            with connect_progress(console, len(fleet.agents)) as report:
                try:
                    async with asyncio.timeout(connect_timeout_s):
                        await fleet.connect_all(progress=report)
                except TimeoutError:
                    console.print(
                        f"[yellow]only {fleet.online_count()} online after {connect_timeout_s:g}s; "
                        "the rest keep retrying[/]"
                    )
            console.print(f"fleet up in {time.monotonic() - started:.1f}s")
            t0 = time.monotonic()
            try:
                with live_summary(console) as show:

                    def tick(stats: FleetStats) -> None:
                        last[:] = [stats]
                        show(stats, time.monotonic() - t0)

                    last[:] = [await fleet.run(duration_s, plan, on_tick=tick)]
            finally:
                if last:
                    console.print(summary_line(last[0], time.monotonic() - t0))
    except asyncio.CancelledError:
        console.print("stopped")


def register(app: typer.Typer) -> None:
    """Add ``kiosk`` and ``simulate`` to ``app``."""
    app.command("kiosk")(kiosk)
    app.command("simulate")(simulate)
