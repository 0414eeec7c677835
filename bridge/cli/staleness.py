"""The views of device states say when those states may be stale.

``devices``, ``device show``, ``top`` and ``uptime`` read the states the bridge wrote. If
no bridge is writing any more (killed, stopped, cut off), the states are frozen and
would look as fine as live ones: each of them asks :func:`check` before answering,
prints the warning to stderr (their ``--json`` output keeps its shape) and exits with
:data:`bridge.exit_codes.ExitCode.STALE` (4) after its output.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from bridge.exit_codes import ExitCode

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from bridge.db.fleet_health import FleetHealth


def check(engine: Engine, stale_after_ms: int) -> FleetHealth:
    """Blocking: the fleet's liveness now; the warning, if any, goes to stderr."""
    from bridge.clock import now_ms
    from bridge.db.fleet_health import read_fleet_health

    health = read_fleet_health(engine, now_ms(), stale_after_ms)
    warning = health.warning()
    if warning is not None:
        typer.secho(f"warning: {warning}", err=True, fg="yellow", bold=True)
    return health


def exit_if_stale(health: FleetHealth) -> None:
    """After the output: exit 4 when the states may be stale."""
    if not health.live:
        raise typer.Exit(int(ExitCode.STALE))
