"""``kiosk-bridge schema``: write and check the artefacts derived from the contract."""

from __future__ import annotations

from pathlib import Path

import typer

_ROOT_HELP = "Repository root that holds schemas/json/ and docs/."


def export(
    root: Path = typer.Option(Path(), "--root", help=_ROOT_HELP, file_okay=False),
) -> None:
    """Write the JSON Schemas to schemas/json/ and the AsyncAPI document to docs/."""
    from schemas.export import write_all

    for path in write_all(root):
        typer.echo(f"wrote {path}")


def check(
    root: Path = typer.Option(Path(), "--root", help=_ROOT_HELP, file_okay=False),
) -> None:
    """Exit 1 if the committed JSON Schemas or AsyncAPI document differ from the models."""
    from schemas.export import find_drift

    drift = find_drift(root)
    if not drift:
        typer.echo("schemas/json/ and docs/asyncapi.yaml match the models")
        return
    for item in drift:
        typer.echo(f"{item.problem}: {item.path.as_posix()}", err=True)
        if item.diff:
            typer.echo(item.diff.rstrip("\n"), err=True)
    typer.echo(
        f"{len(drift)} generated file(s) drifted from the models; "
        "run `kiosk-bridge schema export` and commit the result",
        err=True,
    )
    raise typer.Exit(code=1)


def register(app: typer.Typer) -> None:
    """Add the ``schema`` command group to ``app``."""
    group = typer.Typer(
        name="schema",
        help="JSON Schemas and AsyncAPI document derived from the wire contract.",
        no_args_is_help=True,
    )
    group.command("export")(export)
    group.command("check")(check)
    app.add_typer(group, name="schema")
