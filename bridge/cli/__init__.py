"""The ``kiosk-bridge`` command line: one module per command group, composed here."""

from __future__ import annotations

import typer

from bridge.cli import (
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

app = typer.Typer(
    name="kiosk-bridge",
    help="Truthful kiosk presence and tracked commands over MQTT, bridged into the CMS.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

# security_cmd adds to the ``device`` group that ops_cmd creates: keep it after.
for module in (
    demo_cmd,
    run_cmd,
    send_cmd,
    ops_cmd,
    security_cmd,
    kiosk_cmd,
    schema_cmd,
    http_cmd,
    conformance_cmd,
):
    module.register(app)

__all__ = ["app"]
