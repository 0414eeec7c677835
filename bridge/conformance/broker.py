"""The broker the kit tests against: its own Mosquitto, the embedded broker, or --broker."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from bridge.broker_url import parse_broker_url


class BrokerKind(enum.StrEnum):
    AUTO = "auto"
    MOSQUITTO = "mosquitto"
    EMBEDDED = "embedded"


class BrokerUnavailable(RuntimeError):
    """The kit's broker cannot start, or the given one cannot be reached."""


@dataclass(frozen=True, slots=True)
class BrokerInfo:
    host: str
    port: int
    kind: str
    #: Whether the kit's own client may use MQTT 5 (amqtt speaks only 3.1.1).
    v5: bool | None
    username: str | None = None
    password: str | None = None


class KitBroker:
    """An async context manager that yields a reachable broker."""

    def __init__(self, url: str | None, kind: BrokerKind, data_dir: Path) -> None:
        self._url = url
        self._kind = kind
        self._data_dir = data_dir
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> BrokerInfo:
        try:
            return await self._start()
        except BaseException:
            await self._stack.aclose()
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stack.aclose()

    async def _start(self) -> BrokerInfo:
        if self._url is not None:
            return await self._external(self._url)
        if self._kind is not BrokerKind.EMBEDDED:
            from bridge.testing.mosquitto import (
                MosquittoNotFound,
                MosquittoProcess,
                MosquittoStartError,
            )

            try:
                broker = MosquittoProcess(self._data_dir / "mosquitto", persistence=False)
            except MosquittoNotFound as exc:
                if self._kind is BrokerKind.MOSQUITTO:
                    raise BrokerUnavailable(str(exc)) from None
            else:
                try:
                    await asyncio.to_thread(broker.start)
                except (MosquittoStartError, OSError) as exc:
                    first = str(exc).splitlines()[0]
                    raise BrokerUnavailable(f"mosquitto did not start: {first}") from None
                self._stack.push_async_callback(asyncio.to_thread, broker.kill)
                return BrokerInfo(broker.host, broker.port, "mosquitto", True)
        from bridge.embedded_broker import EmbeddedBroker

        # amqtt logs every malformed or dropped client (the kit causes both) to stderr.
        logging.getLogger("amqtt").setLevel(logging.CRITICAL)
        embedded = EmbeddedBroker(host="127.0.0.1", port=0)
        try:
            await embedded.start()
        except Exception as exc:  # amqtt raises assorted errors; one line is the contract
            raise BrokerUnavailable(f"the embedded broker did not start: {exc}") from None
        self._stack.push_async_callback(embedded.stop)
        return BrokerInfo(embedded.host, embedded.port, "embedded (MQTT 3.1.1)", False)

    async def _external(self, url: str) -> BrokerInfo:
        try:
            address = parse_broker_url(url)
        except ValueError as exc:
            raise BrokerUnavailable(f"--broker: {exc}") from None
        if address.tls:
            raise BrokerUnavailable(
                "--broker: mqtts:// is not supported (the kit's proxy reads the plain MQTT "
                "stream); give the broker's plain listener"
            )
        try:
            _reader, writer = await asyncio.wait_for(
                asyncio.open_connection(address.host, address.port), 5.0
            )
        except (OSError, TimeoutError) as exc:
            raise BrokerUnavailable(f"cannot reach {address.url}: {exc or 'timeout'}") from None
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return BrokerInfo(
            address.host, address.port, address.url, None, address.username, address.password
        )
