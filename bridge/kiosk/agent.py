"""The reference kiosk agent: one device, paho's network thread, a blocking API.

    agent = KioskAgent("lobby-1", "mqtt://broker:1883", app_version="4.2.0")
    agent.on_command("refresh", lambda cmd: webview.reload())
    agent.start()                      # returns once online (birth acknowledged)
    agent.update_metrics(battery_level=80, screen_on=True)
    ...
    agent.stop()                       # announced offline, clean DISCONNECT, no Will

Credentials: the agent logs in with its device id and the token stored in its state
directory (``credential.json``, see :mod:`bridge.kiosk.credentials`), else ``password``
(or the URL's). It handles ``rotate_token`` itself: the new token is stored, acked and
used from the next connection on. A kiosk without a token claims one first
(:func:`bridge.kiosk.credentials.claim_until_accepted`; ``kiosk-bridge kiosk`` does).

The protocol logic lives in :class:`bridge.kiosk.core.KioskCore` on a private asyncio
loop thread; paho runs its own network thread (``loop_start``) as the Android Paho
client does. Command handlers run on the agent's loop thread: keep them short, or make
them ``async`` (``await asyncio.to_thread(...)`` for blocking work).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar
from uuid import UUID

from bridge.broker_url import parse_broker_url
from bridge.kiosk.commands import CommandHandler
from bridge.kiosk.core import KioskCore, Mode
from bridge.kiosk.drivers import ThreadedDriver
from bridge.kiosk.metrics import validate_metrics
from bridge.kiosk.options import AgentOptions, MqttProtocol
from bridge.kiosk.state import AgentState, default_state_dir
from schemas import DEFAULT_PREFIX, Ack, CommandType, DeviceConfig, OfflineReason

logger = logging.getLogger(__name__)

T = TypeVar("T")


class KioskAgent:
    def __init__(
        self,
        device_id: str,
        broker_url: str,
        *,
        state_dir: Path | str | None = None,
        password: str | None = None,
        keepalive: int = 10,
        status_interval_s: float = 30.0,
        status_qos: int = 1,
        protocol: MqttProtocol | str = MqttProtocol.AUTO,
        handlers: Mapping[str, CommandHandler] | None = None,
        app_version: str | None = None,
        android_version: str | None = None,
        mac_address: str | None = None,
        ip_address: str | None = None,
        session_expiry_s: int = 86_400,
        backoff_base_s: float = 1.0,
        backoff_cap_s: float = 60.0,
        connect_timeout_s: float = 15.0,
        protocol_probe_timeout_s: float = 5.0,
        publish_timeout_s: float = 5.0,
        prefix: str = DEFAULT_PREFIX,
        fsync: bool = True,
        rng: random.Random | None = None,
    ) -> None:
        options = AgentOptions(
            keepalive=keepalive,
            status_interval_s=status_interval_s,
            status_qos=status_qos,
            protocol=MqttProtocol(protocol),
            session_expiry_s=session_expiry_s,
            backoff_base_s=backoff_base_s,
            backoff_cap_s=backoff_cap_s,
            connect_timeout_s=connect_timeout_s,
            protocol_probe_timeout_s=protocol_probe_timeout_s,
            publish_timeout_s=publish_timeout_s,
            prefix=prefix,
            app_version=app_version,
            android_version=android_version,
            mac_address=mac_address,
            ip_address=ip_address,
        )
        broker = parse_broker_url(broker_url)
        directory = Path(state_dir) if state_dir is not None else default_state_dir(device_id)
        self._loop = asyncio.new_event_loop()
        self._driver = ThreadedDriver(self._loop)
        self._core = KioskCore(
            device_id,
            broker,
            state=AgentState(directory, fsync=fsync),
            driver=self._driver,
            loop=self._loop,
            options=options,
            password=password,
            rng=rng,
        )
        for command_type, handler in (handlers or {}).items():
            self._core.on_command(command_type, handler)
        self._thread: threading.Thread | None = None
        self._closed = False

    # -- observable state ------------------------------------------------------------------

    @property
    def device_id(self) -> str:
        return self._core.device_id

    @property
    def core(self) -> KioskCore:
        return self._core

    @property
    def connected(self) -> threading.Event:
        """Set while online (birth and subscriptions acknowledged by the broker)."""
        return self._core.connected

    @property
    def stopped(self) -> threading.Event:
        return self._core.stopped

    @property
    def session(self) -> int:
        return self._core.session

    @property
    def sessions(self) -> list[int]:
        return list(self._core.sessions)

    @property
    def protocol(self) -> MqttProtocol:
        return self._core.protocol

    @property
    def executed(self) -> Counter[UUID]:
        """How many times each command id's handler ran."""
        return self._core.commands.executed

    @property
    def acks_sent(self) -> list[Ack]:
        return list(self._core.acks_sent)

    @property
    def counters(self) -> Counter[str]:
        return self._core.counters + self._core.commands.counters

    @property
    def status_interval_s(self) -> float:
        return self._core.status_interval_s

    @property
    def config(self) -> DeviceConfig | None:
        return self._core.config

    @property
    def wiped(self) -> bool:
        return self._core.wiped

    @property
    def state_dir(self) -> Path:
        return self._core.state.directory

    # -- app hooks -----------------------------------------------------------------------

    def on_command(self, command_type: str | CommandType, handler: CommandHandler) -> None:
        self._core.on_command(command_type, handler)

    def on_config(self, callback: Callable[[DeviceConfig], None] | None) -> None:
        self._core.on_config = callback

    def update_metrics(self, **fields: Any) -> None:
        validate_metrics(fields)
        self._loop.call_soon_threadsafe(functools.partial(self._core.update_metrics, **fields))

    # -- lifecycle -----------------------------------------------------------------------

    def start(self, timeout: float | None = 30.0) -> None:
        """Start connecting; wait until online unless ``timeout`` is None.

        Raises ``TimeoutError`` (after shutting the agent down) if not online in time.
        """
        if self._thread is not None or self._closed:
            raise RuntimeError(f"{self.device_id}: agent already started")
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"kiosk-agent-{self.device_id}", daemon=True
        )
        self._thread.start()
        self._call(self._core.begin)
        if timeout is None:
            return
        if not self._core.connected.wait(timeout):
            self._kill_and_close()
            raise TimeoutError(
                f"{self.device_id}: not online at {self._core.broker.url} within {timeout:g}s"
            )

    def stop(self, reason: OfflineReason = OfflineReason.SHUTDOWN, timeout: float = 20.0) -> None:
        """Announce ``offline`` with ``reason``, disconnect cleanly (no Will), shut down."""
        if self._running():
            try:
                self._await(self._core.stop(reason), timeout)
            finally:
                self.close()
        else:
            self.close()

    def kill(self, timeout: float = 10.0) -> None:
        """Drop the connection without DISCONNECT (the broker publishes the Will), shut down."""
        self._kill_and_close(timeout)

    def reboot(self, delay_s: float = 0.0, timeout: float = 20.0) -> None:
        """Announced reboot: ``offline`` (reboot), clean disconnect, back after ``delay_s``."""
        self._await(
            self._core.announced_reconnect(OfflineReason.REBOOT, delay_s), timeout + delay_s
        )

    def wait_stopped(self, timeout: float | None = None) -> bool:
        return self._core.stopped.wait(timeout)

    def close(self) -> None:
        """Release the loop and threads; no MQTT exchange (use :meth:`stop` for that)."""
        if self._closed:
            return
        self._closed = True
        thread = self._thread
        if thread is not None and thread.is_alive():
            if self._core.mode is not Mode.STOPPED:
                self._call(functools.partial(self._core.kill))
            asyncio.run_coroutine_threadsafe(self._cancel_tasks(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            thread.join(10)
        self._driver.join_all()
        self._loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._running() and self._core.mode is not Mode.STOPPED:
            self.stop()
        else:
            self.close()

    # -- plumbing --------------------------------------------------------------------------

    def _running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._closed

    def _kill_and_close(self, timeout: float = 10.0) -> None:
        if self._running():

            async def kill() -> None:
                self._core.kill()
                await self._core.wait_closed()

            try:
                self._await(kill(), timeout)
            except TimeoutError:
                logger.warning("%s: connection did not close after kill", self.device_id)
        self.close()

    def _call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the agent's loop and return its result."""

        async def run() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    def _await(self, coro: Any, timeout: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _cancel_tasks(self) -> None:
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
