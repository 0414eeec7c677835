"""``kiosk-bridge demo``."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from bridge.demo import DemoOptions, run_demo
from bridge.logs import configure_logging


def demo(
    duration: Annotated[float, typer.Option(help="Seconds to run", min=5)] = 30.0,
    devices: Annotated[int, typer.Option(help="Simulated kiosks", min=1, max=2000)] = 20,
    db: Annotated[Path, typer.Option(help="SQLite file to create or reuse")] = Path(
        "kiosk-bridge-demo.db"
    ),
) -> None:
    """Run the embedded broker, the bridge and a simulated fleet with a few faults."""
    configure_logging("ERROR")
    try:
        asyncio.run(
            run_demo(DemoOptions(devices=devices, duration_s=duration, db_path=db), Console())
        )
    except KeyboardInterrupt:
        typer.echo("interrupted")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
