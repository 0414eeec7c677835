"""``kiosk-bridge send``: queue tracked commands, optionally wait for them to finish.

A fan-out (``--all``, ``--where``, many ids) shows a progress bar by state on a terminal
and ends with one line per final state, each with why its commands did not succeed;
``--verbose`` adds a row per device. Heavy imports wait until the command runs, so
``send --help`` starts fast.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Final

import typer

from bridge.cli.common import console as make_console
from bridge.cli.common import fail, reporting, settings
from bridge.cli.preflight import PreflightError, check_database
from bridge.exit_codes import ExitCode
from schemas import CommandType

if TYPE_CHECKING:
    from rich.console import Console
    from sqlalchemy import Engine

#: What ``send`` may queue, from the contract's command kinds (``set_config`` is spelled
#: ``set-config`` on the command line): every kind but ``rotate_token``, which only
#: ``kiosk-bridge device rotate-token`` sends. A new kind in ``schemas`` appears here.
SENDABLE: Final = tuple(
    kind.replace("_", "-") for kind in CommandType if kind is not CommandType.ROTATE_TOKEN
)


def _sendable(kind: str) -> str:
    if kind not in SENDABLE:
        raise typer.BadParameter(f"{kind!r} is not one of {', '.join(SENDABLE)}")
    return kind


def _arg_pairs(pairs: list[str]) -> dict[str, Any]:
    """``--arg key=value`` (the value as JSON when it parses, else a string)."""
    found: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--arg")
        try:
            found[key] = json.loads(raw)
        except ValueError:
            found[key] = raw
    return found


def send(
    kind: Annotated[
        str,
        typer.Argument(
            help=f"What to send: {', '.join(SENDABLE)}", metavar="KIND", callback=_sendable
        ),
    ],
    devices: Annotated[list[str] | None, typer.Argument(help="Device ids")] = None,
    all_devices: Annotated[bool, typer.Option("--all", help="Every (non-deleted) device")] = False,
    where: Annotated[
        list[str] | None, typer.Option(help="Filter, e.g. state=online (repeatable)")
    ] = None,
    ttl: Annotated[
        str | None,
        typer.Option(help="Give up after this long, e.g. 10m, 1h (default: 1h; wipe: 10m)"),
    ] = None,
    wait: Annotated[bool, typer.Option(help="Block until every command finishes")] = False,
    timeout: Annotated[str, typer.Option(help="How long --wait waits")] = "60s",
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
    yes: Annotated[bool, typer.Option("--yes", help="Confirm a wipe")] = False,
    reason: Annotated[str | None, typer.Option(help="Why (required for wipe; audited)")] = None,
    url: Annotated[str | None, typer.Option(help="refresh: URL to load")] = None,
    delay: Annotated[int | None, typer.Option(help="reconnect: seconds to stay away")] = None,
    remote_control: Annotated[
        bool | None, typer.Option("--remote-control/--no-remote-control", help="set-config")
    ] = None,
    status_interval: Annotated[int | None, typer.Option(help="set-config: seconds")] = None,
    display_url: Annotated[str | None, typer.Option(help="set-config: display URL")] = None,
    extra: Annotated[
        list[str] | None,
        typer.Option("--arg", help="Any argument of the kind, KEY=VALUE (JSON values), repeatable"),
    ] = None,
    db: Annotated[str | None, typer.Option(help="SQLAlchemy URL (default sqlite)")] = None,
    requested_by: Annotated[str | None, typer.Option(help="Who asks (default: $USER)")] = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="With --wait: a row per device as well")
    ] = False,
) -> None:
    """Queue a tracked command per device; the running bridge delivers it.

    Exit 0 when queued (with --wait: when all succeeded), 1 when any failed or timed out,
    2 for a bad request, 3 when the database is unreachable.
    """
    console = make_console(stderr=as_json)
    config = settings(db=db)
    command_type = CommandType(kind.replace("-", "_"))
    args: dict[str, Any] = _arg_pairs(extra or [])
    if command_type is CommandType.REFRESH and url:
        args["url"] = url
    if command_type is CommandType.RECONNECT:
        if delay is not None:
            args["delay_s"] = delay
        if reason:
            args["reason"] = reason
    if command_type is CommandType.WIPE:
        if not yes:
            fail("wipe erases the device; confirm with --yes", ExitCode.USAGE)
        args["reason"] = reason
    if command_type is CommandType.SET_CONFIG:
        for key, value in (
            ("remote_control_enabled", remote_control),
            ("status_interval_s", status_interval),
            ("display_url", display_url),
        ):
            if value is not None:
                args[key] = value
    with reporting():
        engine, ids = _enqueue(
            config.db,
            command_type.value,
            Request(
                devices=tuple(devices or ()),
                all_devices=all_devices,
                where=tuple(where or ()),
                args={k: v for k, v in args.items() if v is not None},
                ttl=ttl,
                requested_by=requested_by,
                reason=reason,
            ),
        )
        try:
            if not wait:
                _print_queued(console, kind, ids, as_json=as_json)
                return
            from bridge.ops.durations import parse_duration

            try:
                timeout_s = parse_duration(timeout) / 1000
            except ValueError as exc:
                raise typer.BadParameter(str(exc), param_hint="--timeout") from None
            ok = _wait(console, engine, kind, ids, timeout_s, as_json=as_json, verbose=verbose)
        finally:
            engine.dispose()
    if not ok:
        raise typer.Exit(ExitCode.BAD_STATE)


@dataclass(frozen=True, slots=True)
class Request:
    """What the command line asked to queue, before it is resolved against the table."""

    devices: tuple[str, ...]
    all_devices: bool
    where: tuple[str, ...]
    args: dict[str, Any]
    ttl: str | None
    requested_by: str | None
    reason: str | None


def _enqueue(url: str, kind: str, request: Request) -> tuple[Engine, list[str]]:
    """Queue the commands; a bad request exits 2, an unreachable database 3."""
    import getpass

    from sqlalchemy.exc import SQLAlchemyError

    from bridge.db.engine import create_schema, make_engine
    from bridge.ops.durations import parse_duration
    from bridge.outbox.api import (
        CommandRequestError,
        Targets,
        enqueue,
        parse_where,
        resolve_targets,
    )

    try:
        check_database(url, create=True)
    except PreflightError as exc:
        fail(str(exc), exc.code, hint=exc.hint)
    try:
        ttl_s = parse_duration(request.ttl) / 1000 if request.ttl is not None else None
        targets = Targets(
            devices=request.devices,
            all_devices=request.all_devices,
            where=tuple(parse_where(w) for w in request.where),
        )
        engine = make_engine(url)
    except (CommandRequestError, ValueError) as exc:
        fail(str(exc), ExitCode.USAGE)
    try:
        create_schema(engine)
        ids = enqueue(
            engine,
            kind,
            resolve_targets(engine, targets),
            request.args,
            ttl_s=ttl_s,
            requested_by=request.requested_by or getpass.getuser(),
            reason=request.reason,
        )
    except (CommandRequestError, ValueError) as exc:
        engine.dispose()
        fail(str(exc), ExitCode.USAGE)
    except SQLAlchemyError:
        engine.dispose()
        raise
    return engine, ids


def _print_queued(console: Console, kind: str, ids: list[str], *, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps({"queued": ids}))
        return
    console.print(f"queued {len(ids)} {kind} command(s)")
    for command_id in ids[:20]:
        console.print(f"  {command_id}")
    if len(ids) > 20:
        console.print(f"  ... and {len(ids) - 20} more: kiosk-bridge commands --state queued")


def _wait(
    console: Console,
    engine: Engine,
    kind: str,
    ids: list[str],
    timeout_s: float,
    *,
    as_json: bool,
    verbose: bool,
) -> bool:
    """Wait for ``ids`` with a progress bar on a terminal; print the outcome; ``True``
    when every command succeeded."""
    from collections import Counter

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from bridge.clock import now_ms
    from bridge.ops import commands, render_commands

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[states]}"),
        TimeElapsedColumn(),
        console=console,
        # Only a terminal gets a bar: in a pipe or a log it would be noise.
        disable=as_json or not console.is_terminal,
        transient=True,
    ) as bar:
        task = bar.add_task(kind, total=len(ids), states="")

        def show(rows: list[commands.CommandRow]) -> None:
            counts = Counter(row.state for row in rows)
            states = ", ".join(f"{counts[s]} {s}" for s in commands.STATES if counts.get(s))
            bar.update(task, completed=sum(row.finished for row in rows), states=states)

        rows = commands.wait_finished(engine, ids, timeout_s=timeout_s, on_poll=show)
    now = now_ms()
    ok = len(rows) == len(ids) and all(row.state == "succeeded" for row in rows)
    if as_json:
        typer.echo(json.dumps({"ok": ok, "commands": [row.to_json(now) for row in rows]}))
        return ok
    console.print(render_commands.grouped_results(rows, now, verbose=verbose))
    unfinished = sum(not row.finished for row in rows)
    if unfinished:
        console.print(
            f"{unfinished} of {len(rows)} did not finish within {timeout_s:g}s; they stay "
            "queued until they expire (kiosk-bridge commands --state queued)",
            style="yellow",
        )
    return ok


def register(app: typer.Typer) -> None:
    app.command("send")(send)
