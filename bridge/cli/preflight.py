"""Start-up checks the CLI runs before it builds anything: a failure is one line naming
the flag or variable to change, with its exit code (:mod:`bridge.exit_codes`).

Ports first, then the database: a taken port is found before anything has connected
to the broker or the database, and nothing is left half started.
"""

from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bridge.exit_codes import ExitCode

if TYPE_CHECKING:
    from bridge.settings import Settings


class PreflightError(Exception):
    def __init__(self, message: str, code: ExitCode, hint: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.hint = hint


@dataclass(frozen=True, slots=True)
class Port:
    host: str
    port: int
    #: The flag and the variable that choose it, for the message.
    flag: str


def ports_of(settings: Settings) -> list[Port]:
    """The ports ``run`` will listen on."""
    ports: list[Port] = []
    if settings.broker is None:
        host, port = settings.listen_address
        ports.append(Port(host, port, "--listen / KB_LISTEN (the embedded broker)"))
    if settings.metrics_port:
        ports.append(
            Port(settings.metrics_host, settings.metrics_port, "--metrics-port / KB_METRICS_PORT")
        )
    http = settings.http.listen_address
    if http is not None:
        ports.append(Port(http[0], http[1], "--http / KB_HTTP__LISTEN"))
    return ports


def check_port(port: Port) -> None:
    """Raise :class:`PreflightError` unless ``port`` can be bound now. The probe socket
    is closed at once; SO_REUSEADDR as servers set it, so a port in TIME_WAIT passes."""
    family = socket.AF_INET6 if ":" in port.host else socket.AF_INET
    host = port.host.strip("[]")
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port.port))
        except OSError as exc:
            where = f"{port.host}:{port.port}"
            if exc.errno == errno.EADDRINUSE:
                raise PreflightError(
                    f"port {port.port} on {port.host} is already in use",
                    ExitCode.USAGE,
                    f"stop what listens on {where} or choose another with {port.flag}",
                ) from None
            raise PreflightError(
                f"cannot listen on {where}: {exc.strerror or exc}",
                ExitCode.USAGE,
                f"change {port.flag}",
            ) from None


def check_ports(settings: Settings) -> None:
    for port in ports_of(settings):
        check_port(port)


#: Driver messages that mean "the URL is wrong", not "the server is down".
_WRONG_URL = (
    "unknown database",  # MySQL/MariaDB 1049
    "does not exist",  # PostgreSQL: database "x" does not exist
    "access denied",  # MySQL/MariaDB 1045
    "authentication failed",  # PostgreSQL
)


def check_database(url: str, *, create: bool) -> None:
    """The database behind ``url`` can be opened: a SQLite file whose directory exists
    (the file itself only when not ``create``), or a server that accepts the login."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    from bridge.ops.db import first_line, shown_url

    flag = "--db / KB_DB"
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise PreflightError(
            f"{url!r} is not a database URL", ExitCode.USAGE, f"change {flag}"
        ) from None
    if parsed.get_backend_name() == "sqlite":
        _check_sqlite(parsed.database or "", create=create, flag=flag)
        return
    try:
        engine = create_engine(parsed)
    except ModuleNotFoundError as exc:
        raise PreflightError(
            f"no driver for {shown_url(url)}: {exc}",
            ExitCode.USAGE,
            "pip install 'kiosk-bridge[mysql]' or 'kiosk-bridge[postgres]'",
        ) from None
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        message = first_line(exc)
        wrong = any(marker in message.lower() for marker in _WRONG_URL)
        raise PreflightError(
            f"database {shown_url(url)}: {message}",
            ExitCode.USAGE if wrong else ExitCode.UNREACHABLE,
            f"fix the name, user or password in {flag}"
            if wrong
            else "check that the database server runs and is reachable",
        ) from None
    finally:
        engine.dispose()


def _check_sqlite(path: str, *, create: bool, flag: str) -> None:
    if not path or path == ":memory:":
        return
    file = Path(path)
    if not create:
        if not file.is_file():
            raise PreflightError(
                f"SQLite database {path} does not exist",
                ExitCode.USAGE,
                f"pass the bridge's database with {flag}",
            )
        return
    directory = file.parent
    if not directory.is_dir():
        raise PreflightError(
            f"the directory {directory} of the SQLite database does not exist",
            ExitCode.USAGE,
            f"create it, or change {flag}",
        )
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PreflightError(
            f"the directory {directory} of the SQLite database is not writable",
            ExitCode.USAGE,
            f"fix its permissions, or change {flag}",
        )
