"""An in-process MQTT 3.1.1 broker (amqtt) for the demo and for tests without Mosquitto.

amqtt speaks MQTT 3.1.1 only: clients must connect with protocol 3.1.1 (aiomqtt:
``protocol=aiomqtt.ProtocolVersion.V311``). State is in memory and dies with the broker.

With ``security`` (:class:`bridge.security.embedded.BrokerSecurity`) it enforces the
security model from the bridge's database, as ``kiosk-bridge run`` and ``demo`` start it;
without, it lets anyone in (most tests, and ``run --embedded-open``).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from amqtt.broker import Broker
from amqtt.errors import BrokerError
from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session

from bridge._compat.amqtt import ContractBroker
from bridge.addresses import host_port

if TYPE_CHECKING:
    from bridge.security.embedded import BrokerSecurity

logger = logging.getLogger(__name__)


class PortInUseError(OSError):
    """The embedded broker could not bind because something else listens there."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(
            errno.EADDRINUSE,
            f"cannot listen on {host}:{port}: address already in use "
            f"(another MQTT broker?); pick another address with --listen HOST:PORT",
        )
        self.host = host
        self.port = port


class OpenAuthPlugin(BaseAuthPlugin):
    """Accept every client, with or without credentials.

    amqtt's own ``AnonymousAuthPlugin`` marks every session it lets in as anonymous,
    and amqtt discards anonymous sessions on disconnect (no persistent session, no QoS 1
    queued for an offline client). Kiosks rely on persistent sessions, so this plugin
    lets everyone in without that mark.
    """

    @dataclass
    class Config:
        """No options."""

    async def authenticate(self, *, session: Session) -> bool:
        del session
        return True


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Same option asyncio.start_server uses in amqtt, so the answer matches its bind.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _os_assigned_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def pick_free_listen(host: str, preferred_port: int) -> int:
    """``preferred_port`` when it is free on ``host``, else a port the OS picks (also for 0)."""
    if preferred_port != 0 and _port_free(host, preferred_port):
        return preferred_port
    port = _os_assigned_port(host)
    if preferred_port != 0:
        logger.info("%s:%d is taken, using port %d instead", host, preferred_port, port)
    return port


def _is_addr_in_use(exc: BaseException) -> bool:
    current: BaseException | None = exc
    while current is not None:
        if isinstance(current, OSError) and current.errno == errno.EADDRINUSE:
            return True
        current = current.__cause__ or current.__context__
    return False


def broker_config(host: str, port: int, security: BrokerSecurity | None = None) -> dict[str, Any]:
    """amqtt 0.12 configuration: one TCP listener, the database security plugin (or open
    auth without ``security``), no $SYS, no packet log."""
    plugins = (
        security.plugins()
        if security is not None
        else {f"{OpenAuthPlugin.__module__}.{OpenAuthPlugin.__qualname__}": {}}
    )
    return {
        # Unbracketed even for IPv6: amqtt splits on the last ':' and keeps brackets in
        # the address it binds ('[::1]' fails to resolve), so '::1:1883' is what works.
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        # An explicit "plugins" map replaces amqtt's defaults (packet/event loggers and a
        # $SYS publisher every 20 s), which only add noise here.
        "plugins": plugins,
    }


class EmbeddedBroker:
    """``async with EmbeddedBroker(port=...) as broker:`` runs amqtt on the current loop."""

    def __init__(
        self, host: str = "127.0.0.1", port: int = 1883, *, security: BrokerSecurity | None = None
    ) -> None:
        if port == 0:
            # amqtt cannot report the port the OS picked for 0; pick it up front.
            port = _os_assigned_port(host)
        self._host = host
        self._port = port
        self._security = security
        self._broker: Broker | None = None

    @property
    def secure(self) -> bool:
        """Whether clients must authenticate (and the ACL applies)."""
        return self._security is not None

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"mqtt://{host_port(self._host, self._port)}"

    @property
    def broker(self) -> Broker:
        """The underlying amqtt broker (for introspection in tests)."""
        if self._broker is None:
            raise RuntimeError("embedded broker is not running")
        return self._broker

    async def start(self) -> None:
        if self._broker is not None:
            raise RuntimeError(f"embedded broker already running on {self._host}:{self._port}")
        if self._security is not None:
            await asyncio.to_thread(self._security.prepare)
        broker = ContractBroker(broker_config(self._host, self._port, self._security))
        try:
            await broker.start()
        except BrokerError as exc:
            await broker.plugins_manager.close()
            if _is_addr_in_use(exc):
                raise PortInUseError(self._host, self._port) from exc
            raise
        self._broker = broker
        logger.info(
            "embedded MQTT 3.1.1 broker listening on %s (%s)",
            self.url,
            "authentication and ACL on" if self.secure else "OPEN: anyone may connect",
        )

    async def stop(self) -> None:
        broker, self._broker = self._broker, None
        if broker is not None:
            await broker.shutdown()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
