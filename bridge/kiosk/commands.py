"""Tracked commands on the kiosk side: decode, de-duplicate, run, acknowledge.

Semantics (what the bridge can rely on):

* every command id runs at most once per device, also across restarts (the last 1,000
  ids are persisted before the handler runs); a redelivered id gets the ack it got
  before again, never a second execution;
* ``received`` is sent before the handler runs, then ``succeeded`` or ``failed``
  (detail = the exception message);
* an expired command (``expires_at`` in the past) is not run and answered
  ``rejected`` with detail ``expired``: the operator learns it will never happen,
  which "failed" would blur with a handler error;
* unknown types, and commands whose ``device_id`` is not this device (``wipe`` and
  ``rotate_token`` must carry one), are ``rejected`` without ``received``;
* ``rotate_token`` runs the app's handler first (it may veto by raising), then stores
  the token; ``succeeded`` tells the bridge the token is safe on the device;
* a payload that does not decode is logged and counted, not answered: without a
  valid id there is nothing to answer to.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol
from uuid import UUID

from bridge.clock import now_ms
from bridge.kiosk.state import AgentState, CommandRecord
from schemas import (
    Ack,
    AckState,
    Command,
    CommandType,
    DeviceConfig,
    InvalidPayload,
    OfflineReason,
    ReconnectArgs,
    RotateTokenArgs,
    decode,
)
from schemas.payloads import NAMED_COMMANDS

logger = logging.getLogger(__name__)

CommandHandler = Callable[[Command], Awaitable[None] | None]

_MAX_DETAIL = 1024
EXPIRED = "expired"
INTERRUPTED = "interrupted by a restart before it finished"


@dataclass(frozen=True, slots=True)
class ReplyRoute:
    """MQTT 5 request/response: where to send the ack and what to echo back."""

    topic: str
    correlation_data: bytes | None = None


class CommandHost(Protocol):
    """What the processor needs from the agent it runs in."""

    device_id: str
    state: AgentState

    def send_ack(self, ack: Ack, route: ReplyRoute | None) -> asyncio.Future[None]: ...

    def apply_config(self, config: DeviceConfig) -> None: ...

    async def announced_reconnect(self, reason: OfflineReason, delay_s: float) -> None: ...

    async def wipe(self) -> None: ...

    def adopt_token(self, token: str) -> None: ...


def _detail(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text[:_MAX_DETAIL]


class CommandProcessor:
    def __init__(self, host: CommandHost, *, ack_timeout_s: float) -> None:
        self._host = host
        self._ack_timeout_s = ack_timeout_s
        self._handlers: dict[str, CommandHandler] = {}
        self._running: dict[UUID, asyncio.Task[None]] = {}
        #: Handler executions per command id (tests assert "exactly once").
        self.executed: Counter[UUID] = Counter()
        self.counters: Counter[str] = Counter()

    def on_command(self, command_type: str | CommandType, handler: CommandHandler) -> None:
        """Register the app's handler; built-in behaviour of known types wraps around it."""
        self._handlers[str(command_type)] = handler

    # -- receiving ----------------------------------------------------------------------

    def handle(self, payload: bytes, route: ReplyRoute | None) -> None:
        try:
            command = decode(Command, payload)
        except InvalidPayload as exc:
            self.counters["bad_commands"] += 1
            logger.warning("%s: ignoring undecodable command: %s", self._host.device_id, exc)
            return
        self.counters["received"] += 1
        record = self._host.state.command(command.id)
        if record is not None:
            self._redelivered(command, record, route)
            return
        if command.expires_at < now_ms():
            self.counters["expired"] += 1
            self._finish(command.id, AckState.REJECTED, EXPIRED, route)
            return
        refusal = self._refusal(command)
        if refusal is not None:
            self._finish(command.id, AckState.REJECTED, refusal, route)
            return
        # Persisted before running: a crash mid-handler must not run it again on restart.
        self._host.state.remember_command(command.id, AckState.RECEIVED)
        self._ack(command.id, AckState.RECEIVED, None, route)
        self._running[command.id] = asyncio.get_running_loop().create_task(
            self._execute(command, route), name=f"kiosk-cmd-{command.id}"
        )

    def _redelivered(
        self, command: Command, record: CommandRecord, route: ReplyRoute | None
    ) -> None:
        self.counters["duplicates"] += 1
        if record.final:
            self._ack(command.id, record.state, record.detail, route)
        elif command.id in self._running:
            self._ack(command.id, AckState.RECEIVED, None, route)
        else:
            # Received by an earlier run of the agent that died before finishing.
            self._finish(command.id, AckState.FAILED, INTERRUPTED, route)

    def _refusal(self, command: Command) -> str | None:
        known = command.known_type
        if known is None and command.type not in self._handlers:
            return f"unknown command type {command.type!r}"
        mine = self._host.device_id
        # device_id is optional, except on wipe and rotate_token; when given it must be
        # us (a command republished to the wrong topic must not wipe, lock out or reboot
        # the wrong kiosk).
        if command.device_id != mine and (
            command.device_id is not None or command.type in NAMED_COMMANDS
        ):
            return f"{command.type} addressed to {command.device_id!r}, this device is {mine!r}"
        return None

    # -- running ------------------------------------------------------------------------

    async def _execute(self, command: Command, route: ReplyRoute | None) -> None:
        self.executed[command.id] += 1
        try:
            await self._run_handlers(command)
        except Exception as exc:
            logger.info(
                "%s: command %s %s failed: %s", self._host.device_id, command.type, command.id, exc
            )
            self._finish(command.id, AckState.FAILED, _detail(exc), route)
            return
        finally:
            self._running.pop(command.id, None)
        done = self._finish(command.id, AckState.SUCCEEDED, None, route)
        await self._after_success(command, done)

    async def _run_handlers(self, command: Command) -> None:
        known = command.known_type
        if known is CommandType.SET_CONFIG:
            config = command.typed_args()
            assert isinstance(config, DeviceConfig)
            self._host.apply_config(config)
        handler = self._handlers.get(command.type)
        if handler is not None:
            result = handler(command)
            if inspect.isawaitable(result):
                await result
        if known is CommandType.ROTATE_TOKEN:
            args = command.typed_args()
            assert isinstance(args, RotateTokenArgs)
            self._host.adopt_token(args.token)
        elif handler is None and known is CommandType.REFRESH:
            logger.info(
                "%s: refresh %s (no handler registered)", self._host.device_id, command.args
            )

    async def _after_success(self, command: Command, ack_done: asyncio.Future[None]) -> None:
        known = command.known_type
        if known not in (CommandType.RECONNECT, CommandType.WIPE):
            return
        # The operator must see "succeeded" before the device goes away.
        try:
            await asyncio.wait_for(asyncio.shield(ack_done), self._ack_timeout_s)
        except (TimeoutError, ConnectionError):
            logger.warning(
                "%s: final ack of %s not confirmed; going on", self._host.device_id, command.id
            )
        if known is CommandType.RECONNECT:
            args = command.typed_args()
            assert isinstance(args, ReconnectArgs)
            await self._host.announced_reconnect(OfflineReason.NETWORK_CHANGE, args.delay_s)
        else:
            await self._host.wipe()

    def cancel_running(self) -> None:
        current = asyncio.current_task()
        for task in list(self._running.values()):
            if task is not current:
                task.cancel()

    # -- answering ----------------------------------------------------------------------

    def _finish(
        self, command_id: UUID, state: AckState, detail: str | None, route: ReplyRoute | None
    ) -> asyncio.Future[None]:
        self._host.state.remember_command(command_id, state, detail)
        self.counters[state.value] += 1
        return self._ack(command_id, state, detail, route)

    def _ack(
        self, command_id: UUID, state: AckState, detail: str | None, route: ReplyRoute | None
    ) -> asyncio.Future[None]:
        ack = Ack(id=command_id, state=state, ts=now_ms(), detail=detail)
        return self._host.send_ack(ack, route)
