"""Blocking SQL of credential management: provisioning, rotation, revocation, audit.

Callers run these on a worker thread. Lock order is ``remotes`` then
``kb_device_credentials`` (like the HTTP face's registration), then
``kb_previous_credentials`` and ``kb_claim_windows``, so no two of them wait on each
other in a cycle with the presence store (``kb_connectivity`` then ``remotes``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import Connection, Engine, delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from bridge.commands.lifecycle import OPEN_STATES, CommandState
from bridge.db.dialect import capabilities
from bridge.db.models import CommandRecord, Connectivity, DeviceConfigRecord, Remote
from bridge.db.rows import inserted_id, utc_naive
from bridge.db.security_models import (
    ClaimWindow,
    CredentialState,
    DeviceCredential,
    PreviousCredential,
    ProvisionNonce,
    SecurityAudit,
)
from bridge.db.tables import table_of
from bridge.passwords import ITERATIONS, PasswordHash, token_sha256
from bridge.presence import ConnState
from schemas import DeviceConfig
from schemas.provisioning import ProvisionRequest

log = logging.getLogger(__name__)

REMOTES = table_of(Remote)
CONN = table_of(Connectivity)
CFG = table_of(DeviceConfigRecord)
CMD = table_of(CommandRecord)
CRED = table_of(DeviceCredential)
PREVIOUS = table_of(PreviousCredential)
WINDOWS = table_of(ClaimWindow)
NONCES = table_of(ProvisionNonce)
AUDIT = table_of(SecurityAudit)

TokenStorage = Literal["sha256", "plaintext"]
REDACTED = "<redacted>"
_RETRIES = 3


@dataclass(frozen=True, slots=True)
class DeviceFacts:
    """What the bridge knows about one device before touching its credential."""

    device_id: str
    remote_id: int | None
    deleted: bool
    credential: str | None
    state: str | None
    session: int
    #: An operator's claim window is open (``device allow-claim``): no proof needed.
    claim_window: bool = False
    #: The credential has a password: a row made only to revoke a CMS-only device (and
    #: then restored) has none, and such a device claims without proof.
    holds_token: bool = False


@dataclass(frozen=True, slots=True)
class Provisioned:
    remote_id: int
    created: bool
    config: DeviceConfig


@dataclass(frozen=True, slots=True)
class PendingRotation:
    device_id: str
    username: str
    command_id: str
    deadline_ms: int
    #: The command's state, or ``None`` when the row is gone.
    command_state: str | None
    #: The new token from the command's args (``None`` once scrubbed or unreadable).
    token: str | None
    pending: PasswordHash | None


class DeviceGone(LookupError):
    """The device's ``remotes`` row is soft-deleted."""


def _hash_of(row: Any, prefix: str = "password") -> PasswordHash:
    return PasswordHash(
        getattr(row, f"{prefix}_hash"), getattr(row, f"{prefix}_salt"), row.iterations
    )


