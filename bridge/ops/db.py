"""Opening the bridge's database for reading, with failures a human can act on."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from bridge.db.engine import make_engine, missing_tables
from bridge.ops.errors import DatabaseUnreachable, UsageError

DB_INIT_HINT = "run `kiosk-bridge db init --db URL` (or start the bridge once)"


def shown_url(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def open_read_engine(url: str) -> Engine:
    """An engine for ops reads; raises :class:`UsageError` for a malformed URL and
    :class:`DatabaseUnreachable` for a SQLite file that does not exist."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise UsageError(f"database URL {url!r} is not a valid SQLAlchemy URL: {exc}") from None
    if parsed.get_backend_name() != "sqlite":
        try:
            return make_engine(url)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        except ModuleNotFoundError as exc:
            raise UsageError(
                f"no driver for {shown_url(url)}: {exc}; install kiosk-bridge[mysql] or "
                "kiosk-bridge[postgres]"
            ) from None
    path = parsed.database or ""
    if path and path != ":memory:" and not Path(path).is_file():
        # sqlite3 would silently create an empty database at a mistyped path.
        raise DatabaseUnreachable(
            f"SQLite database {path} does not exist",
            hint="pass --db (or KB_DB) with the URL the bridge writes to",
        )
    # Not bridge.db.engine.make_engine: its BEGIN IMMEDIATE would make every read of the
    # CLI take the write lock and stall the bridge.
    return create_engine(parsed, connect_args={"check_same_thread": False, "timeout": 10})


def check_reachable(engine: Engine) -> None:
    """Raise :class:`DatabaseUnreachable` unless a trivial query succeeds."""
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        raise DatabaseUnreachable(
            f"cannot reach database {engine.url.render_as_string(hide_password=True)}: "
            f"{first_line(exc)}",
            hint="check that the server runs and the URL, user and password are right",
        ) from None


def check_schema(engine: Engine) -> None:
    """Raise :class:`DatabaseUnreachable` when the bridge's tables are missing."""
    try:
        missing = missing_tables(engine)
    except SQLAlchemyError as exc:
        raise DatabaseUnreachable(
            f"cannot read the schema of {engine.url.render_as_string(hide_password=True)}: "
            f"{first_line(exc)}"
        ) from None
    if missing:
        raise DatabaseUnreachable(
            f"database {engine.url.render_as_string(hide_password=True)} lacks the tables "
            f"{', '.join(missing)}",
            hint=DB_INIT_HINT,
        )


def open_ready_engine(url: str) -> Engine:
    """A read engine on a reachable database that has the bridge's schema."""
    engine = open_read_engine(url)
    try:
        check_reachable(engine)
        check_schema(engine)
    except BaseException:
        engine.dispose()
        raise
    return engine


def first_line(exc: BaseException) -> str:
    """The driver's own message without SQLAlchemy's statement dump and doc link."""
    orig = getattr(exc, "orig", None)
    text_ = str(orig if orig is not None else exc).strip()
    return (text_.splitlines()[0] if text_ else type(exc).__name__)[:300]
