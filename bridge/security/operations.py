"""Operator actions on one device's credential: rotate, revoke, delete, restore, enroll.

Every action is audited in ``kb_security_audit`` with who asked (``requested_by``) and
logged. Revocation kicks the live connection through the backend, then overwrites the
device's retained birth with ``offline`` reason ``revoked`` (Mosquitto kicks *without*
the Will), which the bridge ingests on its normal presence path.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from bridge.clock import now_ms
from bridge.db.command_store import CommandStore, NewCommand
from bridge.db.security_store import SecurityStore
from bridge.passwords import hash_password, new_token
from bridge.security.backend import CredentialBackend
from schemas import (
    DEFAULT_PREFIX,
    CommandType,
    ContractError,
    OfflineReason,
    PresenceOffline,
    PresenceOnline,
    TopicKind,
    decode_presence,
    device_topic,
    encode,
    validate_device_id,
)

ROTATE_TOKEN = CommandType.ROTATE_TOKEN.value

Publish = Callable[[str, bytes, bool], Awaitable[None]]
ReadRetained = Callable[[str], Awaitable[bytes | None]]


class UnknownDevice(LookupError):
    """Neither a ``remotes`` row nor a credential exists for the id."""


@dataclass(frozen=True, slots=True)
class RevokeResult:
    device_id: str
    #: The broker knew the credential (and disconnected its live connection, if any).
    disabled: bool
    #: Seconds from the request to the broker's confirmation of the kick.
    kick_s: float
    #: The session announced ``offline``/``revoked``, if the device was online.
    session: int | None


@dataclass(frozen=True, slots=True)
class RotationTicket:
    device_id: str
    command_id: str
    deadline_ms: int


@dataclass
class SecurityAdmin:
    store: SecurityStore
    backend: CredentialBackend
    publish: Publish
    read_retained: ReadRetained
    prefix: str = DEFAULT_PREFIX

    async def revoke(
        self, device_id: str, *, requested_by: str | None, reason: str | None = None
    ) -> RevokeResult:
        validate_device_id(device_id)
        facts = await asyncio.to_thread(self.store.facts, device_id)
        if facts.remote_id is None and facts.credential is None:
            raise UnknownDevice(f"no device {device_id!r}")
        started = time.monotonic()
        disabled = await self.backend.disable(device_id)
        kick_s = time.monotonic() - started
        await asyncio.to_thread(self.store.mark_revoked, device_id, requested_by, reason)
        session = await self._online_session(device_id, facts.state, facts.session)
        if session is not None:
            offline = PresenceOffline(session=session, ts=now_ms(), reason=OfflineReason.REVOKED)
            await self.publish(
                device_topic(device_id, TopicKind.PRESENCE, self.prefix), encode(offline), True
            )
        return RevokeResult(device_id, disabled, kick_s, session)

    async def _online_session(self, device_id: str, state: str | None, session: int) -> int | None:
        """The session to announce offline: the retained birth's, else the database's
        if it says online; ``None`` when the device is not online."""
        raw = await self.read_retained(device_topic(device_id, TopicKind.PRESENCE, self.prefix))
        if raw:
            try:
                retained = decode_presence(raw)
            except ContractError:
                retained = None
            if isinstance(retained, PresenceOnline):
                return retained.session
            if retained is not None:
                return None
        return session if state == "online" and session > 0 else None

    async def delete(
        self,
        device_id: str,
        *,
        requested_by: str | None,
        reason: str | None = None,
        settle_s: float = 3.0,
    ) -> RevokeResult:
        """Revoke, let the bridge record the device offline, then soft-delete it (the
        presence store ignores deleted devices, so the order matters)."""
        result = await self.revoke(device_id, requested_by=requested_by, reason=reason)
        if result.session is not None:
            deadline = time.monotonic() + settle_s
            while time.monotonic() < deadline:
                state, session = await asyncio.to_thread(self.store.connectivity, device_id)
                if state != "online" or session != result.session:
                    break
                await asyncio.sleep(0.05)
        await asyncio.to_thread(self.store.soft_delete, device_id, requested_by, reason)
        return result

    async def restore(self, device_id: str, *, requested_by: str | None) -> tuple[bool, bool]:
        """Undelete and re-enable; the device reconnects with its existing token.
        Returns ``(undeleted, reactivated)``."""
        validate_device_id(device_id)
        facts = await asyncio.to_thread(self.store.facts, device_id)
        if facts.remote_id is None and facts.credential is None:
            raise UnknownDevice(f"no device {device_id!r}")
        undeleted, reactivated = await asyncio.to_thread(
            self.store.restore, device_id, requested_by
        )
        if facts.credential is not None:
            await self.backend.enable(device_id)
        return undeleted, reactivated

    async def enroll(self, device_id: str, password: str, *, requested_by: str | None) -> int:
        """A credential made by an operator (labs, simulated fleets), without a claim."""
        validate_device_id(device_id)
        remote_id = await asyncio.to_thread(
            self.store.enroll, device_id, hash_password(password), requested_by
        )
        await self.backend.upsert(device_id, password)
        return remote_id


def request_rotation(
    store: SecurityStore,
    device_id: str,
    *,
    deadline_s: float,
    requested_by: str | None,
) -> RotationTicket:
    """Blocking: queue a ``rotate_token`` command carrying a fresh token. The running
    bridge delivers it; once the device confirms (or at the deadline) the bridge makes
    the new token the only valid one (:mod:`bridge.security.rotation`)."""
    validate_device_id(device_id)
    facts = store.facts(device_id)
    if facts.deleted:
        raise UnknownDevice(f"{device_id} is deleted; restore it first")
    token = new_token()
    command_id = str(uuid.uuid4())
    deadline_ms = now_ms() + int(deadline_s * 1000)
    command = NewCommand(
        device_id,
        ROTATE_TOKEN,
        {"token": token},
        deadline_s,
        requested_by=requested_by,
        reason="credential rotation",
        id=command_id,
    )
    with store.engine.begin() as conn:
        store.start_rotation(
            conn, device_id, hash_password(token), command_id, deadline_ms, requested_by
        )
        CommandStore(store.engine, clock=now_ms).enqueue_in(conn, [command])
    return RotationTicket(device_id, command_id, deadline_ms)
