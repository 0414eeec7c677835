"""``kiosk-bridge run`` and ``kiosk-bridge db init``."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
from pydantic import ValidationError

from bridge.db.engine import create_schema, make_engine
from bridge.embedded_broker import PortInUseError
from bridge.http.settings import parse_listen
from bridge.logs import configure_logging
from bridge.service.runner import run_bridge
from bridge.settings import Settings, load_settings

db_app = typer.Typer(help="Database schema.", no_args_is_help=True)


def settings_or_exit(**overrides: object) -> Settings:
    try:
        return load_settings(**overrides)
    except ValidationError as exc:
        lines = [
            f"  --{'-'.join(str(p) for p in err['loc']).replace('_', '-')}: {err['msg']}"
            for err in exc.errors(include_url=False)
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

    Every option can also come from the environment (KB_BROKER, KB_DB, KB_LISTEN, ...);
    flags win.
    """
    settings = settings_or_exit(
        broker=broker,
        listen=listen,
        db=db,
        prefix=prefix,
        shared_group=shared_group,
        instance=instance,
        offline_grace_s=offline_grace,
        log_level=log_level.upper() if log_level else None,
        metrics_port=metrics_port,
        metrics_host=metrics_host,
    )
    configure_logging(settings.log_level)
    try:
        settings.listen_address  # noqa: B018 - validates --listen before anything starts
        make_engine(settings.db)
        http_address = parse_listen(http) if http else settings.http.listen_address
        asyncio.run(run_bridge(settings, http=http_address))
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


def register(app: typer.Typer) -> None:
    app.command("run")(run)
    app.add_typer(db_app, name="db")
