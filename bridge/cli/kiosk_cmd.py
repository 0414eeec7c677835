"""``kiosk-bridge kiosk`` (one reference agent) and ``kiosk-bridge simulate`` (a fleet)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from bridge.cli.common import fail
from bridge.cli.enrollment import ENROLL_HELP
from bridge.exit_codes import ExitCode
from bridge.kiosk.mqtt_version import MqttProtocol

if TYPE_CHECKING:
    # The rest is imported where used: building the CLI for any command imports this
    # module, and the agent and the simulator pull in paho and the kiosk's stack.
    import threading

    from rich.console import Console

    from bridge.kiosk.scenario import Scenario
    from bridge.kiosk.simulator import Fleet

#: A fleet of which not one kiosk connected in this long is talking to nobody.
FIRST_CONNECT_S = 15.0

ProtocolOption = Annotated[
    MqttProtocol, typer.Option(help="MQTT version: auto (5, falling back to 3.1.1), 5 or 3.1.1")
]


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _check_broker(url: str) -> None:
    from bridge.broker_url import parse_broker_url

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
        str | None,
        typer.Option(
            help="First MQTT password (or put it in the URL); a token stored in the state "
            "dir by a claim or a rotation wins",
            envvar="KB_PASSWORD",
        ),
    ] = None,
    claim_password: Annotated[
        str | None,
        typer.Option(
            help="Shared claim credential: with no token yet, or when the broker refuses "
            "the one it has, provision one from the bridge",
            envvar="KB_CLAIM_PASSWORD",
        ),
    ] = None,
    claim_username: Annotated[
        str, typer.Option(help="Username of the claim credential", envvar="KB_CLAIM_USERNAME")
    ] = "_claim",
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
    enroll: Annotated[bool, typer.Option("--enroll", help=ENROLL_HELP)] = False,
    db: Annotated[
        str | None, typer.Option(help="--enroll: the bridge's database (env KB_DB)")
    ] = None,
) -> None:
    """Run one reference kiosk agent until SIGINT/SIGTERM, then announce offline and leave.

    Its credential, in this order: the token stored in the state dir (credential.json,
    written by a claim or a rotate_token command), --password or the URL's password, or
    a claim with --claim-password (the token is then stored). With --claim-password, a
    credential the broker refuses (a rotation the kiosk missed) is replaced by a new
    claim. rotate_token commands are handled: the new token is stored, acknowledged,
    and used from the next connection. With --enroll it first gets a credential of its
    own on the secure embedded broker of a local 'kiosk-bridge run' (kept in the state
    dir).
    """
    import signal
    import threading

    from bridge.kiosk.credentials import TokenFile
    from bridge.kiosk.state import default_state_dir
    from bridge.logs import configure_logging
    from schemas import InvalidDeviceId, validate_device_id

    try:
        validate_device_id(device_id)
    except InvalidDeviceId as exc:
        raise typer.BadParameter(str(exc), param_hint="--device-id") from None
    _check_broker(broker)
    configure_logging(log_level.upper())
    directory = state_dir if state_dir is not None else default_state_dir(device_id)
    if enroll:
        [token] = _enroll(db, [device_id]).values()
        tokens = TokenFile(directory)
        tokens.save(token)
        typer.echo(f"kiosk {device_id}: enrolled; token stored in {tokens.path}", err=True)
    quit_requested = threading.Event()

    def request_quit(signum: int, _frame: object) -> None:
        quit_requested.set()

    previous = {sig: signal.signal(sig, request_quit) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        _run_agent(
            KioskRun(
                device_id=device_id,
                broker=broker,
                password=password,
                claim_username=claim_username,
                claim_password=claim_password,
                state_dir=directory,
                keepalive=keepalive,
                status_interval_s=status_interval,
                protocol=protocol,
                app_version=app_version,
            ),
            quit_requested,
        )
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@dataclass(frozen=True, slots=True)
class KioskRun:
    device_id: str
    broker: str
    password: str | None
    claim_username: str
    claim_password: str | None
    state_dir: Path
    keepalive: int
    status_interval_s: float
    protocol: MqttProtocol
    app_version: str | None


def _ensure_token(run: KioskRun, quit_requested: threading.Event) -> None:
    """Claim a token when the kiosk has no credential at all and may claim one."""
    from bridge.broker_url import parse_broker_url
    from bridge.kiosk.credentials import TokenFile

    tokens = TokenFile(run.state_dir)
    has_password = run.password is not None or parse_broker_url(run.broker).password is not None
    if tokens.load() is not None or has_password:
        return
    if run.claim_password is None:
        typer.echo(
            f"kiosk {run.device_id}: no token in {tokens.path}, no --password and no "
            "--claim-password: connecting without a password (only an open broker allows it)",
            err=True,
        )
        return
    typer.echo(f"kiosk {run.device_id}: no token yet; claiming one", err=True)
    _claim(run, quit_requested)


def _claim(run: KioskRun, quit_requested: threading.Event) -> None:
    from bridge.broker_url import parse_broker_url
    from bridge.kiosk.credentials import ClaimError, ClaimRefused, TokenFile, claim_until_accepted

    assert run.claim_password is not None
    tokens = TokenFile(run.state_dir)
    # The token it holds (a rotation it missed made it stale) proves it is the device.
    proof = tokens.load() or run.password or parse_broker_url(run.broker).password
    try:
        answer = claim_until_accepted(
            run.broker,
            run.claim_username,
            run.claim_password,
            run.device_id,
            stop=quit_requested,
            app_version=run.app_version,
            proof_token=proof,
        )
    except ClaimRefused as exc:
        raise _fail(f"kiosk {run.device_id}: {exc}", 1) from None
    except ClaimError as exc:
        if quit_requested.is_set():
            raise typer.Exit(0) from None
        raise _fail(f"kiosk {run.device_id}: {exc}", 1) from None
    # Stored before first use: a crash right after must not cost the device its token.
    tokens.save(answer.token)
    typer.echo(
        f"kiosk {run.device_id}: provisioned as remote {answer.remote_id}; token stored in "
        f"{tokens.path}",
        err=True,
    )


def _run_agent(run: KioskRun, quit_requested: threading.Event) -> None:
    from bridge.backoff import Backoff

    _ensure_token(run, quit_requested)
    # Claims that keep being followed by refusals must not become a tight loop.
    pause = Backoff(base=1.0, cap=60.0)
    while _run_until_refused(run, quit_requested):
        # The broker refused the credential (a rotation the kiosk missed, a reinstall
        # over an old state dir): with the claim credential, get a new one. A revoked
        # or deleted device's claim is refused, and that ends the agent with the reason.
        typer.echo(
            f"kiosk {run.device_id}: the broker refused its credential; claiming a new one",
            err=True,
        )
        if quit_requested.wait(pause.next_delay()):
            return
        _claim(run, quit_requested)


def _run_until_refused(run: KioskRun, quit_requested: threading.Event) -> bool:
    """Run the agent until a quit, a wipe, or (when it may claim) a refused credential;
    True for the last."""
    from bridge.broker_url import parse_broker_url
    from bridge.kiosk.agent import KioskAgent
    from schemas import OfflineReason

    agent = KioskAgent(
        run.device_id,
        run.broker,
        password=run.password,
        state_dir=run.state_dir,
        keepalive=run.keepalive,
        status_interval_s=run.status_interval_s,
        protocol=run.protocol,
        app_version=run.app_version,
    )
    device_id, broker = run.device_id, run.broker
    refused = False
    try:
        # No wait: an unreachable broker is retried with backoff, not a startup error.
        agent.start(timeout=None)
        typer.echo(f"kiosk {device_id} connecting to {parse_broker_url(broker).url}", err=True)
        while not quit_requested.wait(0.5):
            if agent.stopped.is_set():
                break
            if run.claim_password is not None and agent.counters["credentials_refused"]:
                refused = True
                break
        if agent.wiped:
            typer.echo(f"kiosk {device_id} was wiped; state and credentials cleared", err=True)
    finally:
        agent.stop(OfflineReason.SHUTDOWN)
    return refused


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
    enroll: Annotated[bool, typer.Option("--enroll", help=ENROLL_HELP)] = False,
    db: Annotated[
        str | None, typer.Option(help="--enroll: the bridge's database (env KB_DB)")
    ] = None,
) -> None:
    """Simulate a fleet of kiosks in one process, with optional fault injection.

    Exit 3 when no kiosk connects within the first 15 s (or --connect-timeout): the
    broker is down or refuses them. The secure embedded broker of 'kiosk-bridge run'
    needs credentials: --enroll gives each kiosk one.
    """
    import asyncio

    from rich.console import Console

    from bridge.broker_url import parse_broker_url
    from bridge.kiosk.scenario import FaultStep, Scenario, ScenarioError, load_scenario
    from bridge.kiosk.simulator import Fleet, fleet_ids
    from bridge.logs import configure_logging
    from schemas import InvalidDeviceId, validate_device_id

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
    passwords = _enroll(db, fleet_ids(count, id_prefix)) if enroll else None
    configure_logging(log_level.upper())
    fleet = Fleet(
        count,
        broker,
        id_prefix=id_prefix,
        keepalive=keepalive or plan.keepalive or 10,
        status_interval_s=status_interval,
        protocol=protocol,
        seed=seed,
        passwords=passwords,
    )
    console = Console(stderr=True)
    try:
        asyncio.run(
            _simulate(fleet, plan, run_for, connect_timeout, console, parse_broker_url(broker).url)
        )
    except KeyboardInterrupt:
        console.print("interrupted")


async def _simulate(
    fleet: Fleet,
    plan: Scenario,
    duration_s: float,
    connect_timeout_s: float,
    console: Console,
    broker_url: str,
) -> None:
    import asyncio
    import signal
    import time

    from bridge.kiosk.fleet_view import connect_progress, live_summary, summary_line
    from bridge.kiosk.simulator import FleetStats

    main = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if main is not None:
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signal.SIGTERM, main.cancel)
    started = time.monotonic()
    last: list[FleetStats] = []
    try:
        async with fleet:
            first_by = time.monotonic() + min(connect_timeout_s, FIRST_CONNECT_S)

            with connect_progress(console, len(fleet.agents)) as report:

                def progress(online: int, total: int) -> None:
                    report(online, total)
                    if online == 0 and time.monotonic() > first_by:
                        raise NothingConnected

                try:
                    async with asyncio.timeout(connect_timeout_s):
                        await fleet.connect_all(progress=progress)
                except TimeoutError:
                    if not fleet.online_count():
                        raise NothingConnected from None
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
    except NothingConnected:
        waited = min(connect_timeout_s, FIRST_CONNECT_S)
        raise _fail(
            f"no kiosk connected to {broker_url} within {waited:g}s: the broker is down or "
            "refuses them (the secure embedded broker of `kiosk-bridge run` needs a "
            "credential per kiosk: add --enroll)",
            ExitCode.UNREACHABLE,
        ) from None


class NothingConnected(Exception):
    """Not one kiosk of the fleet connected in time."""


def _enroll(db: str | None, device_ids: list[str]) -> dict[str, str]:
    import getpass

    from bridge.cli.enrollment import enroll_on_embedded
    from bridge.cli.preflight import PreflightError
    from bridge.cli.run_cmd import settings_or_exit

    settings = settings_or_exit(db=db)
    try:
        return enroll_on_embedded(settings, device_ids, requested_by=getpass.getuser())
    except PreflightError as exc:
        fail(str(exc), exc.code, hint=exc.hint)


def register(app: typer.Typer) -> None:
    """Add ``kiosk`` and ``simulate`` to ``app``."""
    app.command("kiosk")(kiosk)
    app.command("simulate")(simulate)
