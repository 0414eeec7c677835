"""The bridge's own security tables (``kb_`` prefix; ``remotes`` is never extended).

``kb_device_credentials`` is the bridge's record of each device's MQTT credential: its
state, the salted hash (the embedded broker authenticates against it; with Mosquitto the
dynamic-security plugin holds its own copy) and a rotation in progress. The token itself
is stored nowhere in clear, except, while a rotation is on its way to the device, in the
``rotate_token`` command's args (scrubbed once the rotation ends).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from sqlalchemy import BigInteger, Column, Engine, Index, Integer, String, Text, inspect
from sqlmodel import Field, SQLModel

from bridge.db.models import BigId
from bridge.db.tables import table_of


class CredentialState(StrEnum):
    ACTIVE = "active"
    #: Disabled by ``device revoke`` (or ``device delete``); ``device restore`` re-enables.
    REVOKED = "revoked"


class DeviceCredential(SQLModel, table=True):
    __tablename__ = "kb_device_credentials"

    device_id: str = Field(sa_column=Column(String(64), primary_key=True))
    username: str = Field(sa_column=Column(String(64), nullable=False, unique=True))
    state: str = Field(sa_column=Column(String(16), nullable=False))
    password_hash: str = Field(sa_column=Column(String(128), nullable=False))
    password_salt: str = Field(sa_column=Column(String(32), nullable=False))
    iterations: int = Field(sa_column=Column(Integer, nullable=False))
    #: Bumped at every change of password or state: the embedded broker drops sessions
    #: that authenticated under an older generation.
    generation: int = Field(default=1, sa_column=Column(BigInteger, nullable=False, default=1))
    #: The rotation in progress: the new password's hash (valid on the embedded broker
    #: alongside the old one), the command carrying it and when the old one stops.
    pending_hash: str | None = Field(default=None, sa_column=Column(String(128), nullable=True))
    pending_salt: str | None = Field(default=None, sa_column=Column(String(32), nullable=True))
    rotation_command_id: str | None = Field(
        default=None, sa_column=Column(String(36), nullable=True)
    )
    rotation_deadline_ms: int | None = Field(
        default=None, sa_column=Column(BigInteger, nullable=True)
    )
    rotation_requested_by: str | None = Field(
        default=None, sa_column=Column(String(128), nullable=True)
    )
    created_ms: int = Field(sa_column=Column(BigInteger, nullable=False))
    updated_ms: int = Field(sa_column=Column(BigInteger, nullable=False))
    revoked_ms: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    revoked_by: str | None = Field(default=None, sa_column=Column(String(128), nullable=True))


class PreviousCredential(SQLModel, table=True):
    """The password a device had before its last change (re-provisioning, rotation):
    still accepted as *proof* in a provisioning request for a while (a kiosk that missed
    a forced rotation while switched off), never as a broker password."""

    __tablename__ = "kb_previous_credentials"

    device_id: str = Field(sa_column=Column(String(64), primary_key=True))
    password_hash: str = Field(sa_column=Column(String(128), nullable=False))
    password_salt: str = Field(sa_column=Column(String(32), nullable=False))
    iterations: int = Field(sa_column=Column(Integer, nullable=False))
    replaced_ms: int = Field(sa_column=Column(BigInteger, nullable=False))


class ClaimWindow(SQLModel, table=True):
    """An operator's permission (``kiosk-bridge device allow-claim``) for one claim of a
    device that holds an active credential, without proof; used up by that claim."""

    __tablename__ = "kb_claim_windows"

    device_id: str = Field(sa_column=Column(String(64), primary_key=True))
    opened_ms: int = Field(sa_column=Column(BigInteger, nullable=False))
    expires_ms: int = Field(sa_column=Column(BigInteger, nullable=False))
    opened_by: str | None = Field(default=None, sa_column=Column(String(128), nullable=True))


class ProvisionNonce(SQLModel, table=True):
    """Nonces of answered provisioning requests: a replay is recognised across restarts
    and bridge instances."""

    __tablename__ = "kb_provision_nonces"
    __table_args__ = (Index("ix_kb_provision_nonces_created", "created_ms"),)

    nonce_sha256: str = Field(sa_column=Column(String(64), primary_key=True))
    client_id: str = Field(sa_column=Column(String(64), nullable=False))
    device_id: str = Field(sa_column=Column(String(64), nullable=False))
    created_ms: int = Field(sa_column=Column(BigInteger, nullable=False))


class SecurityAudit(SQLModel, table=True):
    """Append-only: every credential change, who asked for it and why."""

    __tablename__ = "kb_security_audit"
    __table_args__ = (Index("ix_kb_security_audit_device_at", "device_id", "at_ms"),)

    id: int | None = Field(
        default=None, sa_column=Column(BigId, primary_key=True, autoincrement=True)
    )
    at_ms: int = Field(sa_column=Column(BigInteger, nullable=False))
    device_id: str | None = Field(default=None, sa_column=Column(String(64), nullable=True))
    #: provisioned | provision_refused | rotate_requested | rotated | rotate_forced |
    #: rotate_aborted | revoked | deleted | restored | enrolled | claim_allowed
    action: str = Field(sa_column=Column(String(32), nullable=False))
    requested_by: str | None = Field(default=None, sa_column=Column(String(128), nullable=True))
    detail: str | None = Field(default=None, sa_column=Column(Text, nullable=True))


SECURITY_TABLES = (
    DeviceCredential,
    PreviousCredential,
    ClaimWindow,
    ProvisionNonce,
    SecurityAudit,
)


def create_security_schema(engine: Engine) -> list[str]:
    """Create the missing security tables; returns the names created."""
    existing = set(inspect(engine).get_table_names())
    tables: list[Any] = [table_of(model) for model in SECURITY_TABLES]
    SQLModel.metadata.create_all(engine, tables=tables)
    return [m.__tablename__ for m in SECURITY_TABLES if m.__tablename__ not in existing]
