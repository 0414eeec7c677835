"""Mosquitto with the production security model, for tests and local experiments.

``secure_broker(data_dir)`` returns a :class:`bridge.testing.MosquittoProcess` (not yet
started) configured from ``mosquitto/secure.conf`` plus the three lines that depend on
the machine: the dynamic-security plugin, its credential file (bootstrapped here with
random passwords) and the ACL pattern file.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import secrets
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bridge.broker_url import parse_broker_url
from bridge.security.acl import StaticUsers
from bridge.security.bootstrap import BootstrapSecrets, write_dynsec_config
from bridge.security.runtime import SecurityRuntime
from bridge.security.settings import SecuritySettings
from bridge.service.app import Bridge
from bridge.settings import Settings
from bridge.testing.mosquitto import MosquittoNotFound, MosquittoProcess

_MOSQUITTO_DIR = Path(__file__).resolve().parents[2] / "mosquitto"
SECURE_TEMPLATE = _MOSQUITTO_DIR / "secure.conf"
PRODUCTION_CONF = _MOSQUITTO_DIR / "mosquitto.conf"
ACL_FILE = _MOSQUITTO_DIR / "acl"
DYNSEC_FILE = "dynamic-security.json"
_PLUGIN_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",
    "/usr/local/lib/mosquitto_dynamic_security.so",
)


def find_dynsec_plugin() -> Path:
    """``$MOSQUITTO_DYNSEC_PLUGIN`` if set, else the usual install locations."""
    explicit = os.environ.get("MOSQUITTO_DYNSEC_PLUGIN")
    for candidate in [explicit] if explicit else _PLUGIN_CANDIDATES:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise MosquittoNotFound(
        "mosquitto_dynamic_security.so not found; install mosquitto 2.x or set "
        "MOSQUITTO_DYNSEC_PLUGIN"
    )


def random_secrets(users: StaticUsers | None = None) -> BootstrapSecrets:
    return BootstrapSecrets(
        bridge_password=secrets.token_urlsafe(24),
        ops_password=secrets.token_urlsafe(24),
        claim_password=secrets.token_urlsafe(24),
        users=users or StaticUsers(),
    )


def security_conf_lines(data_dir: Path, acl_file: Path = ACL_FILE) -> str:
    return "\n".join(
        [
            f"acl_file {acl_file}",
            f"plugin {find_dynsec_plugin()}",
            f"plugin_opt_config_file {Path(data_dir) / DYNSEC_FILE}",
        ]
    )


@dataclass
class SecureBroker:
    """A Mosquitto process plus the fixed principals' credentials."""

    process: MosquittoProcess
    secrets: BootstrapSecrets = field(default_factory=random_secrets)
    scheme: str = "mqtt"
    #: Another listener of the same process (a TLS one added with ``extra_conf``).
    listener_port: int | None = None

    @property
    def users(self) -> StaticUsers:
        return self.secrets.users

    @property
    def host(self) -> str:
        return self.process.host

    @property
    def port(self) -> int:
        return self.listener_port if self.listener_port is not None else self.process.port

    def url(self, username: str | None = None, password: str | None = None) -> str:
        if username is None:
            return f"{self.scheme}://{self.host}:{self.port}"
        auth = quote(username, safe="")
        if password is not None:
            auth += ":" + quote(password, safe="")
        return f"{self.scheme}://{auth}@{self.host}:{self.port}"

    @property
    def bridge_url(self) -> str:
        return self.url(self.users.bridge, self.secrets.bridge_password)

    @property
    def ops_url(self) -> str:
        return self.url(self.users.ops, self.secrets.ops_password)

    @property
    def claim_url(self) -> str:
        return self.url(self.users.claim, self.secrets.claim_password)

    def start(self) -> SecureBroker:
        self.process.start()
        return self

    def stop(self) -> None:
        self.process.stop()

    def kill(self) -> None:
        self.process.kill()


