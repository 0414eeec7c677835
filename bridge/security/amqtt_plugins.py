"""The security model in the embedded amqtt broker: authentication against the bridge's
database and the ACL of :mod:`bridge.security.acl`.

One plugin does both (amqtt asks every auth plugin and every topic plugin; an auth
plugin that lets everybody in, like ``bridge.embedded_broker.OpenAuthPlugin``, must not
be configured next to it). Configure it in the broker's ``plugins`` map::

    "bridge.security.amqtt_plugins.DatabaseSecurityPlugin": {
        "db_url": "sqlite:///kiosk-bridge.db",
        "bridge_password": "...", "ops_password": "...", "claim_password": "...",
    }

Where amqtt cannot do what Mosquitto does, the plugin comes as close as it can (see
``mosquitto/README.md``, "The embedded broker"):

* a Last Will on a topic the client may not publish refuses the CONNECT (amqtt would
  publish any Will unchecked; Mosquitto accepts the CONNECT and drops the Will);
* subscriptions are checked when made (SUBACK 0x80), not only at delivery;
* revocation and password changes are picked up by polling the credential table
  (``poll_s``), then the session is cut without its Will, as Mosquitto's kick does;
* during a rotation the old and the new token both work until it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

from amqtt.contexts import Action, BaseContext
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session
from sqlalchemy import Engine, select
from sqlalchemy.exc import SQLAlchemyError

from bridge._compat.amqtt import session_entry
from bridge.db.engine import make_engine
from bridge.db.security_models import CredentialState, DeviceCredential
from bridge.db.tables import table_of
from bridge.passwords import PasswordHash, hash_password, verify_password
from bridge.security.acl import Access, Role, StaticUsers, allowed
from schemas import DEFAULT_PREFIX, is_valid_device_id
from schemas.provisioning import is_claim_client_id

log = logging.getLogger(__name__)

CRED = table_of(DeviceCredential)
_ACCESS = {
    Action.PUBLISH: Access.PUBLISH,
    Action.SUBSCRIBE: Access.SUBSCRIBE,
    Action.RECEIVE: Access.RECEIVE,
}


@dataclass(frozen=True, slots=True)
class _Authed:
    username: str
    role: Role
    generation: int


def _credential_row(engine: Engine, username: str) -> Any | None:
    with engine.connect() as conn:
        return conn.execute(select(CRED).where(CRED.c.username == username)).first()


def _changed_since(engine: Engine, since_ms: int) -> list[Any]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                select(CRED.c.username, CRED.c.state, CRED.c.generation, CRED.c.updated_ms).where(
                    CRED.c.updated_ms >= since_ms
                )
            )
        )


def _device_password_ok(row: Any, password: str) -> bool:
    current = PasswordHash(row.password_hash, row.password_salt, row.iterations)
    if verify_password(password, current):
        return True
    if row.pending_hash and row.pending_salt:
        pending = PasswordHash(row.pending_hash, row.pending_salt, row.iterations)
        return verify_password(password, pending)
    return False


class DatabaseSecurityPlugin(BaseAuthPlugin, BaseTopicPlugin):
    @dataclass
    class Config:
        db_url: str
        prefix: str = DEFAULT_PREFIX
        bridge_username: str = "_bridge"
        bridge_password: str | None = None
        ops_username: str = "_ops"
        ops_password: str | None = None
        claim_username: str = "_claim"
        claim_password: str | None = None
        #: How often revocations and password changes are looked for.
        poll_s: float = 0.25

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        config: DatabaseSecurityPlugin.Config = self.config
        self._prefix = config.prefix
        self._poll_s = config.poll_s
        self._users = StaticUsers(
            config.bridge_username, config.ops_username, config.claim_username
        )
        # Kept hashed in memory too: a heap dump should not hand out the fixed passwords.
        self._static = {
            name: hash_password(password)
            for name, password in (
                (config.bridge_username, config.bridge_password),
                (config.ops_username, config.ops_password),
                (config.claim_username, config.claim_password),
            )
            if password
        }
        self._engine = make_engine(config.db_url)
        self._authed: dict[str, _Authed] = {}
        self._watcher: asyncio.Task[None] | None = None

    # -- authentication ---------------------------------------------------------------------

    async def authenticate(self, *, session: Session) -> bool | None:
        username, password, client_id = session.username, session.password, session.client_id
        if not username or password is None or not client_id:
            return False
        self._ensure_watcher()
        role = self._users.role_of(username)
        generation = 0
        if role is Role.DEVICE:
            if username != client_id or not is_valid_device_id(username):
                log.info("refused %s: a device connects with its id as client id", client_id)
                return False
            try:
                row = await asyncio.to_thread(_credential_row, self._engine, username)
            except SQLAlchemyError as exc:
                # Refused, not crashed: the kiosk retries, and the database comes back.
                log.error("refused %s: credential lookup failed: %s", client_id, exc)
                return False
            if row is None or row.state != CredentialState.ACTIVE.value:
                return False
            if not await asyncio.to_thread(_device_password_ok, row, password):
                return False
            generation = int(row.generation)
        else:
            if role is Role.CLAIM and not is_claim_client_id(client_id):
                # Never under a device's client id: the takeover would kick the device.
                log.warning("refused claim connection %r: its client id is not claim-*", client_id)
                return False
            stored = self._static.get(username)
            if stored is None or not await asyncio.to_thread(verify_password, password, stored):
                return False
        will = session.will_topic if session.will_flag else None
        if will is not None and not allowed(
            role, Access.PUBLISH, will, username=username, client_id=client_id, prefix=self._prefix
        ):
            log.warning("refused %s: Last Will on %r, which it may not publish", client_id, will)
            return False
        self._authed[client_id] = _Authed(username, role, generation)
        return True

    # -- authorisation -------------------------------------------------------------------------

    async def topic_filtering(
        self,
        *,
        session: Session | None = None,
        topic: str | None = None,
        action: Action | None = None,
    ) -> bool | None:
        if session is None or topic is None or action is None or not session.username:
            return False
        access = _ACCESS.get(action)
        if access is None:
            return False
        return allowed(
            self._users.role_of(session.username),
            access,
            topic,
            username=session.username,
            client_id=session.client_id,
            prefix=self._prefix,
        )

    # -- revocation ----------------------------------------------------------------------------

    def _ensure_watcher(self) -> None:
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(
                self._watch(), name="kb-amqtt-credentials"
            )

    async def _watch(self) -> None:
        since = 0
        while True:
            await asyncio.sleep(self._poll_s)
            try:
                rows = await asyncio.to_thread(_changed_since, self._engine, since)
            except Exception:
                log.exception("reading credential changes failed; retrying")
                continue
            for row in rows:
                # Re-read the last millisecond next time: a change in it may come later.
                since = max(since, int(row.updated_ms))
                for client_id, authed in list(self._authed.items()):
                    if authed.username != row.username:
                        continue
                    if (
                        row.state != CredentialState.ACTIVE.value
                        or int(row.generation) > authed.generation
                    ):
                        self._kick(client_id)

    def _kick(self, client_id: str) -> None:
        """Cut the connection without its Will, like Mosquitto's kick."""
        self._authed.pop(client_id, None)
        entry = session_entry(self.context, client_id)
        if entry is None:
            return
        session, handler = entry
        session.will_flag = False
        writer = getattr(handler, "writer", None)
        abort = getattr(writer, "abort", None)
        log.info("credential of %s changed or revoked: disconnecting it", client_id)
        if callable(abort):
            abort()
        elif writer is not None:
            asyncio.get_running_loop().create_task(writer.close())

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        self._engine.dispose()
