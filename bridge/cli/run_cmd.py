"""``kiosk-bridge run`` and ``kiosk-bridge db init``."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from bridge.db.engine import create_schema, make_engine
from bridge.embedded_broker import PortInUseError
from bridge.logs import configure_logging
from bridge.service.runner import run_bridge
from bridge.settings import Settings, load_settings, setting_name

db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
log = logging.getLogger(__name__)


def settings_or_exit(**overrides: object) -> Settings:
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
    configure_logging(settings.log_level)
    # DeprecationWarnings are hidden outside __main__ by default: say it where it is read.
    for renamed in settings.renamed_in_use:
        log.warning("renamed variable %s: the old name goes in the next release", renamed)
    log.info("remotes.token storage: %s", settings.security.token_storage)
    try:
        settings.listen_address  # noqa: B018 - validates --listen before anything starts
        make_engine(settings.db)
        asyncio.run(run_bridge(settings, http=settings.http.listen_address))
    except (PortInUseError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        pass


@db_app.command("init")
def db_init(
    db: Annotated[str | None, typer.Option(help="SQLAlchemy URL (default sqlite)")] = None,
) -> None:
    """Create the remotes table (for a new install) and the bridge's own tables."""
    settings = settings_or_exit(db=db)
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