def secure_broker(
    data_dir: Path,
    *,
    secrets_: BootstrapSecrets | None = None,
    extra_conf: str = "",
    template: Path = SECURE_TEMPLATE,
    **process: Any,
) -> SecureBroker:
    """A not yet started broker with a fresh credential file in ``data_dir``."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    chosen = secrets_ or random_secrets()
    write_dynsec_config(data_dir / DYNSEC_FILE, chosen, overwrite=True)
    conf = security_conf_lines(data_dir) + ("\n" + extra_conf if extra_conf.strip() else "")
    broker = MosquittoProcess(data_dir, extra_conf=conf, template=template, **process)
    return SecureBroker(broker, chosen)


class AuthClient:
    """A paho client with credentials that records messages, SUBACK and PUBACK codes.

    No automatic reconnect: a kicked or refused client stays down, so a test sees it.
    """

    def __init__(
        self,
        url: str,
        *,
        client_id: str,
        v5: bool = True,
        will: tuple[str, bytes] | None = None,
        clean: bool = True,
        ca_file: str | None = None,
    ) -> None:
        address = parse_broker_url(url)
        self.address = address
        self.client_id = client_id
        self.messages: queue.Queue[tuple[str, bytes, bool]] = queue.Queue()
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.disconnected_at: float | None = None
        self.connack: Any = None
        #: Messages :meth:`expect` passed over on its way to the one it waited for.
        self.skipped: list[tuple[str, bytes, bool]] = []
        self._acks: queue.Queue[Any] = queue.Queue()
        self._subacks: queue.Queue[list[Any]] = queue.Queue()
        kwargs: dict[str, Any] = {} if v5 else {"clean_session": clean}
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            reconnect_on_failure=False,
            **kwargs,
        )
        if address.username is not None:
            self._client.username_pw_set(address.username, address.password)
        if will is not None:
            self._client.will_set(will[0], will[1], qos=1, retain=True)
        if address.tls:
            self._client.tls_set(ca_certs=ca_file)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = lambda _c, _u, m: self.messages.put(
            (m.topic, bytes(m.payload), bool(m.retain))
        )
        self._client.on_publish = lambda _c, _u, _mid, rc, _p: self._acks.put(rc)
        self._client.on_subscribe = lambda _c, _u, _mid, rcs, _p: self._subacks.put(list(rcs))

    def _on_connect(self, _c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        self.connack = rc
        self.connected.set()

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, _rc: Any, _p: Any) -> None:
        self.disconnected_at = time.monotonic()
        self.disconnected.set()

    @property
    def paho(self) -> Any:
        return self._client

    def connect(self, timeout: float = 10.0) -> AuthClient:
        """Connect; raises ``ConnectionRefusedError`` with the CONNACK reason if refused."""
        self._client.connect(self.address.host, self.address.port, keepalive=30)
        self._client.loop_start()
        if not self.connected.wait(timeout):
            raise TimeoutError(f"{self.client_id}: no CONNACK")
        if self.connack.is_failure:
            raise ConnectionRefusedError(str(self.connack))
        return self

    def subscribe(self, topic: str, timeout: float = 10.0) -> list[Any]:
        self._client.subscribe(topic, qos=1)
        return self._subacks.get(timeout=timeout)

    def publish(
        self, topic: str, payload: bytes, *, retain: bool = False, timeout: float = 10.0
    ) -> Any:
        """Publish at QoS 1; returns the PUBACK reason code (MQTT 5 tells "Not authorized")."""
        self._client.publish(topic, payload, qos=1, retain=retain)
        return self._acks.get(timeout=timeout)

    def expect(self, topic: str, timeout: float = 10.0) -> tuple[str, bytes, bool]:
        """The next message on ``topic``; others on the way go to :attr:`skipped`."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.client_id}: nothing on {topic!r} in {timeout}s")
            try:
                message = self.messages.get(timeout=remaining)
            except queue.Empty:
                continue
            if message[0] == topic:
                return message
            self.skipped.append(message)

    def drop(self) -> None:
        """Vanish without DISCONNECT (the broker publishes the Will)."""
        self._client.loop_stop()
        sock: Any = self._client.socket()  # a socket.socket; paho types it as "socket-like"
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._client.disconnect()
        self._client.loop_stop()
        sock = self._client.socket()
        if sock is not None:
            sock.close()
        for name in ("on_connect", "on_disconnect", "on_message", "on_publish", "on_subscribe"):
            setattr(self._client, name, None)

    def __enter__(self) -> AuthClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


@contextlib.asynccontextmanager
async def running_secure_bridge(
    broker_url: str,
    db_url: str,
    *,
    security: SecuritySettings | None = None,
    synced_within_s: float = 20.0,
    **overrides: Any,
) -> AsyncIterator[tuple[Bridge, SecurityRuntime]]:
    """A started bridge with credential management plugged in, snapshot reconciled."""
    values: dict[str, Any] = {
        "broker": broker_url,
        "db": db_url,
        "instance": f"test-{uuid.uuid4().hex[:8]}",
        "reconnect_base_s": 0.1,
        "reconnect_cap_s": 1.0,
        "db_retry_cap_s": 0.5,
        "reset_after_s": 3600,
        "command_poll_s": 0.1,
        # Throttled telemetry waits out its interval at shutdown; tests do not need it.
        "status_min_interval_s": 0,
        "security": security or SecuritySettings(rotation_poll_s=0.1),
        **overrides,
    }
    async with Bridge(Settings(**values)) as bridge:
        await asyncio.wait_for(bridge.wait_synced(), synced_within_s)
        yield bridge, bridge.security
