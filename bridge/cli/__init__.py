"""The ``kiosk-bridge`` command line: one module per command group, composed here."""

from __future__ import annotations

from typing import Annotated

import typer

from bridge._compat.typer import hide_flag_types, set_debug
from bridge.cli import (
    commands_cmd,
    conformance_cmd,
    demo_cmd,
    http_cmd,
    kiosk_cmd,
    ops_cmd,
    run_cmd,
    schema_cmd,
    security_cmd,
    send_cmd,
)

hide_flag_types()

app = typer.Typer(
    name="kiosk-bridge",
    help="Truthful kiosk presence and tracked commands over MQTT, bridged into the CMS.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def main(
    ctx: typer.Context,
    debug: Annotated[
        bool,
        typer.Option(
            "--debug",
            envvar="KB_DEBUG",
            help="Show the Python traceback of a failure instead of one line (env KB_DEBUG=1)",
        ),
    ] = False,
) -> None:
    """Truthful kiosk presence and tracked commands over MQTT, bridged into the CMS."""
    set_debug(ctx, debug)


# security_cmd adds to the ``device`` group that ops_cmd creates: keep it after.
for module in (
    demo_cmd,
    run_cmd,
    send_cmd,
    ops_cmd,
    commands_cmd,
    security_cmd,
    kiosk_cmd,
    schema_cmd,
    http_cmd,
    conformance_cmd,
):
    module.register(app)

__all__ = ["app"]
