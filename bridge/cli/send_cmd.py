"""``kiosk-bridge send``: queue tracked commands, optionally wait for them to finish."""

from __future__ import annotations

import getpass
import json
from datetime import UTC
from typing import Annotated, Any, Final

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy.exc import SQLAlchemyError

from bridge.cli.run_cmd import settings_or_exit
from bridge.commands.lifecycle import CommandState
from bridge.db.engine import create_schema, make_engine
from bridge.ops.durations import parse_duration
from bridge.outbox.api import (
    CommandRequestError,
    Targets,
    enqueue,
    parse_where,
    resolve_targets,
)
from bridge.outbox.waiting import wait_for_commands
from schemas import CommandType

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


_GOOD = {CommandState.SUCCEEDED}


def _iso(value: Any) -> str | None:
    return None if value is None else value.replace(tzinfo=UTC).isoformat()


def _row_json(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "device_id": row.device_id,
        "type": row.type,
        "state": row.state,
        "attempts": row.attempts,
        "created_at": _iso(row.created_at),
        "delivered_at": _iso(row.delivered_at),
        "acked_at": _iso(row.acked_at),
        "finished_at": _iso(row.finished_at),
        "last_error": row.last_error,
    }


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
) -> None:
    """Queue a tracked command per device; the running bridge delivers it.

    Exit 0 when queued (with --wait: when all succeeded), 1 when any failed or timed out,
    2 for a bad request, 3 when the database is unreachable.
    """
    console = Console(stderr=as_json)
    settings = settings_or_exit(db=db)
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
            typer.echo("error: wipe erases the device; confirm with --yes", err=True)
            raise typer.Exit(2)
        args["reason"] = reason
    if command_type is CommandType.SET_CONFIG:
        for key, value in (
            ("remote_control_enabled", remote_control),
            ("status_interval_s", status_interval),
            ("display_url", display_url),
        ):
            if value is not None:
                args[key] = value
    try:
        ttl_s = parse_duration(ttl) / 1000 if ttl is not None else None
        timeout_s = parse_duration(timeout) / 1000
        targets = Targets(
            devices=tuple(devices or ()),
            all_devices=all_devices,
            where=tuple(parse_where(w) for w in where or ()),
        )
        engine = make_engine(settings.db)
        create_schema(engine)
        ids = enqueue(
            engine,
            command_type.value,
            resolve_targets(engine, targets),
            {k: v for k, v in args.items() if v is not None},
            ttl_s=ttl_s,
            requested_by=requested_by or getpass.getuser(),
            reason=reason,
        )
    except (CommandRequestError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except SQLAlchemyError as exc:
        typer.echo(f"error: database {settings.db}: {str(exc).splitlines()[0]}", err=True)
        raise typer.Exit(3) from None
    if not wait:
        if as_json:
            typer.echo(json.dumps({"queued": ids}))
        else:
            console.print(f"queued {len(ids)} {kind} command(s)")
            for command_id in ids[:20]:
                console.print(f"  {command_id}")
        return
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=as_json,
        transient=True,
    ) as bar:
        task = bar.add_task(f"{kind}", total=len(ids))
        rows = wait_for_commands(
            engine,
            ids,
            timeout_s=timeout_s,
            progress=lambda done, _total: bar.update(task, completed=done),
        )
    ok = all(CommandState(row.state) in _GOOD for row in rows) and len(rows) == len(ids)
    if as_json:
        typer.echo(json.dumps({"ok": ok, "commands": [_row_json(r) for r in rows]}))
    else:
        table = Table("device", "state", "attempts", "error", title=f"{kind} results")
        for row in rows:
            style = "green" if CommandState(row.state) in _GOOD else "red"
            table.add_row(
                row.device_id, f"[{style}]{row.state}[/]", str(row.attempts), row.last_error or ""
            )
        console.print(table)
        if not ok and any(not CommandState(r.state).terminal for r in rows):
            console.print("some commands did not finish in time: is `kiosk-bridge run` running?")
    if not ok:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("send")(send)
