"""A real RabbitMQ node with the MQTT plugin, as a child process of a test.

Everything the node touches is its own: a node name, the AMQP, distribution and MQTT
ports (free loopback ports), the Mnesia and log directories, the enabled-plugins file,
the config file and the Erlang cookie (``HOME`` is a temporary directory). The system
node on 5672 is never used. ``rabbitmqctl`` runs with the same environment, so it
reaches this node only. Start-up takes several seconds: start one node per test module.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from bridge.testing.managed import StartStop
from bridge.testing.ports import free_port, port_accepts

READY_TIMEOUT_S = 90.0


class RabbitMQNotFound(FileNotFoundError):
    """No ``rabbitmq-server`` on ``PATH`` or in ``/usr/sbin``."""


class RabbitMQStartError(RuntimeError):
    """The node exited or did not open its MQTT port in time (message: its log tail)."""


#: Debian's ``/usr/sbin`` wrappers switch to the ``rabbitmq`` user with ``su``, which
#: resets ``HOME`` (and so the Erlang cookie) to the system node's: the scripts behind
#: them run as the caller with the environment given here.
_LIB_BIN = Path("/usr/lib/rabbitmq/bin")


def _find(name: str) -> str:
    direct = _LIB_BIN / name
    found = str(direct) if direct.exists() else shutil.which(name)
    if found is None:
        raise RabbitMQNotFound(f"{name} not found: install rabbitmq-server 3.10+")
    return found


class RabbitMQNode(StartStop):
    def __init__(self) -> None:
        self._server = _find("rabbitmq-server")
        self._ctl = _find("rabbitmqctl")
        self.root = Path(tempfile.mkdtemp(prefix="kb-rabbit-"))
        self.name = f"kbtest-{uuid.uuid4().hex[:8]}@localhost"
        self.amqp_port = free_port()
        self.dist_port = free_port()
        self.mqtt_port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def mqtt_url(self) -> str:
        return f"mqtt://127.0.0.1:{self.mqtt_port}"

    def url(self, username: str, password: str) -> str:
        return f"mqtt://{username}:{password}@127.0.0.1:{self.mqtt_port}"

    def env(self) -> dict[str, str]:
        home = self.root / "home"
        return {
            **os.environ,
            "HOME": str(home),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.root / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.root / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.root / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.root / "rabbitmq.conf"),
            "RABBITMQ_PID_FILE": str(self.root / "node.pid"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.root / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(self.root / "rabbitmq-env.conf"),
            "RABBITMQ_FEATURE_FLAGS_FILE": str(self.root / "feature_flags"),
            "RABBITMQ_PLUGINS_EXPAND_DIR": str(self.root / "plugins-expand"),
            "RABBITMQ_QUORUM_DIR": str(self.root / "quorum"),
            "RABBITMQ_STREAM_DIR": str(self.root / "stream"),
            # Never into the working directory.
            "ERL_CRASH_DUMP": str(self.root / "erl_crash.dump"),
        }

    def _write_files(self) -> None:
        home = self.root / "home"
        for sub in (home, self.root / "mnesia", self.root / "log"):
            sub.mkdir(parents=True, exist_ok=True)
        cookie = home / ".erlang.cookie"
        cookie.write_text(uuid.uuid4().hex.upper())
        cookie.chmod(0o400)
        (self.root / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        (self.root / "advanced.config").write_text("[].\n")
        (self.root / "rabbitmq-env.conf").write_text("")
        (self.root / "rabbitmq.conf").write_text(
            "\n".join(
                [
                    f"listeners.tcp.default = 127.0.0.1:{self.amqp_port}",
                    f"mqtt.listeners.tcp.default = 127.0.0.1:{self.mqtt_port}",
                    # Devices authenticate with their own users (see add_device_user);
                    # the guest user stays loopback-only, as shipped.
                    "mqtt.allow_anonymous = false",
                    "mqtt.vhost = /",
                    "mqtt.exchange = amq.topic",
                    # The bridge and kiosks keep sessions across reconnects.
                    "mqtt.subscription_ttl = 86400000",
                    "mqtt.prefetch = 100",
                    "log.file.level = info",
                    "log.console = false",
                ]
            )
            + "\n"
        )

    def start(self, timeout: float = READY_TIMEOUT_S) -> None:
        self._write_files()
        log = (self.root / "server.out").open("ab")
        try:
            self._proc = subprocess.Popen(
                [self._server],
                env=self.env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                # Its own process group: the script's erl and beam children stop with it.
                start_new_session=True,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while not port_accepts("127.0.0.1", self.mqtt_port):
            if self._proc.poll() is not None:
                raise RabbitMQStartError(f"rabbitmq-server exited:\n{self._tail()}")
            if time.monotonic() > deadline:
                raise RabbitMQStartError(f"no MQTT port after {timeout:.0f}s:\n{self._tail()}")
            time.sleep(0.2)

    def ctl(self, *args: str) -> str:
        """``rabbitmqctl -n NODE ...`` against this node; raises on failure."""
        done = subprocess.run(
            [self._ctl, "-n", self.name, *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {done.stderr or done.stdout}")
        return done.stdout

    def add_user(self, username: str, password: str, *, tags: str = "") -> None:
        self.ctl("add_user", username, password)
        if tags:
            self.ctl("set_user_tags", username, tags)
        # Queue and binding rights for the user's own MQTT session queues.
        self.ctl("set_permissions", "-p", "/", username, ".*", ".*", ".*")

    def set_topic_permissions(self, username: str, write: str, read: str) -> None:
        """Topic authorisation on ``amq.topic`` (routing keys: MQTT ``/`` is ``.``)."""
        self.ctl("set_topic_permissions", "-p", "/", username, "amq.topic", write, read)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        if proc is not None:
            # erl's children outlive the script's exit in their group: end the group.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)

    def _tail(self, lines: int = 40) -> str:
        texts = []
        for path in [self.root / "server.out", *sorted((self.root / "log").glob("*.log"))]:
            try:
                texts.append("\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
            except OSError:
                continue
        return "\n".join(texts) or "(no log)"


__all__ = ["RabbitMQNode", "RabbitMQNotFound", "RabbitMQStartError"]
