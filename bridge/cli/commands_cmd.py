"""``kiosk-bridge commands``: list the outbox by state, kind, device and age, and
``commands show ID``: one command's lifecycle and why it has not finished.

Exit codes (bridge.exit_codes): 0 ok, 1 no such command, 2 usage, 3 database unreachable.
"""

from __future__ import annotations

from typing import Annotated

import typer

from bridge.cli.common import (
    DbOpt,
    JsonOpt,
    console,
    duration_ms,
    echo_json,
    reporting,
    settings,
)
from bridge.commands.lifecycle import CommandState

#: The lifecycle's states, in order: from the pure, import-light lifecycle module, so
#: ``--help`` needs no SQLAlchemy.
STATE_CHOICES = tuple(state.value for state in CommandState)


def _check_states(states: list[str] | None) -> list[str] | None:
    for state in states or ():
        if state not in STATE_CHOICES:
            raise typer.BadParameter(f"{state!r} is not one of {', '.join(STATE_CHOICES)}")
    return states


def _check_kinds(kinds: list[str] | None) -> list[str] | None:
    from schemas import CommandType

    known = {kind.value for kind in CommandType}
    for kind in kinds or ():
        if kind.replace("-", "_") not in known:
            shown = ", ".join(sorted(k.replace("_", "-") for k in known))
            raise typer.BadParameter(f"{kind!r} is not one of {shown}")
    return kinds


def list_cmd(
    ctx: typer.Context,
    state: Annotated[
        list[str] | None,
        typer.Option(
            "--state",
            help="Only commands in this state (repeatable): " + ", ".join(STATE_CHOICES),
            callback=_check_states,
        ),
    ] = None,
    kind: Annotated[
        list[str] | None,
        typer.Option(
            "--kind",
            help="Only this kind, e.g. refresh, set-config (repeatable)",
            callback=_check_kinds,
        ),
    ] = None,
    device: Annotated[
        list[str] | None, typer.Option("--device", help="Only this device (repeatable)")
    ] = None,
    since: Annotated[
        str | None, typer.Option("--since", help="Only commands created this recently (e.g. 1h)")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many rows")] = 50,
    as_json: JsonOpt = False,
    db: DbOpt = None,
) -> None:
    """Commands in kb_commands, newest first, with why each unfinished one waits.

    The unfinished ones say why: the device is offline (since when), nobody dispatches
    (no bridge runs on this database), no ack yet (attempts, next retry). 'commands show
    ID' prints one command's whole lifecycle.
    """
    if ctx.invoked_subcommand is not None:
        return
    since_ms = duration_ms(since, "--since")
    config = settings(db=db)
    with reporting():
        from bridge.clock import now_ms
        from bridge.ops import commands, render_commands
        from bridge.ops.db import open_ready_engine

        now = now_ms()
        engine = open_ready_engine(config.db)
        try:
            rows = commands.list_commands(
                engine,
                commands.CommandFilter(
                    states=tuple(state or ()),
                    kinds=tuple(kind or ()),
                    devices=tuple(device or ()),
                    since_ms=None if since_ms is None else now - since_ms,
                    limit=limit,
                ),
            )
        finally:
            engine.dispose()
        if as_json:
            echo_json({"commands": [row.to_json(now) for row in rows], "limit": limit})
            return
        out = console()
        if rows:
            out.print(render_commands.commands_table(rows, now))
        else:
            out.print("no commands match", style="dim")
        summary = render_commands.state_summary(rows)
        if len(rows) == limit:
            summary.append(f" (the newest {limit}; --limit for more)", style="dim")
        out.print(summary)


def show_cmd(
    command_id: Annotated[
        str, typer.Argument(metavar="ID", help="Command id, or its first characters (4+)")
    ],
    as_json: JsonOpt = False,
    db: DbOpt = None,
) -> None:
    """One command's lifecycle: each step with its time, the attempts, and why it has
    not finished (or did not succeed). Exit 1 when no such command exists."""
    config = settings(db=db)
    with reporting():
        from bridge.clock import now_ms
        from bridge.ops import commands, render_commands
        from bridge.ops.db import open_ready_engine

        now = now_ms()
        engine = open_ready_engine(config.db)
        try:
            row = commands.load_command(engine, command_id)
        finally:
            engine.dispose()
        if as_json:
            data = row.to_json(now)
            data["lifecycle"] = [
                {"step": s.step, "at_ms": s.at_ms, "note": s.note} for s in commands.lifecycle(row)
            ]
            echo_json(data)
            return
        console().print(render_commands.command_detail(row, now))


def register(app: typer.Typer) -> None:
    """Add the ``commands`` group to ``app``."""
    group = typer.Typer(
        help="Commands in the outbox: list and filter them, or show one.",
        invoke_without_command=True,
    )
    group.callback(invoke_without_command=True)(list_cmd)
    group.command("show")(show_cmd)
    app.add_typer(group, name="commands")
