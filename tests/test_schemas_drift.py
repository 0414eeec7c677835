"""The committed JSON Schemas and AsyncAPI document equal what the models generate."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from bridge.cli.schema_cmd import register
from schemas.export import ASYNCAPI_FILE, JSON_DIR, rendered_files

ROOT = Path(__file__).resolve().parents[1]
FIX = "run `kiosk-bridge schema export` and commit the result"


@pytest.mark.parametrize("relative", sorted(rendered_files()), ids=lambda p: p.as_posix())
def test_committed_file_matches_the_models(relative: Path) -> None:
    path = ROOT / relative
    assert path.is_file(), f"{relative} is missing: {FIX}"
    expected = rendered_files()[relative].encode("utf-8")
    assert path.read_bytes() == expected, f"{relative} drifted from the models: {FIX}"


def test_no_stale_files_are_committed() -> None:
    # Any file at all, not only *.json: the directory holds generated files only.
    committed = {path.name for path in (ROOT / JSON_DIR).iterdir()}
    generated = {path.name for path in rendered_files() if path.parent == JSON_DIR}
    assert committed == generated, f"schemas/json/ differs from the models: {FIX}"
    assert (ROOT / ASYNCAPI_FILE).is_file()


# --- the CLI ---------------------------------------------------------------------------------


@pytest.fixture
def cli() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def test_export_then_check_passes(cli: typer.Typer, tmp_path: Path) -> None:
    runner = CliRunner()
    exported = runner.invoke(cli, ["schema", "export", "--root", str(tmp_path)])
    assert exported.exit_code == 0, exported.output
    for relative in rendered_files():
        assert (tmp_path / relative).is_file()
        assert relative.as_posix() in exported.output
    checked = runner.invoke(cli, ["schema", "check", "--root", str(tmp_path)])
    assert checked.exit_code == 0, checked.output


def test_check_names_a_changed_file(cli: typer.Typer, tmp_path: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(cli, ["schema", "export", "--root", str(tmp_path)]).exit_code == 0
    status = tmp_path / JSON_DIR / "status.json"
    status.write_text(status.read_text().replace('"battery_level"', '"battery"'))
    result = runner.invoke(cli, ["schema", "check", "--root", str(tmp_path)])
    assert result.exit_code == 1
    assert "changed: schemas/json/status.json" in result.output
    assert '"battery_level"' in result.output  # the diff shows what the models say
    assert "kiosk-bridge schema export" in result.output
    assert "ack.json" not in result.output


def test_check_names_missing_and_stale_files(cli: typer.Typer, tmp_path: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(cli, ["schema", "export", "--root", str(tmp_path)]).exit_code == 0
    (tmp_path / ASYNCAPI_FILE).unlink()
    stale = tmp_path / JSON_DIR / "heartbeat.json"
    stale.write_text("{}\n")
    result = runner.invoke(cli, ["schema", "check", "--root", str(tmp_path)])
    assert result.exit_code == 1
    assert "missing: docs/asyncapi.yaml" in result.output
    assert "unexpected: schemas/json/heartbeat.json" in result.output
    assert "2 generated file(s) drifted" in result.output
    # export repairs both: it writes what is missing and removes what is stale.
    assert runner.invoke(cli, ["schema", "export", "--root", str(tmp_path)]).exit_code == 0
    assert not stale.exists()
    assert runner.invoke(cli, ["schema", "check", "--root", str(tmp_path)]).exit_code == 0


def test_check_on_an_empty_root_fails(cli: typer.Typer, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["schema", "check", "--root", str(tmp_path)])
    assert result.exit_code == 1
    assert result.output.count("missing: ") == len(rendered_files())


def test_wired_app_checks_the_repository() -> None:
    from bridge.cli import app

    result = CliRunner().invoke(app, ["schema", "check", "--root", str(ROOT)])
    assert result.exit_code == 0, result.output
    assert "match the models" in result.output
