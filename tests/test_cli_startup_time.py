"""The CLI starts fast: ``--help`` of the root, ``devices`` and ``send`` in real processes
import none of the heavy stacks; and no flag shows ``<bool>``.

How long they take is measured beside a floor by ``bench/cli_startup.py``, not asserted
here: a shared machine's load moves a start-up by more than the margin a budget has."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
import typer.main
from typer.testing import CliRunner

from bridge.cli import app
from bridge.ops import choices, doctor, fleet

KIOSK_BRIDGE = str(Path(sys.executable).with_name("kiosk-bridge"))
#: Libraries a --help has no use for; each costs 0.1-0.5 s to import.
HEAVY = ("sqlalchemy", "sqlmodel", "fastapi", "aiomqtt", "paho", "pydantic_settings", "amqtt")
HELPS = (("--help",), ("devices", "--help"), ("send", "--help"))


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("KB_")}


@pytest.mark.parametrize("args", HELPS, ids=" ".join)
def test_help_imports_no_heavy_library(args: tuple[str, ...]) -> None:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", KIOSK_BRIDGE, *args],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()}
    heavy = sorted(m for m in imported if m.split(".")[0] in HEAVY)
    assert heavy == [], f"kiosk-bridge {' '.join(args)} imports {heavy[:10]}"


def _commands(
    group: typer.main.TyperGroup, path: tuple[str, ...] = ()
) -> Iterator[tuple[str, ...]]:
    ctx = typer.Context(group)
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if command is None:
            continue
        yield (*path, name)
        if isinstance(command, typer.main.TyperGroup):
            yield from _commands(command, (*path, name))


def test_no_flag_shows_a_bool_type() -> None:
    root = typer.main.get_command(app)
    assert isinstance(root, typer.main.TyperGroup)
    every = [(), *_commands(root)]
    assert len(every) > 20
    for path in every:
        result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, (path, result.output)
        assert "<bool>" not in result.output, " ".join(path)
    # Options that take a value still say which.
    devices = CliRunner().invoke(app, ["devices", "--help"], env={"COLUMNS": "200"})
    assert "--interval" in devices.output and "<float range>" in devices.output


def test_the_import_free_choices_match_their_modules() -> None:
    assert choices.DEFAULT_SKEW_THRESHOLD_MS == doctor.DEFAULT_SKEW_THRESHOLD_MS
    assert fleet.STATES is choices.STATES and fleet.SORT_KEYS is choices.SORT_KEYS
