"""``kiosk-bridge run`` and ``kiosk-bridge db init``.

Before the bridge is built, :mod:`bridge.cli.preflight` checks the ports it will listen
on and then the database, so a start-up failure is one line naming the flag to change
(exit codes in :mod:`bridge.exit_codes`); ``kiosk-bridge --debug`` keeps tracebacks.
The service modules are imported only when the command runs.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any

import typer

from bridge._compat.typer import debug_enabled
from bridge.cli.common import classify, fail
from bridge.cli.preflight import PreflightError, check_database, check_ports
from bridge.exit_codes import ExitCode

if TYPE_CHECKING:
    from bridge.settings import Settings

db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
log = logging.getLogger(__name__)


def settings_or_exit(**overrides: object) -> Settings:
    from pydantic import ValidationError

    from bridge.settings import load_settings, setting_name

    try:
        return load_settings(**overrides)
    except ValidationError as exc:
        lines = [
            f"  {setting_name(err['loc'])}: {err['msg']}" for err in exc.errors(include_url=False)
        ]
        typer.echo("invalid settings:\n" + "\n".join(lines), err=True)
        raise typer.Exit(2) from None


def run(
    broker: Annotated[
        str | None,
        typer.Option(help="mqtt[s]://[user:pass@]host:port; omit to start the embedded broker"),
    ] = None,
    listen: Annotated[
        str | None, typer.Option(help="HOST:PORT of the embedded broker (default 127.0.0.1:1883)")
    ] = None,
    embedded_open: Annotated[
        bool | None,
        typer.Option(
            "--embedded-open",
            help="Let anyone connect to the embedded broker without a password (a local "
            "try only; env KB_EMBEDDED_OPEN=1). Default: authentication and the ACL",
            show_default=False,
        ),
    ] = None,
    embedded_credentials: Annotated[
        str | None,
        typer.Option(
            help="File with the embedded broker's _bridge/_ops/_claim passwords, created "
            "(0600) if missing (default: next to the SQLite database)"
        ),
    ] = None,
    db: Annotated[str | None, typer.Option(help="SQLAlchemy URL (default sqlite)")] = None,
    prefix: Annotated[str | None, typer.Option(help="Topic prefix (default kiosk/v1)")] = None,
    shared_group: Annotated[
        str | None, typer.Option(help="Split the fleet between instances ($share/NAME/...)")
    ] = None,
    instance: Annotated[str | None, typer.Option(help="Name of this bridge instance")] = None,
    offline_grace: Annotated[
        float | None, typer.Option(help="Seconds before offline/lost shows Disconnected")
    ] = None,
    log_level: Annotated[str | None, typer.Option(help="DEBUG, INFO, WARNING, ERROR")] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="Serve Prometheus metrics on this port")
    ] = None,
    metrics_host: Annotated[str | None, typer.Option(help="Address for metrics")] = None,
    http: Annotated[
        str | None,
        typer.Option(help="Serve the HTTP API (kiosk endpoints, CMS API) on HOST:PORT"),
    ] = None,
) -> None:
    """Run the bridge: MQTT presence and status into the remotes table.

    Without --broker it starts the embedded MQTT broker, secure by default: kiosks need
    a credential (claim or 'device enroll'), and the bridge, ops and claim passwords are
    kept in --embedded-credentials. Every option can also come from the environment
    (KB_BROKER, KB_DB, KB_LISTEN, ...); flags win.
    """
    settings = settings_or_exit(
        broker=broker,
        listen=listen,
        embedded_open=embedded_open,
        embedded_credentials=embedded_credentials,
        db=db,
        prefix=prefix,
        shared_group=shared_group,
        instance=instance,
        offline_grace_s=offline_grace,
        log_level=log_level.upper() if log_level else None,
        metrics_port=metrics_port,
        metrics_host=metrics_host,
        # In the settings, not beside them: whether the face serves decides the default
        # storage of remotes.token (Settings.security.token_storage).
        http={"listen": http} if http else None,
    )
    try:
        settings.listen_address  # noqa: B018 - validates --listen before anything starts
        check_ports(settings)
        check_database(settings.db, create=True)
    except PreflightError as exc:
        fail(str(exc), exc.code, hint=exc.hint)
    except ValueError as exc:
        fail(str(exc), ExitCode.USAGE)
    _run(settings)


def _run(settings: Settings) -> None:
    import asyncio

    from bridge.db.engine import make_engine
    from bridge.embedded_broker import PortInUseError
    from bridge.logs import configure_logging
    from bridge.service.runner import run_bridge

    configure_logging(settings.log_level)
    # DeprecationWarnings are hidden outside __main__ by default: say it where it is read.
    for renamed in settings.renamed_in_use:
        log.warning("renamed variable %s: the old name goes in the next release", renamed)
    log.info("remotes.token storage: %s", settings.security.token_storage)
    try:
        make_engine(settings.db)
        asyncio.run(run_bridge(settings, http=settings.http.listen_address))
    except KeyboardInterrupt:
        pass
    except PortInUseError as exc:
        # Taken between the preflight and the bind.
        fail(str(exc), ExitCode.USAGE)
    except ValueError as exc:
        fail(str(exc), ExitCode.USAGE)
    except Exception as exc:
        found = classify(exc)
        if debug_enabled():
            raise
        if found is not None:
            fail(found[1], found[0], hint=found[2])
        if isinstance(exc, OSError):
            fail(str(exc), ExitCode.BAD_STATE)
        raise


@db_app.command("init")
def db_init(
    db: Annotated[str | None, typer.Option(help="SQLAlchemy URL (default sqlite)")] = None,
) -> None:
    """Create the remotes table (for a new install) and the bridge's own tables."""
    from bridge.db.engine import create_schema, make_engine

    settings = settings_or_exit(db=db)
    try:
        check_database(settings.db, create=True)
    except PreflightError as exc:
        fail(str(exc), exc.code, hint=exc.hint)
    try:
        engine = make_engine(settings.db)
        created = create_schema(engine)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except Exception as exc:
        typer.echo(f"error: cannot initialise {settings.db}: {exc}", err=True)
        raise typer.Exit(1) from None
    shown = engine.url.render_as_string(hide_password=True)
    typer.echo(f"created: {', '.join(created)}" if created else f"schema up to date in {shown}")


def _help(command: Callable[..., Any]) -> str:
    """The docstring with each paragraph on one line (typer keeps single line breaks)."""
    paragraphs = inspect.cleandoc(command.__doc__ or "").split("\n\n")
    return "\n\n".join(" ".join(p.split()) for p in paragraphs)


def register(app: typer.Typer) -> None:
    app.command("run", help=_help(run))(run)
    app.add_typer(db_app, name="db")
