"""What every ``kiosk-bridge`` command shares: settings with one-line errors, failures
mapped to :mod:`bridge.exit_codes`, JSON output and a console sized for pipes.

Import-light on purpose (typer and the standard library only at module level): the
CLI imports every command module to build ``--help``, and heavy libraries (SQLAlchemy,
pydantic-settings, aiomqtt) are imported by the commands that use them, when they run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated, Any, Final, NoReturn

import typer

from bridge._compat.typer import debug_enabled
from bridge.exit_codes import ExitCode

if TYPE_CHECKING:
    from rich.console import Console

    from bridge.settings import Settings

#: Width for output that is not a terminal (pipes, files, tests): wide enough that the
#: tables do not wrap, as a pager or grep would want them.
PIPE_WIDTH: Final = 200

DbOpt = Annotated[
    str | None, typer.Option("--db", help="SQLAlchemy URL of the bridge's database (env KB_DB)")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON output")]


def fail(message: str, code: ExitCode, *, hint: str | None = None) -> NoReturn:
    """One line on stderr (and a hint), then exit with ``code``."""
    typer.echo(f"error: {message}", err=True)
    if hint:
        typer.echo(f"hint: {hint}", err=True)
    raise typer.Exit(int(code))


def settings(**overrides: object) -> Settings:
    """The settings tree from flags and ``KB_*``; invalid ones exit 2 naming the variable."""
    from pydantic import ValidationError

    from bridge.settings import load_settings, setting_name

    try:
        return load_settings(**overrides)
    except ValidationError as exc:
        if debug_enabled():
            raise
        lines = [
            f"  {setting_name(err['loc'])}: {err['msg']}" for err in exc.errors(include_url=False)
        ]
        typer.echo("error: invalid settings:\n" + "\n".join(lines), err=True)
        raise typer.Exit(ExitCode.USAGE) from None


@contextlib.contextmanager
def reporting() -> Iterator[None]:
    """Turn failures into one human line on stderr and the documented exit code; with
    ``kiosk-bridge --debug`` the traceback is kept."""
    try:
        yield
    except typer.Exit:
        raise
    except Exception as exc:
        found = classify(exc)
        if found is None or debug_enabled():
            raise
        code, message, hint = found
        typer.echo(f"error: {message}", err=True)
        if hint:
            typer.echo(f"hint: {hint}", err=True)
        raise typer.Exit(int(code)) from None


def classify(exc: BaseException) -> tuple[ExitCode, str, str | None] | None:
    """The exit code, message and hint of a failure a human can act on; ``None`` for a
    bug (its traceback is worth seeing)."""
    from bridge.ops.errors import OpsError

    if isinstance(exc, OpsError):
        return ExitCode(exc.exit_code), str(exc), exc.hint
    # Only look at a library's errors when it was imported: it raised, or it is not ours.
    if "sqlalchemy" in sys.modules:
        from sqlalchemy.exc import SQLAlchemyError

        from bridge.ops.db import first_line

        if isinstance(exc, SQLAlchemyError):
            return ExitCode.UNREACHABLE, f"database: {first_line(exc)}", "check --db / KB_DB"
    if "aiomqtt" in sys.modules:
        import aiomqtt

        if isinstance(exc, aiomqtt.MqttError):
            return ExitCode.UNREACHABLE, f"broker connection lost: {exc}", None
    return None


def console(*, stderr: bool = False) -> Console:
    """A terminal's console, or a wide one for pipes so tables do not wrap."""
    from rich.console import Console

    probe = Console(stderr=stderr)
    if probe.is_terminal or os.environ.get("COLUMNS"):
        # A terminal, or an explicit width (rich reads COLUMNS itself).
        return Console(highlight=False, stderr=stderr)
    return Console(highlight=False, width=PIPE_WIDTH, stderr=stderr)


def echo_json(data: Any) -> None:
    typer.echo(json.dumps(data, default=json_default, separators=(",", ":")))


def json_default(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def duration_ms(value: str | None, flag: str) -> int | None:
    """``5m``, ``1h30m``, ``7d`` as milliseconds; a bad one is a usage error on ``flag``."""
    if value is None:
        return None
    from bridge.ops.durations import parse_duration

    try:
        return parse_duration(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=flag) from None
