"""``kiosk-bridge demo``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bridge.cli.common import fail
from bridge.cli.preflight import PreflightError, check_database


def demo(
    duration: Annotated[float, typer.Option(help="Seconds to run", min=5)] = 30.0,
    devices: Annotated[int, typer.Option(help="Simulated kiosks", min=1, max=2000)] = 20,
    db: Annotated[Path, typer.Option(help="SQLite file to create or reuse")] = Path(
        "kiosk-bridge-demo.db"
    ),
) -> None:
    """Run the embedded broker, the bridge and a simulated fleet with a few faults.

    Each fault is announced as it is injected. The broker's passwords live in a
    temporary directory removed at the end; the database stays for a look around.
    """
    try:
        check_database(f"sqlite:///{db}", create=True)
    except PreflightError as exc:
        fail(
            str(exc), exc.code, hint=exc.hint.replace("--db / KB_DB", "--db") if exc.hint else None
        )
    # The whole system: imported when it runs, not for every command's start-up.
    import asyncio

    from rich.console import Console

    from bridge.demo import DemoOptions, run_demo
    from bridge.logs import configure_logging

    configure_logging("ERROR")
    try:
        asyncio.run(
            run_demo(DemoOptions(devices=devices, duration_s=duration, db_path=db), Console())
        )
    except KeyboardInterrupt:
        typer.echo("interrupted")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
