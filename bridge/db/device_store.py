"""Blocking SQL of the device endpoints: registration, tokens, heartbeat sessions,
commands handed out over HTTP, and the timeout sweep's query.

Lock order is ``remotes`` then ``kb_http_devices`` (registration) or ``kb_http_devices``
alone (heartbeats); the presence store locks ``kb_connectivity`` then ``remotes``, so
no two of them can wait on each other in a cycle.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, and_, insert, or_, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError

from bridge.commands.lifecycle import CommandState
from bridge.db.dialect import capabilities
from bridge.db.models import CommandRecord, Connectivity, HttpDevice, Remote
from bridge.db.rows import inserted_id, utc_naive
from bridge.db.tables import table_of
from bridge.db.token_index import CmsTokenIndex
from bridge.passwords import TokenStorage, new_token
from bridge.passwords import token_sha256 as token_hash

log = logging.getLogger(__name__)

REMOTES = table_of(Remote)
CONN = table_of(Connectivity)
HTTP = table_of(HttpDevice)
CMD = table_of(CommandRecord)

T = TypeVar("T")
_RETRIES = 3
#: MySQL/MariaDB deadlock and lock wait timeout: the transaction is safe to run again.
_RETRYABLE_MYSQL = (1205, 1213)
_WAITING = (CommandState.QUEUED.value, CommandState.SENT.value, CommandState.DELIVERED.value)
#: Printable ASCII without spaces: what any token ever issued (hex, Laravel's
#: alphanumerics) is made of.
_TOKEN_CHARS = re.compile(r"[\x21-\x7e]{1,512}")


class AuthFailure(Exception):
    """The token does not authenticate a device; ``reason`` is the machine code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class DeviceGone(Exception):
    """The device is soft-deleted in the CMS."""

    def __init__(self, device_id: str) -> None:
        super().__init__(f"device {device_id} was deleted")
        self.device_id = device_id


class Transport(StrEnum):
    HTTP = "http"
    MQTT = "mqtt"


@dataclass(frozen=True, slots=True)
class Registration:
    device_id: str
    app_version: str | None = None
    android_version: str | None = None
    ip_address: str | None = None
    mac_address: str | None = None

    def metadata(self) -> dict[str, str]:
        values = {
            "app_version": self.app_version,
            "android_version": self.android_version,
            "ip_address": self.ip_address,
            "mac_address": self.mac_address,
        }
        return {key: value for key, value in values.items() if value is not None}


@dataclass(frozen=True, slots=True)
class Registered:
    remote_id: int
    device_id: str
    token: str
    remote_control_enabled: bool
    created: bool


@dataclass(frozen=True, slots=True)
class DeviceAuth:
    remote_id: int
    device_id: str
    remote_control_enabled: bool


@dataclass(frozen=True, slots=True)
class HeartbeatPlan:
    device: DeviceAuth
    transport: Transport
    #: HTTP: the session the heartbeat's status belongs to; MQTT: the device's own.
    session: int
    #: Queue an ``online`` presence event for ``session`` (a new or not yet applied one).
    announce: bool


@dataclass(frozen=True, slots=True)
class HandedCommand:
    id: str
    type: str
    args: dict[str, Any]
    created_at: datetime
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class Reconnect:
    command_id: str
    delay_s: int
    reason: str | None


@dataclass(frozen=True, slots=True)
class Pending:
    commands: list[HandedCommand]
    reconnect: Reconnect | None


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, IntegrityError):
        return True
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        args: tuple[Any, ...] = tuple(getattr(exc.orig, "args", ()))
        return bool(args) and args[0] in _RETRYABLE_MYSQL
    return False


def retrying(fn: Callable[[], T]) -> T:
    """Run a transaction again when it lost a race (duplicate insert, deadlock)."""
    for attempt in range(_RETRIES):
        try:
            return fn()
        except DBAPIError as exc:
            if attempt == _RETRIES - 1 or not _retryable(exc):
                raise
            log.info("HTTP face transaction raced another writer; retrying (%d)", attempt + 1)
    raise AssertionError("unreachable")


