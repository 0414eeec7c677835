"""docker-compose.yml, checked without a Docker engine: it parses, every service has a
healthcheck, what it mounts and copies exists in the repository, every kiosk-bridge
command it runs is a real command of the CLI with real options, and the broker's
healthcheck command works against a broker started from the same production config."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import click
import pytest
import typer
import yaml
from typer.testing import CliRunner

from bridge.cli import app as cli_app
from bridge.cli import ops_cmd, security_cmd

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
# Compose's own substitution; "$${VAR}" is an escape for the container's shell.
_VAR = re.compile(r"(?<!\$)\$\{([A-Z_]+)(?::\?[^}]*)?\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(loaded, dict)
    return loaded


def _services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    services = compose["services"]
    assert isinstance(services, dict) and services
    return services


def test_services_and_profiles(compose: dict[str, Any]) -> None:
    services = _services(compose)
    assert {"mosquitto", "mariadb", "bridge", "fleet", "broker-init"} <= set(services)
    assert services["fleet"]["profiles"] == ["fleet"]
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        image = service.get("image", "")
        assert not image.endswith(":latest") and (":" in image or "build" in service), name
        for dependency in service.get("depends_on", {}):
            assert dependency in services, (name, dependency)


def test_every_service_has_a_real_healthcheck(compose: dict[str, Any]) -> None:
    for name, service in _services(compose).items():
        check = service.get("healthcheck")
        assert isinstance(check, dict), name
        assert not check.get("disable", False), name
        test = check["test"]
        assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, name


def test_mounted_and_copied_paths_exist(compose: dict[str, Any]) -> None:
    named = set(compose.get("volumes", {}))
    for name, service in _services(compose).items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), (name, source)
            else:
                assert source in named, (name, source)
        build = service.get("build")
        if build:
            assert (ROOT / build["context"]).is_dir()
            for line in build["dockerfile_inline"].splitlines():
                parts = line.split()
                if parts and parts[0] == "COPY":
                    for source in parts[1:-1]:
                        assert (ROOT / build["context"] / source).exists(), (name, source)
    # The broker really reads what is mounted.
    conf = (ROOT / "mosquitto" / "mosquitto.conf").read_text()
    assert "acl_file /mosquitto/config/acl" in conf
    assert "plugin_opt_config_file /mosquitto/data/dynamic-security.json" in conf


def test_secrets_come_from_the_environment(compose: dict[str, Any]) -> None:
    text = COMPOSE.read_text()
    used = set(_VAR.findall(text))
    assert {"KB_BRIDGE_PASSWORD", "KB_OPS_PASSWORD", "KB_CLAIM_PASSWORD"} <= used
    # Every ${VAR} must be set: "${VAR:?message}" fails fast instead of an empty password.
    assert all(match.group(0).startswith(f"${{{match.group(1)}:?") for match in _VAR.finditer(text))
    assert "password=" not in text.lower()


# --- the commands --------------------------------------------------------------------------


def _kiosk_bridge_argvs(command: list[str] | str) -> list[list[str]]:
    """Every ``kiosk-bridge ...`` invocation in a service command (argv list or sh -c)."""
    argv = command if isinstance(command, list) else shlex.split(command)
    if argv[:2] == ["sh", "-c"]:
        found = []
        for part in re.split(r"&&|;|\|\|", argv[2]):
            words = shlex.split(part.replace("$$", "$"))
            if words and words[0] == "exec":
                words = words[1:]
            if words and words[0] == "kiosk-bridge":
                found.append(words[1:])
        return found
    return [argv[1:]] if argv and argv[0] == "kiosk-bridge" else []


def _security_app() -> typer.Typer:
    # Until bridge/cli/__init__.py registers security_cmd, its commands are looked up here.
    app = typer.Typer()
    ops_cmd.register(app)
    security_cmd.register(app)
    return app


def _resolve(args: list[str]) -> tuple[click.Command, list[str], list[str]] | None:
    for app in (cli_app, _security_app()):
        command: click.Command = typer.main.get_command(app)
        path: list[str] = []
        rest = list(args)
        while isinstance(command, click.Group) and rest and rest[0] in command.commands:
            path.append(rest[0])
            command = command.commands[rest.pop(0)]
        if not isinstance(command, click.Group):
            return command, path, rest
    return None


def test_commands_are_real_cli_commands(compose: dict[str, Any]) -> None:
    checked = 0
    for name, service in _services(compose).items():
        command = service.get("command")
        if command is None:
            continue
        for args in _kiosk_bridge_argvs(command):
            resolved = _resolve(args)
            assert resolved is not None, (name, args)
            command_obj, path, rest = resolved
            # Parsing (not running) the arguments checks every option name and value type.
            command_obj.make_context(" ".join(["kiosk-bridge", *path]), list(rest))
            checked += 1
    assert checked >= 4


def test_commands_answer_help_through_the_cli(compose: dict[str, Any]) -> None:
    runner = CliRunner()
    for service in _services(compose).values():
        if "command" not in service:
            continue
        for args in _kiosk_bridge_argvs(service["command"]):
            resolved = _resolve(args)
            assert resolved is not None
            _command, path, _rest = resolved
            app = cli_app if _resolve_in(cli_app, path) else _security_app()
            result = runner.invoke(app, [*path, "--help"])
            assert result.exit_code == 0, (path, result.output)


def _resolve_in(app: typer.Typer, path: list[str]) -> bool:
    command: click.Command = typer.main.get_command(app)
    for word in path:
        if not isinstance(command, click.Group) or word not in command.commands:
            return False
        command = command.commands[word]
    return True


def test_broker_healthcheck_command_works_against_the_production_config(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    if shutil.which("mosquitto_sub") is None:
        pytest.skip("mosquitto_sub (mosquitto-clients) is not installed")
    from bridge.testing.mosquitto import MosquittoNotFound
    from bridge.testing.secure_broker import secure_broker
    from tests.support.services import service_unavailable

    try:
        broker = secure_broker(tmp_path).start()
    except MosquittoNotFound as exc:
        service_unavailable(str(exc))
    try:
        shell = _services(compose)["mosquitto"]["healthcheck"]["test"][1]
        shell = shell.replace("$$", "$").replace("-p 1883", f"-p {broker.port}")
        env = {"KB_OPS_PASSWORD": broker.secrets.ops_password, "PATH": "/usr/bin:/bin"}
        done = subprocess.run(["sh", "-c", shell], env=env, capture_output=True, timeout=20)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().endswith(b"seconds")
        env["KB_OPS_PASSWORD"] = "wrong-password"
        refused = subprocess.run(["sh", "-c", shell], env=env, capture_output=True, timeout=20)
        assert refused.returncode != 0
    finally:
        broker.kill()