class SecurityStore:
    def __init__(
        self,
        engine: Engine,
        *,
        clock: Callable[[], int],
        token_storage: TokenStorage = "sha256",
        read_engine: Engine | None = None,
    ) -> None:
        """``read_engine``: for the periodic reads (``make_engine(..., read_only=True)``).
        On SQLite every transaction of ``engine`` takes the write lock, so a poll on it
        stalls the presence writer (profiled: 4 s of a 100,000-device restart)."""
        self._engine = engine
        self._read_engine = read_engine or engine
        self._clock = clock
        self._token_storage = token_storage
        self._caps = capabilities(engine)

    @property
    def engine(self) -> Engine:
        return self._engine

    def _locked(self, stmt: Any) -> Any:
        return self._caps.locked(stmt)

    def stored_token(self, token: str) -> str:
        """What goes into ``remotes.token`` for ``token`` (see README: the trade-off)."""
        return token if self._token_storage == "plaintext" else token_sha256(token)

    # -- reading ------------------------------------------------------------------------

    def facts(self, device_id: str) -> DeviceFacts:
        with self._engine.connect() as conn:
            remote = conn.execute(
                select(REMOTES.c.id, REMOTES.c.deleted_at).where(
                    REMOTES.c.device_identifier == device_id
                )
            ).first()
            cred = conn.execute(
                select(CRED.c.state, CRED.c.password_hash).where(CRED.c.device_id == device_id)
            ).first()
            state = conn.execute(
                select(CONN.c.state, CONN.c.session).where(CONN.c.device_id == device_id)
            ).first()
            window = conn.execute(
                select(WINDOWS.c.device_id).where(
                    WINDOWS.c.device_id == device_id, WINDOWS.c.expires_ms > self._clock()
                )
            ).first()
        return DeviceFacts(
            device_id=device_id,
            remote_id=int(remote.id) if remote is not None else None,
            deleted=remote is not None and remote.deleted_at is not None,
            credential=cred.state if cred is not None else None,
            state=state.state if state is not None else None,
            session=int(state.session) if state is not None else 0,
            claim_window=window is not None,
            holds_token=cred is not None and bool(cred.password_hash),
        )

    def proofs(self, device_id: str, previous_since_ms: int) -> list[PasswordHash]:
        """The hashes a provisioning request's ``proof_token`` may match: the current
        password, one a rotation is delivering, and the one replaced last if that was
        after ``previous_since_ms``."""
        with self._engine.connect() as conn:
            cred = conn.execute(select(CRED).where(CRED.c.device_id == device_id)).first()
            previous = conn.execute(
                select(PREVIOUS).where(
                    PREVIOUS.c.device_id == device_id,
                    PREVIOUS.c.replaced_ms >= previous_since_ms,
                )
            ).first()
        found = []
        if cred is not None and cred.password_hash:
            found.append(_hash_of(cred))
            if cred.pending_hash and cred.pending_salt:
                found.append(_hash_of(cred, "pending"))
        if previous is not None:
            found.append(_hash_of(previous))
        return found

    def nonce_owner(self, nonce_hash: str) -> tuple[str, str] | None:
        """``(client_id, device_id)`` of the request that used this nonce, if any."""
        with self._engine.connect() as conn:
            row = conn.execute(
                select(NONCES.c.client_id, NONCES.c.device_id).where(
                    NONCES.c.nonce_sha256 == nonce_hash
                )
            ).first()
        return (row.client_id, row.device_id) if row is not None else None

    def credential(self, username: str) -> Any | None:
        with self._engine.connect() as conn:
            return conn.execute(select(CRED).where(CRED.c.username == username)).first()

    def device_config(self, device_id: str) -> DeviceConfig:
        with self._engine.connect() as conn:
            row = conn.execute(select(CFG).where(CFG.c.device_id == device_id)).first()
        if row is None:
            return DeviceConfig(version=0)
        return DeviceConfig(
            version=int(row.version),
            remote_control_enabled=bool(row.remote_control_enabled),
            status_interval_s=int(row.status_interval_s),
            display_url=row.display_url,
        )

    def audit_log(self, device_id: str | None = None) -> list[Any]:
        stmt = select(AUDIT).order_by(AUDIT.c.id)
        if device_id is not None:
            stmt = stmt.where(AUDIT.c.device_id == device_id)
        with self._engine.connect() as conn:
            return list(conn.execute(stmt).all())

    # -- provisioning ---------------------------------------------------------------------

    def claim_nonce(self, nonce_hash: str, client_id: str, device_id: str) -> bool:
        """Record a nonce as used; ``False`` if it was used before (a replay)."""
        try:
            with self._engine.begin() as conn:
                conn.execute(
                    insert(NONCES).values(
                        nonce_sha256=nonce_hash,
                        client_id=client_id,
                        device_id=device_id,
                        created_ms=self._clock(),
                    )
                )
        except IntegrityError:
            return False
        return True

    def open_claim_window(self, device_id: str, for_ms: int, requested_by: str | None) -> int:
        """Allow one claim of ``device_id`` without proof until now + ``for_ms``;
        returns that deadline. Replaces a window that is open already."""
        now_ms = self._clock()
        expires_ms = now_ms + for_ms
        with self._engine.begin() as conn:
            conn.execute(delete(WINDOWS).where(WINDOWS.c.device_id == device_id))
            conn.execute(
                insert(WINDOWS).values(
                    device_id=device_id,
                    opened_ms=now_ms,
                    expires_ms=expires_ms,
                    opened_by=(requested_by or "")[:128] or None,
                )
            )
            self._audit(
                conn, device_id, "claim_allowed", requested_by, f"until {expires_ms} (epoch ms)"
            )
        return expires_ms

    def prune_nonces(self, older_than_ms: int) -> int:
        with self._engine.begin() as conn:
            result = conn.execute(delete(NONCES).where(NONCES.c.created_ms < older_than_ms))
        return int(result.rowcount or 0)

    def record_provisioned(
        self,
        request: ProvisionRequest,
        token: str,
        hashed: PasswordHash,
        client_id: str,
        *,
        granted_by: str | None = None,
    ) -> Provisioned:
        """Create or update the ``remotes`` row (never a second one) and the credential.
        ``granted_by`` says why a device with a credential could be claimed again
        (``proof``, ``claim_window``); a claim window is used up here."""
        for attempt in range(_RETRIES):
            try:
                return self._record_provisioned(request, token, hashed, client_id, granted_by)
            except IntegrityError:
                # Someone (the CMS, another bridge) inserted the row meanwhile: update it.
                if attempt == _RETRIES - 1:
                    raise
                log.info("provisioning %s raced another writer; retrying", request.device_id)
        raise AssertionError("unreachable")

    def _record_provisioned(
        self,
        request: ProvisionRequest,
        token: str,
        hashed: PasswordHash,
        client_id: str,
        granted_by: str | None,
    ) -> Provisioned:
        now_ms = self._clock()
        now = utc_naive(now_ms)
        meta = {
            key: value
            for key, value in {
                "app_version": request.app_version,
                "android_version": request.android_version,
                "ip_address": request.ip_address,
                "mac_address": request.mac_address,
            }.items()
            if value is not None
        }
        device_id = request.device_id
        with self._engine.begin() as conn:
            row = conn.execute(
                self._locked(
                    select(REMOTES.c.id, REMOTES.c.deleted_at).where(
                        REMOTES.c.device_identifier == device_id
                    )
                )
            ).first()
            if row is not None and row.deleted_at is not None:
                raise DeviceGone(device_id)
            created = row is None
            if row is None:
                result = conn.execute(
                    insert(REMOTES).values(
                        device_identifier=device_id,
                        token=self.stored_token(token),
                        status="Disconnected",
                        remote_control_enabled=False,
                        created_at=now,
                        updated_at=now,
                        **meta,
                    )
                )
                remote_id = inserted_id(result)
            else:
                remote_id = int(row.id)
                conn.execute(
                    update(REMOTES)
                    .where(REMOTES.c.id == remote_id)
                    .values(token=self.stored_token(token), updated_at=now, **meta)
                )
            self._set_credential(conn, device_id, hashed, now_ms)
            if granted_by == "claim_window":
                conn.execute(delete(WINDOWS).where(WINDOWS.c.device_id == device_id))
            how = f", granted by {granted_by}" if granted_by else ""
            self._audit(
                conn,
                device_id,
                "provisioned",
                f"claim:{client_id}",
                f"{'new' if created else 'existing'} remote {remote_id}{how}",
            )
        return Provisioned(remote_id, created, self.device_config(device_id))

    def _set_credential(
        self, conn: Connection, device_id: str, hashed: PasswordHash, now_ms: int
    ) -> None:
        current = conn.execute(
            self._locked(
                select(
                    CRED.c.generation,
                    CRED.c.state,
                    CRED.c.password_hash,
                    CRED.c.password_salt,
                    CRED.c.iterations,
                ).where(CRED.c.device_id == device_id)
            )
        ).first()
        values: dict[str, Any] = {
            "state": CredentialState.ACTIVE.value,
            "password_hash": hashed.hash_b64,
            "password_salt": hashed.salt_b64,
            "iterations": hashed.iterations,
            "pending_hash": None,
            "pending_salt": None,
            "rotation_command_id": None,
            "rotation_deadline_ms": None,
            "rotation_requested_by": None,
            "revoked_ms": None,
            "revoked_by": None,
            "updated_ms": now_ms,
        }
        if current is None:
            conn.execute(
                insert(CRED).values(
                    device_id=device_id,
                    username=device_id,
                    generation=1,
                    created_ms=now_ms,
                    **values,
                )
            )
        else:
            conn.execute(
                update(CRED)
                .where(CRED.c.device_id == device_id)
                .values(generation=int(current.generation) + 1, **values)
            )
            if current.password_hash:
                self._keep_previous(conn, device_id, _hash_of(current), now_ms)

    def _keep_previous(
        self, conn: Connection, device_id: str, replaced: PasswordHash, now_ms: int
    ) -> None:
        """Remember the password being replaced (only the last one) as a proof."""
        conn.execute(delete(PREVIOUS).where(PREVIOUS.c.device_id == device_id))
        conn.execute(
            insert(PREVIOUS).values(
                device_id=device_id,
                password_hash=replaced.hash_b64,
                password_salt=replaced.salt_b64,
                iterations=replaced.iterations,
                replaced_ms=now_ms,
            )
        )

    def enroll(self, device_id: str, hashed: PasswordHash, requested_by: str | None) -> int:
        """An operator-made credential (labs, simulators): the row and credential as
        provisioning would make them, without a claim. Returns the remote id."""
        now_ms = self._clock()
        now = utc_naive(now_ms)
        with self._engine.begin() as conn:
            row = conn.execute(
                select(REMOTES.c.id).where(REMOTES.c.device_identifier == device_id)
            ).first()
            if row is None:
                remote_id = inserted_id(
                    conn.execute(
                        insert(REMOTES).values(
                            device_identifier=device_id,
                            status="Disconnected",
                            remote_control_enabled=False,
                            created_at=now,
                            updated_at=now,
                        )
                    )
                )
            else:
                remote_id = int(row.id)
            self._set_credential(conn, device_id, hashed, now_ms)
            self._audit(conn, device_id, "enrolled", requested_by, None)
        return remote_id

    # -- rotation ----------------------------------------------------------------------

    def start_rotation(
        self,
        conn: Connection,
        device_id: str,
        pending: PasswordHash,
        command_id: str,
        deadline_ms: int,
        requested_by: str | None,
    ) -> None:
        """Mark the rotation pending, in the transaction that also inserts its command:
        the bridge's rotation check must never see one without the other (it would end
        the rotation as aborted while the device goes on to adopt the new token)."""
        now_ms = self._clock()
        result = conn.execute(
            update(CRED)
            .where(
                CRED.c.device_id == device_id,
                CRED.c.state == CredentialState.ACTIVE.value,
                CRED.c.rotation_command_id.is_(None),
            )
            .values(
                pending_hash=pending.hash_b64,
                pending_salt=pending.salt_b64,
                rotation_command_id=command_id,
                rotation_deadline_ms=deadline_ms,
                rotation_requested_by=requested_by,
                updated_ms=now_ms,
            )
        )
        if result.rowcount != 1:
            raise LookupError(
                f"{device_id} has no active credential, or a rotation is already running"
            )
        self._audit(
            conn,
            device_id,
            "rotate_requested",
            requested_by,
            f"command {command_id}, deadline {deadline_ms}",
        )

    def pending_rotations(self) -> list[PendingRotation]:
        with self._read_engine.connect() as conn:
            rows = conn.execute(
                select(
                    CRED.c.device_id,
                    CRED.c.username,
                    CRED.c.rotation_command_id,
                    CRED.c.rotation_deadline_ms,
                    CRED.c.pending_hash,
                    CRED.c.pending_salt,
                    CRED.c.iterations,
                    CMD.c.state,
                    CMD.c.args,
                )
                .select_from(CRED.outerjoin(CMD, CMD.c.id == CRED.c.rotation_command_id))
                .where(CRED.c.rotation_command_id.is_not(None))
            ).all()
        pending = []
        for row in rows:
            token = None
            try:
                token = json.loads(row.args or "{}").get("token")
            except (ValueError, AttributeError):
                token = None
            pending.append(
                PendingRotation(
                    device_id=row.device_id,
                    username=row.username,
                    command_id=row.rotation_command_id,
                    deadline_ms=int(row.rotation_deadline_ms or 0),
                    command_state=row.state,
                    token=token if isinstance(token, str) and token != REDACTED else None,
                    pending=_hash_of(row, "pending") if row.pending_hash else None,
                )
            )
        return pending

    def finish_rotation(
        self, rotation: PendingRotation, *, applied: bool, action: str, detail: str
    ) -> None:
        """End a rotation: adopt the new password (``applied``) or drop it; scrub the
        token from the command, and cancel the command if it is still open."""
        now_ms = self._clock()
        now = utc_naive(now_ms)
        with self._engine.begin() as conn:
            values: dict[str, Any] = {
                "pending_hash": None,
                "pending_salt": None,
                "rotation_command_id": None,
                "rotation_deadline_ms": None,
                "rotation_requested_by": None,
                "updated_ms": now_ms,
            }
            cred = None
            if applied and rotation.pending is not None:
                cred = conn.execute(
                    select(
                        CRED.c.generation,
                        CRED.c.password_hash,
                        CRED.c.password_salt,
                        CRED.c.iterations,
                    ).where(CRED.c.device_id == rotation.device_id)
                ).first()
                values.update(
                    password_hash=rotation.pending.hash_b64,
                    password_salt=rotation.pending.salt_b64,
                    generation=(int(cred.generation) if cred else 0) + 1,
                )
                if rotation.token is not None:
                    conn.execute(
                        update(REMOTES)
                        .where(REMOTES.c.device_identifier == rotation.device_id)
                        .values(token=self.stored_token(rotation.token), updated_at=now)
                    )
            adopted = conn.execute(
                update(CRED)
                .where(
                    CRED.c.device_id == rotation.device_id,
                    CRED.c.rotation_command_id == rotation.command_id,
                )
                .values(**values)
            ).rowcount
            if applied and adopted and cred is not None and cred.password_hash:
                # After the credential row (bridge/db/locks.py), and only when this call
                # ended the rotation.
                self._keep_previous(conn, rotation.device_id, _hash_of(cred), now_ms)
            conn.execute(
                update(CMD)
                .where(CMD.c.id == rotation.command_id, CMD.c.state.in_(_OPEN))
                .values(
                    state=CommandState.CANCELLED.value,
                    finished_at=now,
                    last_error=f"rotation ended: {action}",
                )
            )
            conn.execute(
                update(CMD)
                .where(CMD.c.id == rotation.command_id)
                .values(args=json.dumps({"token": REDACTED}))
            )
            requested = conn.execute(
                select(AUDIT.c.requested_by)
                .where(
                    AUDIT.c.device_id == rotation.device_id, AUDIT.c.action == "rotate_requested"
                )
                .order_by(AUDIT.c.id.desc())
                .limit(1)
            ).first()
            self._audit(
                conn,
                rotation.device_id,
                action,
                requested.requested_by if requested else None,
                detail,
            )

    # -- revocation ---------------------------------------------------------------------

    def mark_revoked(self, device_id: str, requested_by: str | None, detail: str | None) -> None:
        now_ms = self._clock()
        with self._engine.begin() as conn:
            cred = conn.execute(
                self._locked(
                    select(CRED.c.generation, CRED.c.rotation_command_id).where(
                        CRED.c.device_id == device_id
                    )
                )
            ).first()
            if cred is None:
                # A device known only to the CMS (no MQTT credential yet) is revoked too:
                # the row keeps provisioning from handing it one until it is restored.
                conn.execute(
                    insert(CRED).values(
                        device_id=device_id,
                        username=device_id,
                        state=CredentialState.REVOKED.value,
                        password_hash="",
                        password_salt="",
                        iterations=ITERATIONS,
                        generation=1,
                        created_ms=now_ms,
                        updated_ms=now_ms,
                        revoked_ms=now_ms,
                        revoked_by=requested_by,
                    )
                )
            else:
                if cred.rotation_command_id:
                    self._cancel_command(conn, cred.rotation_command_id, "credential revoked")
                conn.execute(
                    update(CRED)
                    .where(CRED.c.device_id == device_id)
                    .values(
                        state=CredentialState.REVOKED.value,
                        generation=int(cred.generation) + 1,
                        pending_hash=None,
                        pending_salt=None,
                        rotation_command_id=None,
                        rotation_deadline_ms=None,
                        rotation_requested_by=None,
                        revoked_ms=now_ms,
                        revoked_by=requested_by,
                        updated_ms=now_ms,
                    )
                )
            self._audit(conn, device_id, "revoked", requested_by, detail)

    def _cancel_command(self, conn: Connection, command_id: str, why: str) -> None:
        conn.execute(
            update(CMD)
            .where(CMD.c.id == command_id, CMD.c.state.in_(_OPEN))
            .values(
                state=CommandState.CANCELLED.value,
                finished_at=utc_naive(self._clock()),
                last_error=why,
            )
        )
        conn.execute(
            update(CMD).where(CMD.c.id == command_id).values(args=json.dumps({"token": REDACTED}))
        )

    def soft_delete(self, device_id: str, requested_by: str | None, detail: str | None) -> bool:
        now_ms = self._clock()
        with self._engine.begin() as conn:
            result = conn.execute(
                update(REMOTES)
                .where(REMOTES.c.device_identifier == device_id, REMOTES.c.deleted_at.is_(None))
                .values(deleted_at=utc_naive(now_ms), updated_at=utc_naive(now_ms))
            )
            self._audit(conn, device_id, "deleted", requested_by, detail)
        return bool(result.rowcount)

    def restore(self, device_id: str, requested_by: str | None) -> tuple[bool, bool]:
        """Undelete the row and re-activate the credential; ``(undeleted, reactivated)``."""
        now_ms = self._clock()
        now = utc_naive(now_ms)
        with self._engine.begin() as conn:
            undeleted = conn.execute(
                update(REMOTES)
                .where(REMOTES.c.device_identifier == device_id, REMOTES.c.deleted_at.is_not(None))
                .values(deleted_at=None, updated_at=now)
            ).rowcount
            cred = conn.execute(
                select(CRED.c.generation).where(
                    CRED.c.device_id == device_id, CRED.c.state == CredentialState.REVOKED.value
                )
            ).first()
            if cred is not None:
                conn.execute(
                    update(CRED)
                    .where(CRED.c.device_id == device_id)
                    .values(
                        state=CredentialState.ACTIVE.value,
                        generation=int(cred.generation) + 1,
                        revoked_ms=None,
                        revoked_by=None,
                        updated_ms=now_ms,
                    )
                )
            self._audit(conn, device_id, "restored", requested_by, None)
        return bool(undeleted), cred is not None

    def connectivity(self, device_id: str) -> tuple[str | None, int]:
        with self._engine.connect() as conn:
            row = conn.execute(
                select(CONN.c.state, CONN.c.session).where(CONN.c.device_id == device_id)
            ).first()
        return (row.state, int(row.session)) if row is not None else (None, 0)

    # -- audit ----------------------------------------------------------------------------------

    def audit(
        self, device_id: str | None, action: str, requested_by: str | None, detail: str | None
    ) -> None:
        with self._engine.begin() as conn:
            self._audit(conn, device_id, action, requested_by, detail)

    def _audit(
        self,
        conn: Connection,
        device_id: str | None,
        action: str,
        requested_by: str | None,
        detail: str | None,
    ) -> None:
        conn.execute(
            insert(AUDIT).values(
                at_ms=self._clock(),
                device_id=device_id,
                action=action,
                requested_by=(requested_by or "")[:128] or None,
                detail=detail,
            )
        )
        log.info(
            "security: %s device=%s requested_by=%s %s",
            action,
            device_id,
            requested_by,
            detail or "",
        )


_OPEN = [s.value for s in OPEN_STATES]


def needs_proof(facts: DeviceFacts) -> bool:
    """Whether a claim of this device needs proof (its token) or an operator's window:
    it holds an active credential with a password. A device never provisioned, or a
    CMS-only one revoked and restored (a row with no password), is claimed without."""
    return facts.credential == CredentialState.ACTIVE.value and facts.holds_token


def is_online(facts: DeviceFacts) -> bool:
    return facts.state == ConnState.ONLINE.value
