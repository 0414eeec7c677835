"""``kiosk-bridge conformance``: run the conformance kit against a kiosk command."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from bridge.conformance.broker import BrokerKind
from bridge.conformance.clauses import help_text

_HELP = f"""Judge a kiosk implementation (any language) against the wire contract.

The kit needs no bridge: it starts a broker (Mosquitto when installed, else the
embedded MQTT 3.1.1 broker; or uses --broker), puts a TCP proxy of its own in front of
it, plays the bridge and the CMS (commands, config), and runs the kiosk under test
twice at once: DEVICE_ID (commands, healing, clean stop, restart, kill -9) and
DEVICE_ID-b (refused reconnects, silent network). It reads the MQTT packets on the
proxy and what the broker publishes, then judges every clause below.

--kiosk-cmd is split like a shell command (no shell runs; wrap in sh -c '...' for one)
and these placeholders are filled in each word: {{host}} {{port}} (the proxy: connect
there, plain MQTT), {{device_id}}, {{state_dir}} (an empty directory per device, kept
across the restart), {{username}} (the device id) and {{password}} (empty: the kit's
broker is open; rotate_token is checked on the wire). The kiosk gets SIGTERM for a
clean stop and SIGKILL for kill -9, sent to its process group.

Exit codes: 0 every mandatory clause passed; 1 at least one failed; 2 the kiosk
command cannot run or never came online (one line says why); 3 the broker cannot
start or be reached.

Clauses checked:

{help_text()}
"""


def _keepalive_range(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*(?:-|\.\.)\s*(\d+)\s*", text)
    if match is None or int(match.group(1)) > int(match.group(2)):
        raise typer.BadParameter(
            "give LOW-HIGH in seconds, e.g. 10-30", param_hint="--keepalive-range"
        )
    return int(match.group(1)), int(match.group(2))


def conformance(
    kiosk_cmd: Annotated[
        str,
        typer.Option(
            help="The kiosk under test, with {host} {port} {device_id} {state_dir} placeholders"
        ),
    ],
    broker: Annotated[
        str | None,
        typer.Option(help="Use this mqtt://[user:pass@]host:port instead of starting one"),
    ] = None,
    broker_kind: Annotated[
        BrokerKind, typer.Option(help="The broker to start: auto, mosquitto or embedded")
    ] = BrokerKind.AUTO,
    device_id: Annotated[
        str | None, typer.Option(help="Device id of the kiosk (default: conf-<random>)")
    ] = None,
    keepalive_range: Annotated[
        str,
        typer.Option(
            help="Accepted keepalive, seconds (the contract says 10-30; a test kiosk with a "
            "short keepalive for a fast silent-network check needs e.g. 1-30)"
        ),
    ] = "10-30",
    connect_timeout: Annotated[
        float, typer.Option(min=1.0, help="Seconds the kiosk has to come online at start")
    ] = 30.0,
    json_output: Annotated[bool, typer.Option("--json", help="Print the report as JSON")] = False,
    work_dir: Annotated[
        Path | None,
        typer.Option(help="Keep the kiosks' logs and state here (default: a temporary dir)"),
    ] = None,
) -> None:
    import asyncio
    import shutil
    import tempfile
    import uuid

    from rich.console import Console

    from bridge.conformance.report import (
        EXIT_BROKER,
        EXIT_KIOSK_CMD,
        as_dict,
        exit_code,
        print_table,
        to_json,
    )
    from bridge.conformance.runner import KitError, KitOptions, run_kit
    from bridge.conformance.verdicts import judge
    from schemas import InvalidDeviceId, validate_device_id

    low_high = _keepalive_range(keepalive_range)
    device = device_id or f"conf-{uuid.uuid4().hex[:8]}"
    try:
        validate_device_id(device)
        validate_device_id(f"{device}-b")
    except InvalidDeviceId as exc:
        raise typer.BadParameter(str(exc), param_hint="--device-id") from None
    directory = work_dir or Path(tempfile.mkdtemp(prefix="kb-conformance-"))
    directory.mkdir(parents=True, exist_ok=True)
    options = KitOptions(
        kiosk_cmd=kiosk_cmd,
        work_dir=directory,
        device_id=device,
        broker_url=broker,
        broker_kind=broker_kind,
        keepalive_range=low_high,
        connect_timeout_s=connect_timeout,
    )
    try:
        try:
            run = asyncio.run(run_kit(options))
        except KitError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(EXIT_BROKER if exc.code == 3 else EXIT_KIOSK_CMD) from None
        verdicts = judge(run.observations)
        report = as_dict(
            verdicts,
            kiosk_cmd=kiosk_cmd,
            device_id=device,
            broker=run.broker,
            duration_s=run.duration_s,
        )
        if json_output:
            typer.echo(to_json(report))
        else:
            print_table(report, Console())
        raise typer.Exit(exit_code(verdicts))
    finally:
        if work_dir is None:
            shutil.rmtree(directory, ignore_errors=True)


conformance.__doc__ = _HELP


def register(app: typer.Typer) -> None:
    """Add ``conformance`` to ``app``."""
    # One line per paragraph: the help renderer rewraps lines but keeps their breaks.
    paragraphs = _HELP.strip().split("\n\n")
    app.command("conformance", help="\n\n".join(" ".join(p.split()) for p in paragraphs))(
        conformance
    )
