"""Ops commands: ``watch``, ``devices``, ``device show``, ``top``, ``uptime``, ``doctor``,
``db check``.

Human output by default, ``--json`` for scripts. Exit codes: 0 ok, 1 the thing asked about
is in a bad state or not found, 2 usage or configuration error, 3 the broker or the
database cannot be reached. The logic lives in :mod:`bridge.ops`; this module parses
options, maps failures to exit codes and prints.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Annotated, Any

import typer

from bridge.cli import staleness
from bridge.cli.common import console as _console
from bridge.cli.common import echo_json as _echo_json
from bridge.cli.common import reporting as _reporting
from bridge.cli.common import settings as _settings
from bridge.cli.run_cmd import db_app
from bridge.ops.choices import DEFAULT_SKEW_THRESHOLD_MS, SORT_KEYS, STATES

if TYPE_CHECKING:
    # Imported where used, not here: every command's --help builds this module, and
    # these pull in SQLAlchemy, aiomqtt and the settings tree.
    from rich.console import Console
    from sqlalchemy import Engine

    from bridge.broker_url import BrokerAddress
    from bridge.ops import db_check, timeline
    from bridge.settings import MqttProtocol, Settings
    from schemas import DeviceConfig, Status

log = logging.getLogger(__name__)

# --- shared options -------------------------------------------------------------------

DbOpt = Annotated[
    str | None, typer.Option("--db", help="SQLAlchemy URL of the bridge's database (env KB_DB)")
]
BrokerOpt = Annotated[
    str | None,
    typer.Option("--broker", help="mqtt(s)://user:pass@host:port (env KB_BROKER)"),
]
PrefixOpt = Annotated[
    str | None, typer.Option("--prefix", help="Topic prefix, default kiosk/v1 (env KB_PREFIX)")
]
ProtocolOpt = Annotated[
    str | None,
    typer.Option("--protocol", help="MQTT version: auto, 5 or 3.1.1 (env KB_MQTT_PROTOCOL)"),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON output")]


def _duration(value: str | None) -> int | None:
    from bridge.ops.durations import parse_duration

    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def _percent(value: str | None) -> float | None:
    from bridge.ops import uptime

    if value is None:
        return None
    try:
        return uptime.parse_percent(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def _broker_address(settings: Settings) -> BrokerAddress:
    """The broker to read: ``--broker``/``KB_BROKER``; else the one the bridge writing
    ``--db`` recorded in kb_bridges; else the embedded broker of a local ``run`` (with the
    read-only ``_ops`` credential from its credentials file). With none of these it is a
    usage error: guessing 127.0.0.1:1883 would judge whatever happens to listen there."""
    from bridge.broker_url import parse_broker_url
    from bridge.ops.errors import UsageError
    from bridge.security.embedded import broker_url, local_host, read_credentials

    if settings.broker_address is not None:
        return settings.broker_address
    try:
        listen_host, port = settings.listen_address
        host = local_host(listen_host)
        credentials = read_credentials(settings.embedded_credentials_path)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    recorded = _recorded_broker(settings)
    embedded = parse_broker_url(broker_url(host, port))
    if recorded is not None:
        instance, url = recorded
        found = parse_broker_url(url)
        if (found.host, found.port) != (embedded.host, embedded.port) or credentials is None:
            typer.echo(
                f"broker: {found.url} (recorded by bridge {instance} in the database; "
                "--broker to choose another)",
                err=True,
            )
            return found
    elif credentials is None:
        raise UsageError(
            "no broker to read: no --broker (or KB_BROKER) given, no bridge has recorded "
            f"one in {settings.db}'s kb_bridges, and no local embedded broker's credentials "
            f"file at {settings.embedded_credentials_path}",
            hint="pass --broker mqtt://HOST:PORT (and --db for the bridge's database)",
        )
    if credentials is None:
        return embedded
    return parse_broker_url(broker_url(host, port, credentials.users.ops, credentials.ops_password))


def _recorded_broker(settings: Settings) -> tuple[str, str] | None:
    """(instance, broker URL) of the newest bridge heartbeat in ``settings.db``, if any."""
    from sqlalchemy.exc import SQLAlchemyError

    from bridge.db.bridges_store import BridgesStore
    from bridge.ops.db import open_read_engine
    from bridge.ops.errors import OpsError

    try:
        engine = open_read_engine(settings.db)
    except OpsError:
        return None
    try:
        rows = BridgesStore(engine).rows()
    except SQLAlchemyError:
        return None
    finally:
        engine.dispose()
    if not rows:
        return None
    newest = max(rows, key=lambda row: (row.role != "stopped", row.heartbeat_ms))
    return newest.instance, newest.broker


def _protocol(settings: Settings) -> MqttProtocol:
    """The embedded broker (no broker configured) speaks only 3.1.1, and amqtt never
    answers an MQTT 5 CONNECT that carries a password: "auto" would wait out its timeout."""
    if settings.broker is None and settings.mqtt_protocol == "auto":
        return "3.1.1"
    return settings.mqtt_protocol


def _engine(settings: Settings) -> Engine:
    from bridge.ops.db import open_ready_engine

    return open_ready_engine(settings.db)


# --- watch -------------------------------------------------------------------------------


def _topic_filter(value: str | None) -> str | None:
    """An MQTT topic filter, checked before connecting: a bad one is a usage error."""
    import aiomqtt

    if value is None:
        return None
    try:
        aiomqtt.Wildcard(value)
    except ValueError:
        raise typer.BadParameter(
            f"{value!r} is not a valid MQTT topic filter: '#' may only be the whole last "
            "level, '+' only a whole level (e.g. 'kiosk/v1/+/presence', 'kiosk/v1/#')",
            param_hint="FILTER",
        ) from None
    return value


def watch_cmd(
    filter_: Annotated[
        str | None,
        typer.Argument(
            metavar="FILTER",
            help="Topic filter (default PREFIX/#); any filter, topics outside the contract "
            "are shown raw",
            callback=_topic_filter,
        ),
    ] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Show payloads as received")] = False,
    pretty: Annotated[
        bool, typer.Option("--pretty", help="Each payload as indented JSON under its line")
    ] = False,
    as_json: JsonOpt = False,
    retained_only: Annotated[
        bool, typer.Option("--retained-only", help="Print the retained snapshot and exit")
    ] = False,
    count: Annotated[
        int | None, typer.Option("--count", "-C", min=1, help="Exit after N messages")
    ] = None,
    protocol: ProtocolOpt = None,
    broker: BrokerOpt = None,
    prefix: PrefixOpt = None,
) -> None:
    """Live tail of any topic filter: the contract's topics decoded and validated, other
    topics raw.

    Invalid contract messages are highlighted with the validation error. R marks
    retained ones. --pretty prints each JSON payload indented; with --json, one indented
    object per message.
    """
    import asyncio
    import json
    import sys

    from rich.json import JSON

    from bridge.cli.common import json_default
    from bridge.clock import now_ms
    from bridge.ops import watch
    from bridge.ops.mqtt import connect
    from schemas import all_filter

    settings = _settings(broker=broker, prefix=prefix, mqtt_protocol=protocol)
    console = _console()
    with _reporting():
        address = _broker_address(settings)
        topic_filter = filter_ or all_filter(settings.prefix)

        def show(event: watch.WatchEvent) -> None:
            if as_json:
                data = watch.to_json(event, raw=raw)
                if pretty:
                    typer.echo(json.dumps(data, indent=2, default=json_default))
                else:
                    _echo_json(data)
                return
            console.print(watch.render_line(event, raw=raw), soft_wrap=True)
            if pretty:
                payload = watch.payload_data(event)
                if payload is not None:
                    console.print(JSON.from_data(payload, indent=2))

        async def main() -> None:
            async with connect(address, protocol=_protocol(settings), name="watch") as client:
                if retained_only:
                    events, complete = await watch.retained_snapshot(
                        client, topic_filter, prefix=settings.prefix, clock=now_ms
                    )
                    for event in events:
                        show(event)
                    if not complete:
                        typer.echo(
                            "warning: the broker did not confirm the end of the retained "
                            "snapshot; it may be incomplete",
                            err=True,
                        )
                    return
                if sys.stderr.isatty():
                    # A broker may grant a filter its ACL then hides (Mosquitto does): say
                    # what is watched, so silence is not mistaken for a hang.
                    typer.echo(
                        f"watching {topic_filter!r} on {address.url} (Ctrl-C to stop); "
                        "nothing shown means nothing published that this user may read",
                        err=True,
                    )
                await watch.tail(
                    client, topic_filter, show, prefix=settings.prefix, count=count, clock=now_ms
                )

        try:
            asyncio.run(main())
        except KeyboardInterrupt:
            return


# --- devices ------------------------------------------------------------------------------


def devices_cmd(
    state: Annotated[
        str | None,
        typer.Option("--state", help="Only devices in this state: online, offline, lost, unknown"),
    ] = None,
    flapping: Annotated[bool, typer.Option("--flapping", help="Only flapping devices")] = False,
    stale: Annotated[
        str | None,
        typer.Option("--stale", help="Only devices not seen for this long (e.g. 5m, 1h30m, 7d)"),
    ] = None,
    search: Annotated[
        str | None, typer.Option("--search", help="Substring of id, name or app version")
    ] = None,
    sort: Annotated[
        str,
        typer.Option("--sort", help=f"Sort column: {', '.join(SORT_KEYS)}"),
    ] = "device",
    desc: Annotated[bool, typer.Option("--desc", help="Sort descending")] = False,
    deleted: Annotated[
        bool, typer.Option("--deleted", help="Include devices soft-deleted in the CMS")
    ] = False,
    as_json: JsonOpt = False,
    db: DbOpt = None,
    watch_: Annotated[
        bool,
        typer.Option(
            "--watch",
            "-w",
            help="After the table, print each change as it is committed (polls the "
            "database every --interval), like kubectl get -w",
        ),
    ] = False,
    interval: Annotated[
        float, typer.Option("--interval", min=0.1, help="--watch: seconds between polls")
    ] = 1.0,
    count: Annotated[
        int | None, typer.Option("--count", "-C", min=1, help="--watch: exit after N changes")
    ] = None,
) -> None:
    """The fleet: state, CMS status, flapping, re-provisioning mark, battery, wifi, last
    seen, app version.

    --watch then prints each change (state with the time it was committed, CMS status,
    flapping, the wipe's re-provisioning mark, devices added or removed) until Ctrl-C;
    with --json, one JSON object per change. It polls the database: a change is seen
    within --interval.
    """
    from bridge.clock import now_ms
    from bridge.ops import fleet, render

    if state is not None and state not in STATES:
        raise typer.BadParameter(
            f"{state!r} is not one of {', '.join(STATES)}", param_hint="--state"
        )
    if sort not in SORT_KEYS:
        raise typer.BadParameter(
            f"{sort!r} is not one of {', '.join(SORT_KEYS)}", param_hint="--sort"
        )
    stale_ms = _duration(stale)
    settings = _settings(db=db)
    with _reporting():
        engine = _engine(settings)
        if watch_:
            try:
                staleness.check(engine, settings.stale_after_ms)
                _watch_fleet(engine, search, interval, count, as_json=as_json)
            finally:
                engine.dispose()
            return
        try:
            rows = fleet.load_fleet(engine, include_deleted=deleted)
            health = staleness.check(engine, settings.stale_after_ms)
        finally:
            engine.dispose()
        now = now_ms()
        chosen = fleet.apply_filter(
            rows,
            fleet.FleetFilter(
                state=state, flapping=flapping, stale_ms=stale_ms, search=search, deleted=deleted
            ),
            now,
        )
        chosen = fleet.sort_rows(chosen, sort, descending=desc)
        summary = fleet.summarize(chosen)
        if as_json:
            _echo_json(
                {
                    "devices": [row.to_json() for row in chosen],
                    "summary": summary.to_json(),
                    "fleet_total": len(rows),
                }
            )
            staleness.exit_if_stale(health)
            return
        console = _console()
        if chosen:
            console.print(render.fleet_table(chosen, now))
        else:
            console.print("no devices match", style="dim")
        console.print(render.fleet_summary_line(summary, len(rows)))
    staleness.exit_if_stale(health)


def _watch_fleet(
    engine: Engine, search: str | None, interval: float, count: int | None, *, as_json: bool
) -> None:
    """The table once, then each change until Ctrl-C (or ``count`` changes)."""
    import sys
    import time

    from bridge.clock import now_ms
    from bridge.ops import fleet, render
    from bridge.ops.fleet_watch import FleetWatch

    watcher = FleetWatch(engine)
    rows = watcher.start()
    console = _console()
    if not as_json:
        now = now_ms()
        console.print(render.fleet_table(fleet.sort_rows(rows, "device"), now))
        console.print(render.fleet_summary_line(fleet.summarize(rows), len(rows)))
    needle = search.casefold() if search else None
    shown = 0
    try:
        while count is None or shown < count:
            # The poll interval, not synchronisation: nothing tells us of a commit.
            time.sleep(interval)
            for change in watcher.poll(now_ms()):
                if needle is not None and needle not in change.device_id.casefold():
                    continue
                if as_json:
                    _echo_json(change.to_json())
                else:
                    console.print(render.fleet_change_line(change))
                shown += 1
                if count is not None and shown >= count:
                    return
            sys.stdout.flush()
    except KeyboardInterrupt:
        return


# --- device show -----------------------------------------------------------------------------


async def _retained_config(
    address: BrokerAddress, device_id: str, prefix: str, protocol: Any
) -> tuple[DeviceConfig | None, Status | None]:
    import contextlib

    from bridge.ops.mqtt import connect, read_retained
    from schemas import ContractError, DeviceConfig, Status, TopicKind, decode, device_topic

    config_topic = device_topic(device_id, TopicKind.CONFIG, prefix)
    status_topic = device_topic(device_id, TopicKind.STATUS, prefix)
    async with connect(address, protocol=protocol, name="show", connect_timeout_s=5) as client:
        snapshot = await read_retained(
            client, [config_topic, status_topic], prefix=prefix, marker_wait_s=5
        )
    found = {m.topic: m.payload for m in snapshot.messages}
    desired = reported = None
    with contextlib.suppress(ContractError):
        if config_topic in found:
            desired = decode(DeviceConfig, found[config_topic])
    with contextlib.suppress(ContractError):
        if status_topic in found:
            reported = decode(Status, found[status_topic])
    return desired, reported


def _config_view(settings: Settings, device_id: str) -> timeline.ConfigView:
    import asyncio

    import aiomqtt

    from bridge.ops import timeline
    from bridge.ops.errors import OpsError
    from schemas import is_valid_device_id

    address = settings.broker_address
    if address is None:
        return timeline.config_view(None, None, source=None)
    if not is_valid_device_id(device_id):
        return timeline.ConfigView(None, None, "unknown: the id is not valid on MQTT topics")
    try:
        desired, reported = asyncio.run(
            _retained_config(address, device_id, settings.prefix, settings.mqtt_protocol)
        )
    except (OpsError, aiomqtt.MqttError) as exc:
        return timeline.ConfigView(None, None, f"unknown: {exc}")
    return timeline.config_view(desired, reported, source=f"retained topics on {address.url}")


def device_show_cmd(
    device_id: Annotated[str, typer.Argument(metavar="ID", help="Device identifier")],
    limit: Annotated[
        int, typer.Option("--limit", min=1, help="Presence events in the timeline")
    ] = 50,
    as_json: JsonOpt = False,
    db: DbOpt = None,
    broker: Annotated[
        str | None,
        typer.Option(
            "--broker",
            help="Also read the retained config and status to compare config versions "
            "(env KB_BROKER)",
        ),
    ] = None,
    prefix: PrefixOpt = None,
    protocol: ProtocolOpt = None,
) -> None:
    """Timeline (births, wills, announced offlines, commands), why it is down, uptime."""
    import dataclasses

    from bridge.clock import now_ms
    from bridge.ops import render, timeline

    settings = _settings(db=db, broker=broker, prefix=prefix, mqtt_protocol=protocol)
    with _reporting():
        engine = _engine(settings)
        try:
            report = timeline.load_device(engine, device_id, now_ms(), history_limit=limit)
            health = staleness.check(engine, settings.stale_after_ms)
        finally:
            engine.dispose()
        report = dataclasses.replace(report, config=_config_view(settings, device_id))
        if as_json:
            _echo_json(_device_json(report))
        else:
            _console().print(render.device_report(report))
    staleness.exit_if_stale(health)


def _device_json(report: timeline.DeviceReport) -> dict[str, Any]:
    import dataclasses

    return {
        "device": report.device_id,
        "state": report.state,
        "remote": dataclasses.asdict(report.remote) if report.remote else None,
        "connectivity": dataclasses.asdict(report.connectivity) if report.connectivity else None,
        "why": report.why,
        "uptime": {name: a.to_json() for name, a in report.uptime.items()},
        "timeline": [entry.to_json() for entry in report.timeline],
        "commands": [cmd.to_json() for cmd in report.commands],
        "config": report.config.to_json() if report.config else None,
    }


# --- top ---------------------------------------------------------------------------------


def top_cmd(
    once: Annotated[bool, typer.Option("--once", help="Print one frame and exit")] = False,
    interval: Annotated[
        float, typer.Option("--interval", min=0.2, help="Seconds between refreshes")
    ] = 1.0,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one snapshot as JSON and exit")
    ] = False,
    db: DbOpt = None,
) -> None:
    """Live fleet view: states, recent transitions, flapping, commands, bridge lag.

    Keys on a terminal: s cycles the order of the recent transitions (newest, device,
    state), f filters them by the state they went to (lost, offline, online, unknown,
    all), q quits.
    """
    from bridge.clock import now_ms
    from bridge.ops import top

    settings = _settings(db=db)
    with _reporting():
        engine = _engine(settings)
        try:
            if as_json or once:
                health = staleness.check(engine, settings.stale_after_ms)
                if as_json:
                    _echo_json(top.collect(engine, now_ms()).to_json())
                else:
                    frame = top.render_frame(top.collect(engine, now_ms()), interval_s=interval)
                    _console().print(frame)
                staleness.exit_if_stale(health)
                return
            _top_live(_console(), engine, interval, settings.stale_after_ms)
        finally:
            engine.dispose()


def _top_live(console: Console, engine: Engine, interval: float, stale_after_ms: int) -> None:
    """Redraw every ``interval`` and at each key, until q or Ctrl-C; while no bridge
    writes the database, a warning stands above the frame."""
    from rich.console import Group
    from rich.live import Live
    from rich.text import Text

    from bridge.cli.keys import keys
    from bridge.clock import now_ms
    from bridge.db.fleet_health import read_fleet_health
    from bridge.ops import top

    view = top.TopView()
    with keys() as pressed:

        def frame() -> Any:
            now = now_ms()
            snap = top.collect(engine, now, view=view)
            shown = top.render_frame(snap, interval_s=interval, view=view, keys=pressed.live)
            warning = read_fleet_health(engine, now, stale_after_ms).warning()
            if warning is None:
                return shown
            return Group(Text(f"warning: {warning}", style="bold yellow"), shown)

        try:
            with Live(frame(), console=console, screen=True, auto_refresh=False) as live:
                while True:
                    key = pressed.read(interval)
                    if key is not None:
                        changed = top.on_key(view, key)
                        if changed is None:
                            return
                        view = changed
                    live.update(frame(), refresh=True)
        except KeyboardInterrupt:
            return


# --- uptime ---------------------------------------------------------------------------------


def uptime_cmd(
    since: Annotated[
        str, typer.Option("--since", help="Window length back from now (e.g. 24h, 7d)")
    ] = "7d",
    below: Annotated[
        str | None,
        typer.Option(
            "--below", help="Only devices below this availability (e.g. 99%); exit 1 if any"
        ),
    ] = None,
    device: Annotated[
        list[str] | None, typer.Option("--device", help="Only this device (repeatable)")
    ] = None,
    as_csv: Annotated[bool, typer.Option("--csv", help="CSV output")] = False,
    as_json: JsonOpt = False,
    db: DbOpt = None,
) -> None:
    """Availability per device from the presence history.

    Announced downtime (reboot, app update, ...) is counted apart from lost time (the
    connection died); unknown time (before the first event, or with no retained
    presence) is left out of the availability ratio.
    """
    import sys

    from bridge.clock import now_ms
    from bridge.ops import render, uptime

    window_ms = _duration(since)
    assert window_ms is not None
    threshold = _percent(below)
    if as_csv and as_json:
        raise typer.BadParameter("choose one of --csv and --json")
    settings = _settings(db=db)
    with _reporting():
        engine = _engine(settings)
        now = now_ms()
        try:
            rows = uptime.uptime_report(engine, now - window_ms, now, device)
            health = staleness.check(engine, settings.stale_after_ms)
        finally:
            engine.dispose()
        if threshold is not None:
            rows = [
                r
                for r in rows
                if r.availability.percent is not None and r.availability.percent < threshold
            ]
        rows.sort(
            key=lambda r: (
                r.availability.percent is None,
                r.availability.percent or 0.0,
                r.device_id,
            )
        )
        if as_csv:
            sys.stdout.write(render.uptime_csv(rows))
            sys.stdout.flush()
        elif as_json:
            _echo_json(
                {
                    "since_ms": now - window_ms,
                    "until_ms": now,
                    "below_percent": threshold,
                    "devices": [r.to_json() for r in rows],
                }
            )
        else:
            console = _console()
            if rows:
                console.print(render.uptime_table(rows))
            label = f" below {threshold:g}%" if threshold is not None else ""
            console.print(f"{len(rows)} devices{label} over the last {since}", style="bold")
        if threshold is not None and rows:
            raise typer.Exit(1)
    staleness.exit_if_stale(health)


# --- doctor -------------------------------------------------------------------------------------


def doctor_cmd(
    broker: BrokerOpt = None,
    db: DbOpt = None,
    prefix: PrefixOpt = None,
    protocol: ProtocolOpt = None,
    skew_threshold: Annotated[
        str, typer.Option("--skew-threshold", help="Clock skew worth a warning (e.g. 30s)")
    ] = f"{DEFAULT_SKEW_THRESHOLD_MS // 1000}s",
    as_json: JsonOpt = False,
) -> None:
    """Diagnose broker, database, bridge presence, clock skew and table consistency.

    Checks the broker connection, the database and its schema, the bridge's own retained
    presence, clock skew between kiosks and the bridge, and retained presence that the
    table disagrees with; prints OK/WARN/FAIL with a fix for each. Exit 1 if a check
    fails, 3 if the broker or the database cannot be reached.
    """
    import asyncio

    from bridge.clock import now_ms
    from bridge.ops import render
    from bridge.ops.doctor import run_doctor

    threshold_ms = _duration(skew_threshold)
    assert threshold_ms is not None
    settings = _settings(db=db, broker=broker, prefix=prefix, mqtt_protocol=protocol)
    with _reporting():
        report = asyncio.run(
            run_doctor(
                _broker_address(settings),
                settings.db,
                now_ms(),
                prefix=settings.prefix,
                protocol=_protocol(settings),
                skew_threshold_ms=threshold_ms,
            )
        )
    if as_json:
        _echo_json(report.to_json())
    else:
        _console().print(render.doctor_report(report))
    raise typer.Exit(report.exit_code)


# --- db check -----------------------------------------------------------------------------------


def db_check_cmd(
    fix: Annotated[
        bool,
        typer.Option("--fix", help="Clean what is safe to clean; the rest is only reported"),
    ] = False,
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Check the database for rows that do not fit together.

    Reports kb_connectivity rows of devices with no remotes row, unknown states, stored
    telemetry of a session ahead of presence, unfinished commands of missing or
    soft-deleted devices and commands in impossible states, active credentials of
    missing or deleted devices, and configuration or HTTP rows of missing devices. With
    --fix, cleans the connectivity and command rows (one statement each, repeating the
    check's condition); credentials and configuration are only reported. Exit 0 when
    nothing is left, 1 when problems remain, 3 if the database cannot be reached.
    """
    from bridge.clock import now_ms
    from bridge.ops import db_check

    settings = _settings(db=db)
    with _reporting():
        engine = _engine(settings)
        try:
            report = db_check.check_database(engine, fix=fix, now_ms=now_ms())
        finally:
            engine.dispose()
    if as_json:
        _echo_json(report.to_json())
    else:
        for line in _db_check_lines(report):
            typer.echo(line)
    if not report.ok:
        raise typer.Exit(1)


def _db_check_lines(report: db_check.DbCheckReport) -> Iterator[str]:
    fixed = sum(finding.fixed for finding in report.findings)
    for finding in report.findings:
        if finding.ok and not finding.fixed:
            yield f"OK    {finding.kind}"
            continue
        mark = "FIXED" if finding.ok else "FAIL "
        where = f"{finding.count} row{'s' if finding.count != 1 else ''} in {finding.table}"
        yield f"{mark} {finding.kind}: {where if finding.count else finding.table}"
        yield f"      {finding.detail}"
        if finding.sample:
            more = " ..." if finding.count > len(finding.sample) else ""
            yield f"      devices: {', '.join(finding.sample)}{more}"
        if finding.fixed:
            plural = "s" if finding.fixed != 1 else ""
            yield f"      fixed {finding.fixed} row{plural}: {finding.fix}"
        elif finding.fix is not None:
            yield f"      --fix: {finding.fix}"
        if finding.hint and not finding.ok:
            yield f"      hint: {finding.hint}"
    problems = report.problems
    rows = sum(finding.count for finding in problems)
    summary = f"{len(problems)} kinds of problem, {rows} rows" if problems else "no problems"
    yield f"db check: {summary}" + (f" left; {fixed} rows fixed" if report.fixed else "")


def _help(command: Callable[..., Any]) -> str:
    """The docstring with each paragraph on one line: typer keeps single line breaks of
    every paragraph after the first, which breaks its own wrapping."""
    paragraphs = inspect.cleandoc(command.__doc__ or "").split("\n\n")
    return "\n\n".join(" ".join(p.split()) for p in paragraphs)


def register(app: typer.Typer) -> None:
    """Add the ops commands to ``app``."""
    for name, command in (
        ("watch", watch_cmd),
        ("devices", devices_cmd),
        ("top", top_cmd),
        ("uptime", uptime_cmd),
        ("doctor", doctor_cmd),
    ):
        app.command(name, help=_help(command))(command)
    # Built here, not at import: a module-level group would collect a second "show" each
    # time register() runs (tests build many apps).
    # ``db`` is run_cmd's group (``db init``), built at its import: add ``check`` once.
    if not any(command.name == "check" for command in db_app.registered_commands):
        db_app.command("check", help=_help(db_check_cmd))(db_check_cmd)
    device_app = typer.Typer(help="One device in detail.", no_args_is_help=True)
    device_app.command("show", help=_help(device_show_cmd))(device_show_cmd)
    app.add_typer(device_app, name="device")
