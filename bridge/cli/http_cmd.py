"""``kiosk-bridge http``: the OpenAPI document of the HTTP face."""

from __future__ import annotations

from pathlib import Path

import typer

_ROOT_HELP = "Repository root that holds docs/."


def openapi(
    root: Path = typer.Option(Path(), "--root", help=_ROOT_HELP, file_okay=False),
    check: bool = typer.Option(False, "--check", help="Exit 1 if the committed file drifted"),
) -> None:
    """Write docs/openapi.json from the app (or, with --check, compare)."""
    # Imported here: the app pulls in FastAPI, which every other command can do without.
    from bridge.http.openapi import OPENAPI_FILE, openapi_drift, write_openapi

    if not check:
        typer.echo(f"wrote {write_openapi(root)}")
        return
    drift = openapi_drift(root)
    if drift is None:
        typer.echo(f"{OPENAPI_FILE.as_posix()} matches the app")
        return
    typer.echo(drift.rstrip("\n"), err=True)
    typer.echo(
        f"{OPENAPI_FILE.as_posix()} drifted from the app; run `kiosk-bridge http openapi` "
        "and commit the result",
        err=True,
    )
    raise typer.Exit(code=1)


def register(app: typer.Typer) -> None:
    group = typer.Typer(
        name="http", help="The HTTP API (kiosk endpoints, CMS API).", no_args_is_help=True
    )
    group.command("openapi")(openapi)
    app.add_typer(group, name="http")
