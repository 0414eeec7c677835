"""Ending token rotations: the bridge side of ``rotate_token``.

A rotation is pending from ``device rotate-token`` until one of:

* the device acks the command ``succeeded`` (it has stored the new token): the broker
  gets the new password, which also disconnects the device; it comes back with the new
  token at once. Until then the old token stays the only valid one on Mosquitto (dynsec
  has one password per client), so a device that never got the command loses nothing;
* the deadline passes (or the command expires) first: the new password is set anyway,
  as the issue asks; a device that did store the token comes back, one that did not
  must be provisioned again;
* the device refuses or fails the command: the rotation is dropped, the old token stays.

In every case the token is scrubbed from the command's args.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable

from bridge.commands.lifecycle import CommandState
from bridge.db.security_store import PendingRotation, SecurityStore
from bridge.security.backend import CredentialBackend
from bridge.security.dynsec import DynsecError
from bridge.security.metrics import SecurityMetrics

log = logging.getLogger(__name__)

_GIVEN_UP = frozenset(
    {
        CommandState.FAILED.value,
        CommandState.REJECTED.value,
        CommandState.CANCELLED.value,
        CommandState.SUPERSEDED.value,
    }
)


class RotationFinisher:
    def __init__(
        self,
        store: SecurityStore,
        backend: CredentialBackend,
        metrics: SecurityMetrics,
        *,
        clock: Callable[[], int],
    ) -> None:
        self._store = store
        self._backend = backend
        self._metrics = metrics
        self._clock = clock

    async def step(self) -> list[tuple[str, str]]:
        """Settle what can be settled now; returns ``(device, action)`` pairs."""
        done: list[tuple[str, str]] = []
        for rotation in await asyncio.to_thread(self._store.pending_rotations):
            action = self._decide(rotation)
            if action is None:
                continue
            applied = action in ("rotated", "rotate_forced")
            if applied:
                assert rotation.token is not None
                try:
                    await self._backend.set_password(rotation.username, rotation.token)
                except DynsecError as exc:
                    log.warning("rotation of %s not applied yet: %s", rotation.device_id, exc)
                    continue
            detail = f"command {rotation.command_id} {rotation.command_state or 'missing'}"
            await asyncio.to_thread(
                functools.partial(
                    self._store.finish_rotation,
                    rotation,
                    applied=action in ("rotated", "rotate_forced"),
                    action=action,
                    detail=detail,
                )
            )
            self._metrics.rotations.labels(action).inc()
            done.append((rotation.device_id, action))
        return done

    def _decide(self, rotation: PendingRotation) -> str | None:
        state = rotation.command_state
        if state == CommandState.SUCCEEDED.value and rotation.token is not None:
            return "rotated"
        if state is None or state in _GIVEN_UP or rotation.token is None:
            return "rotate_aborted"
        if state == CommandState.EXPIRED.value or self._clock() >= rotation.deadline_ms:
            return "rotate_forced"
        return None

    async def run(self, every_s: float) -> None:
        while True:
            try:
                await self.step()
            except Exception:
                # A database or broker hiccup must not end rotation handling for good.
                log.exception("token rotation step failed; retrying")
            await asyncio.sleep(every_s)