class DeviceStore:
    def __init__(
        self,
        engine: Engine,
        *,
        token_storage: TokenStorage = "plaintext",
    ) -> None:
        self._engine = engine
        self._token_storage = token_storage
        #: Tokens in ``remotes.token`` by hash; the face loads and refreshes it.
        self.tokens = CmsTokenIndex(engine, token_storage)
        self._caps = capabilities(engine)

    def _locked(self, stmt: Any) -> Any:
        return self._caps.locked(stmt)

    # -- tokens ------------------------------------------------------------------------

    def _stored(self, token: str) -> str:
        return token if self._token_storage == "plaintext" else token_hash(token)

    def _matches(self, stored: str | None, token: str, hashed: str) -> bool:
        if stored is None:
            return False
        if hmac.compare_digest(stored.encode(), hashed.encode()):
            return True
        # In sha256 mode the stored value is the hash: presenting the hash itself (read
        # from a leaked database) must not authenticate.
        return self._token_storage == "plaintext" and hmac.compare_digest(
            stored.encode(), token.encode("utf-8", "surrogatepass")
        )

    def _authenticate(self, conn: Connection, token: str) -> tuple[DeviceAuth, str]:
        if not _TOKEN_CHARS.fullmatch(token):
            # Never sent to the database: PostgreSQL refuses NUL in text parameters.
            raise AuthFailure("invalid_token", "the token is not valid")
        hashed = token_hash(token)
        cols = (
            REMOTES.c.id,
            REMOTES.c.device_identifier,
            REMOTES.c.deleted_at,
            REMOTES.c.remote_control_enabled,
            REMOTES.c.token,
        )
        known = conn.execute(
            select(HTTP.c.device_id, HTTP.c.token_sha256).where(
                or_(HTTP.c.token_sha256 == hashed, HTTP.c.previous_token_sha256 == hashed)
            )
        ).first()
        if known is not None and known.token_sha256 != hashed:
            raise AuthFailure(
                "token_revoked", "the token was replaced by a newer registration; use that one"
            )
        if known is not None:
            remote = conn.execute(
                select(*cols).where(REMOTES.c.device_identifier == known.device_id)
            ).first()
            if remote is not None and remote.deleted_at is not None:
                raise DeviceGone(remote.device_identifier)
            if remote is None or not self._matches(remote.token, token, hashed):
                raise AuthFailure(
                    "token_revoked",
                    "the token was revoked or replaced; register again to get a new one",
                )
            return _auth(remote), hashed
        # A token the CMS issued: its device is found in the in-memory map of
        # remotes.token (never by scanning that unindexed column), then its row is read by
        # the unique device id and compared; the heartbeat records it in kb_http_devices.
        candidate = self.tokens.lookup(hashed)
        if candidate is None:
            raise AuthFailure("invalid_token", "the token is not valid")
        remote = conn.execute(select(*cols).where(REMOTES.c.device_identifier == candidate)).first()
        if remote is None or not self._matches(remote.token, token, hashed):
            raise AuthFailure("invalid_token", "the token is not valid")
        if remote.deleted_at is not None:
            raise DeviceGone(remote.device_identifier)
        return _auth(remote), hashed

    def authenticate(self, token: str) -> DeviceAuth:
        with self._engine.connect() as conn:
            return self._authenticate(conn, token)[0]

    # -- registration -----------------------------------------------------------------

    def register(self, request: Registration, now_ms: int) -> Registered:
        """Create or update the device's ``remotes`` row and issue a new token; the
        previous token stops working (it reads as revoked)."""
        return retrying(lambda: self._register(request, now_ms))

    def _register(self, request: Registration, now_ms: int) -> Registered:
        token = new_token()
        now = utc_naive(now_ms)
        meta = request.metadata()
        with self._engine.begin() as conn:
            row = conn.execute(
                self._locked(
                    select(
                        REMOTES.c.id, REMOTES.c.deleted_at, REMOTES.c.remote_control_enabled
                    ).where(REMOTES.c.device_identifier == request.device_id)
                )
            ).first()
            if row is not None and row.deleted_at is not None:
                raise DeviceGone(request.device_id)
            if row is None:
                result = conn.execute(
                    insert(REMOTES).values(
                        device_identifier=request.device_id,
                        token=self._stored(token),
                        status="Disconnected",
                        remote_control_enabled=False,
                        created_at=now,
                        updated_at=now,
                        **meta,
                    )
                )
                remote_id, enabled, created = inserted_id(result), False, True
            else:
                conn.execute(
                    update(REMOTES)
                    .where(REMOTES.c.id == row.id)
                    .values(token=self._stored(token), updated_at=now, **meta)
                )
                remote_id, enabled = int(row.id), bool(row.remote_control_enabled)
                created = False
            self._upsert_http(conn, request.device_id, token_hash(token), now_ms, registered=True)
        self.tokens.put(request.device_id, self._stored(token))
        return Registered(remote_id, request.device_id, token, enabled, created)

    def _upsert_http(
        self, conn: Connection, device_id: str, hashed: str, now_ms: int, *, registered: bool
    ) -> int:
        """Record the token's hash; returns the device's HTTP session (0: none yet)."""
        row = conn.execute(self._locked(select(HTTP).where(HTTP.c.device_id == device_id))).first()
        values: dict[str, Any] = {"token_sha256": hashed, "updated_ms": now_ms}
        if registered:
            values["registered_ms"] = now_ms
        if row is None:
            conn.execute(insert(HTTP).values(device_id=device_id, session=0, **values))
            return 0
        if row.token_sha256 != hashed:
            values["previous_token_sha256"] = row.token_sha256
        if registered or row.token_sha256 != hashed:
            conn.execute(update(HTTP).where(HTTP.c.device_id == device_id).values(**values))
        return int(row.session)

    # -- heartbeats -------------------------------------------------------------------

    def plan_heartbeat(self, token: str, now_ms: int) -> HeartbeatPlan:
        return retrying(lambda: self._plan_heartbeat(token, now_ms))

    def _plan_heartbeat(self, token: str, now_ms: int) -> HeartbeatPlan:
        with self._engine.begin() as conn:
            device, hashed = self._authenticate(conn, token)
            http_session = self._upsert_http(
                conn, device.device_id, hashed, now_ms, registered=False
            )
            conn_row = conn.execute(
                select(CONN.c.session, CONN.c.state).where(CONN.c.device_id == device.device_id)
            ).first()
            stored = int(conn_row.session) if conn_row is not None else 0
            if conn_row is not None and stored > http_session:
                # A session the HTTP face did not issue: the device is on MQTT.
                return HeartbeatPlan(device, Transport.MQTT, stored, announce=False)
            if http_session > 0 and stored < http_session:
                # Started by an earlier heartbeat, not written yet: announce it again
                # (a duplicate online is harmless) rather than start yet another.
                return HeartbeatPlan(device, Transport.HTTP, http_session, announce=True)
            if http_session > 0 and conn_row is not None and conn_row.state == "online":
                return HeartbeatPlan(device, Transport.HTTP, http_session, announce=False)
            # First heartbeat, or the device was down (lost by the sweeper, unknown after
            # reconciliation): a new session, larger than any before it.
            session = max(now_ms, http_session + 1, stored + 1)
            conn.execute(
                update(HTTP)
                .where(HTTP.c.device_id == device.device_id)
                .values(session=session, updated_ms=now_ms)
            )
            return HeartbeatPlan(device, Transport.HTTP, session, announce=True)

    def write_telemetry(self, remote_id: int, values: dict[str, Any], now_ms: int) -> None:
        """Telemetry of a device on MQTT, straight into ``remotes``: its presence and its
        ``(session, seq)`` fence belong to its MQTT connection and stay untouched."""
        now = utc_naive(now_ms)
        with self._engine.begin() as conn:
            conn.execute(
                update(REMOTES)
                .where(REMOTES.c.id == remote_id, REMOTES.c.deleted_at.is_(None))
                .values(last_seen_at=now, updated_at=now, **values)
            )

    # -- commands handed out in heartbeat responses -------------------------------------

    def pending(self, device_id: str, *, hand_out: bool, limit: int, now_ms: int) -> Pending:
        """Open commands of the device, oldest first. With ``hand_out`` (HTTP-only
        devices) they count as delivered: the response carries them, and they are not
        sent again on MQTT (``retry_at`` cleared) but listed until acknowledged."""
        now = utc_naive(now_ms)
        waiting = and_(
            CMD.c.device_id == device_id, CMD.c.state.in_(_WAITING), CMD.c.expires_at > now
        )
        with self._engine.begin() as conn:
            reconnect_row = conn.execute(
                select(CMD.c.id, CMD.c.args)
                .where(waiting, CMD.c.type == "reconnect")
                .order_by(CMD.c.created_at.desc())
                .limit(1)
            ).first()
            commands: list[HandedCommand] = []
            if hand_out:
                rows = conn.execute(
                    select(CMD).where(waiting).order_by(CMD.c.created_at).limit(limit)
                ).all()
                commands = [
                    HandedCommand(
                        r.id, r.type, json.loads(r.args or "{}"), r.created_at, r.expires_at
                    )
                    for r in rows
                ]
                self._mark_handed_out(conn, [r.id for r in rows], now)
        reconnect = None
        if reconnect_row is not None:
            args = json.loads(reconnect_row.args or "{}")
            reconnect = Reconnect(
                reconnect_row.id, int(args.get("delay_s", 0) or 0), args.get("reason")
            )
        return Pending(commands, reconnect)

    def _mark_handed_out(self, conn: Connection, ids: Sequence[str], now: datetime) -> None:
        if not ids:
            return
        conn.execute(
            update(CMD)
            .where(CMD.c.id.in_(list(ids)), CMD.c.state == CommandState.QUEUED.value)
            .values(
                state=CommandState.DELIVERED.value,
                sent_at=now,
                delivered_at=now,
                attempts=CMD.c.attempts + 1,
                retry_at=None,
            )
        )
        conn.execute(
            update(CMD)
            .where(CMD.c.id.in_(list(ids)), CMD.c.state == CommandState.SENT.value)
            .values(state=CommandState.DELIVERED.value, delivered_at=now, retry_at=None)
        )
        conn.execute(
            update(CMD)
            .where(CMD.c.id.in_(list(ids)), CMD.c.state == CommandState.DELIVERED.value)
            .values(retry_at=None)
        )

    # -- the timeout sweep ---------------------------------------------------------------

    def silent_http_devices(self, cutoff_ms: int) -> list[tuple[str, int]]:
        """HTTP-only devices online with nothing heard since ``cutoff_ms``:
        ``(device, session)``."""
        stmt = (
            select(HTTP.c.device_id, HTTP.c.session)
            .select_from(
                HTTP.join(CONN, CONN.c.device_id == HTTP.c.device_id).join(
                    REMOTES, REMOTES.c.device_identifier == HTTP.c.device_id
                )
            )
            .where(
                # A soft-deleted device's events are ignored: declaring it lost would
                # only add a "deleted" history row at every sweep.
                REMOTES.c.deleted_at.is_(None),
                HTTP.c.session > 0,
                CONN.c.session == HTTP.c.session,
                CONN.c.state == "online",
                CONN.c.since_ms < cutoff_ms,
                or_(CONN.c.last_status_ms.is_(None), CONN.c.last_status_ms < cutoff_ms),
            )
        )
        with self._engine.connect() as conn:
            return [(row.device_id, int(row.session)) for row in conn.execute(stmt)]

    def http_managed(self) -> set[str]:
        """Devices whose presence the HTTP face owns (their stored session is its own)."""
        stmt = (
            select(HTTP.c.device_id)
            .select_from(HTTP.join(CONN, CONN.c.device_id == HTTP.c.device_id))
            .where(HTTP.c.session > 0, CONN.c.session == HTTP.c.session)
        )
        with self._engine.connect() as conn:
            return {row.device_id for row in conn.execute(stmt)}


def _auth(row: Any) -> DeviceAuth:
    return DeviceAuth(int(row.id), row.device_identifier, bool(row.remote_control_enabled))
