"""SQL tables: the CMS's ``remotes`` (as Laravel created it) and the bridge's own.

``remotes`` is shared with the CMS: the bridge writes only the columns it documents and
never adds columns. Tables the bridge owns are prefixed ``kb_``. Times in ``remotes`` are
naive UTC datetimes (Laravel's default); the bridge's own tables keep epoch milliseconds
so that lags and uptime need no timezone arithmetic.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Boolean, Column, DateTime, Float, Index, Integer, String, Text
from sqlalchemy.dialects import mysql
from sqlmodel import Field, SQLModel

# SQLite only auto-increments an INTEGER PRIMARY KEY (the rowid alias), not a BIGINT one.
BigId = BigInteger().with_variant(Integer(), "sqlite")
# MySQL's DATETIME keeps whole seconds unless told otherwise; command timings need ms.
PreciseTime = DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


class Remote(SQLModel, table=True):
    __tablename__ = "remotes"

    id: int | None = Field(
        default=None, sa_column=Column(BigId, primary_key=True, autoincrement=True)
    )
    # 191 chars: the longest utf8mb4 string a unique index takes on older MySQL.
    device_identifier: str = Field(sa_column=Column(String(191), nullable=False, unique=True))
    token: str | None = Field(default=None, sa_column=Column(String(64), nullable=True))
    name: str | None = Field(default=None, sa_column=Column(String(255), nullable=True))
    status: str = Field(default="Disconnected", sa_column=Column(String(32), nullable=False))
    last_seen_at: datetime | None = Field(default=None, sa_column=Column(DateTime, nullable=True))
    battery_level: int | None = Field(default=None, sa_column=Column(Integer, nullable=True))
    wifi_strength: int | None = Field(default=None, sa_column=Column(Integer, nullable=True))
    screen_on: bool | None = Field(default=None, sa_column=Column(Boolean, nullable=True))
    storage_available_mb: int | None = Field(
        default=None, sa_column=Column(BigInteger, nullable=True)
    )
    storage_total_mb: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    ram_usage_mb: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    ram_total_mb: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    cpu_temp: float | None = Field(default=None, sa_column=Column(Float, nullable=True))
    network_type: str | None = Field(default=None, sa_column=Column(String(32), nullable=True))
    current_url: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    app_version: str | None = Field(default=None, sa_column=Column(String(128), nullable=True))
    android_version: str | None = Field(default=None, sa_column=Column(String(128), nullable=True))
    ip_address: str | None = Field(default=None, sa_column=Column(String(45), nullable=True))
    mac_address: str | None = Field(default=None, sa_column=Column(String(17), nullable=True))
    remote_control_enabled: bool = Field(
        default=False, sa_column=Column(Boolean, nullable=False, default=False)
    )
    created_at: datetime | None = Field(default=None, sa_column=Column(DateTime, nullable=True))
    updated_at: datetime | None = Field(default=None, sa_column=Column(DateTime, nullable=True))
    deleted_at: datetime | None = Field(default=None, sa_column=Column(DateTime, nullable=True))


class Connectivity(SQLModel, table=True):
    """One row per device: the state machine's stored state plus bookkeeping."""

    __tablename__ = "kb_connectivity"

    device_id: str = Field(sa_column=Column(String(64), primary_key=True))
    state: str = Field(sa_column=Column(String(16), nullable=False))
    session: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    since_ms: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    reason: str | None = Field(default=None, sa_column=Column(String(32), nullable=True))
    status_session: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    last_seq: int = Field(default=-1, sa_column=Column(BigInteger, nullable=False, default=-1))
    last_status_ms: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    last_device_ts_ms: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    flap_penalty: float = Field(default=0.0, sa_column=Column(Float, nullable=False, default=0.0))
    flap_at_ms: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    flapping: bool = Field(default=False, sa_column=Column(Boolean, nullable=False, default=False))
    transitions: int = Field(default=0, sa_column=Column(Integer, nullable=False, default=0))
    #: What the bridge last wrote into ``remotes.status``.
    legacy_status: str | None = Field(default=None, sa_column=Column(String(16), nullable=True))
    #: ``config_version`` the device reported in its last status.
    config_version: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    #: Telemetry arrives faster than the bridge's per-device rate: throttled.
    noisy: bool = Field(default=False, sa_column=Column(Boolean, nullable=False, default=False))
    #: Set after a successful wipe: the device must be provisioned again.
    needs_provisioning: bool = Field(
        default=False, sa_column=Column(Boolean, nullable=False, default=False)
    )
    #: Instance that wrote the row last.
    writer: str | None = Field(default=None, sa_column=Column(String(128), nullable=True))
    updated_ms: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))


class PresenceHistory(SQLModel, table=True):
    """Append-only: every presence event the bridge received, applied or not."""

    __tablename__ = "kb_presence_history"
    __table_args__ = (
        Index("ix_kb_presence_history_device_received", "device_id", "received_ms"),
        Index("ix_kb_presence_history_received", "received_ms"),
    )

    id: int | None = Field(
        default=None, sa_column=Column(BigId, primary_key=True, autoincrement=True)
    )
    device_id: str = Field(sa_column=Column(String(64), nullable=False))
    state: str = Field(sa_column=Column(String(16), nullable=False))
    prev_state: str | None = Field(default=None, sa_column=Column(String(16), nullable=True))
    session: int = Field(sa_column=Column(BigInteger, nullable=False))
    reason: str | None = Field(default=None, sa_column=Column(String(32), nullable=True))
    #: applied | reset | stale | duplicate | deleted (soft-deleted device, ignored) |
    #: reconciled (set unknown: no retained presence at start-up) | unknown_device (not a
    #: birth, and no ``remotes`` row: ignored, no connectivity row is made)
    verdict: str = Field(sa_column=Column(String(16), nullable=False))
    device_ts_ms: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    received_ms: int = Field(sa_column=Column(BigInteger, nullable=False))
    committed_ms: int = Field(sa_column=Column(BigInteger, nullable=False))
    writer: str | None = Field(default=None, sa_column=Column(String(128), nullable=True))


class CommandRecord(SQLModel, table=True):
    """A command's whole life; also the outbox: the CMS inserts ``queued`` rows here.

    Times are naive UTC datetimes so that Laravel can insert and read rows natively.
    """

    __tablename__ = "kb_commands"
    __table_args__ = (
        Index("ix_kb_commands_state", "state"),
        Index("ix_kb_commands_device_created", "device_id", "created_at"),
        Index("ix_kb_commands_device_type_state", "device_id", "type", "state"),
        Index("ix_kb_commands_claim", "claim"),
    )

    #: UUID, the idempotency key; also the id on the wire.
    id: str = Field(sa_column=Column(String(36), primary_key=True))
    device_id: str = Field(sa_column=Column(String(64), nullable=False))
    type: str = Field(sa_column=Column(String(32), nullable=False))
    #: JSON object.
    args: str = Field(default="{}", sa_column=Column(Text, nullable=False, default="{}"))
    #: queued, sent, delivered, received, succeeded, failed, rejected, expired,
    #: cancelled, superseded
    state: str = Field(default="queued", sa_column=Column(String(16), nullable=False))
    created_at: datetime = Field(sa_column=Column(PreciseTime, nullable=False))
    sent_at: datetime | None = Field(default=None, sa_column=Column(PreciseTime, nullable=True))
    delivered_at: datetime | None = Field(
        default=None, sa_column=Column(PreciseTime, nullable=True)
    )
    acked_at: datetime | None = Field(default=None, sa_column=Column(PreciseTime, nullable=True))
    finished_at: datetime | None = Field(default=None, sa_column=Column(PreciseTime, nullable=True))
    expires_at: datetime = Field(sa_column=Column(PreciseTime, nullable=False))
    attempts: int = Field(default=0, sa_column=Column(Integer, nullable=False, default=0))
    #: Token of the last claim for sending: lets one set-based UPDATE claim a batch and
    #: tell the claimer which rows are its own when several bridges poll the outbox.
    claim: str | None = Field(default=None, sa_column=Column(String(36), nullable=True))
    #: When to send again if the device has not acknowledged by then.
    retry_at: datetime | None = Field(default=None, sa_column=Column(PreciseTime, nullable=True))
    last_error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    requested_by: str | None = Field(default=None, sa_column=Column(String(128), nullable=True))
    #: Free text from the requester (required for wipe: the audit trail).
    reason: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    #: Device's ack detail (error message on failure).
    detail: str | None = Field(default=None, sa_column=Column(Text, nullable=True))


class DeviceConfigRecord(SQLModel, table=True):
    """The desired configuration the bridge publishes retained on ``config``."""

    __tablename__ = "kb_device_config"

    device_id: str = Field(sa_column=Column(String(64), primary_key=True))
    version: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    remote_control_enabled: bool = Field(
        default=False, sa_column=Column(Boolean, nullable=False, default=False)
    )
    status_interval_s: int = Field(default=30, sa_column=Column(Integer, nullable=False))
    display_url: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    updated_at: datetime | None = Field(default=None, sa_column=Column(PreciseTime, nullable=True))
    #: When the bridge last published this version retained (NULL: not yet).
    published_version: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))


class HttpDevice(SQLModel, table=True):
    """What the HTTP face knows about a device that the CMS tables lack: a device with
    a row here registered or heartbeated over HTTP (see bridge/http/README.md)."""

    __tablename__ = "kb_http_devices"
    # Heartbeats authenticate by the hash: an indexed lookup instead of a scan of
    # ``remotes.token``, which the CMS's schema does not index.
    __table_args__ = (
        Index("ix_kb_http_devices_token", "token_sha256"),
        Index("ix_kb_http_devices_previous_token", "previous_token_sha256"),
    )

    device_id: str = Field(sa_column=Column(String(64), primary_key=True))
    #: SHA-256 (hex) of the last token the bridge issued or accepted for the device; a
    #: presented token with this hash that ``remotes.token`` no longer holds is revoked.
    token_sha256: str | None = Field(default=None, sa_column=Column(String(64), nullable=True))
    #: The token it replaced: presenting that one answers "revoked", not "invalid".
    previous_token_sha256: str | None = Field(
        default=None, sa_column=Column(String(64), nullable=True)
    )
    #: The last presence session the HTTP face started for the device (0: none yet).
    session: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    registered_ms: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    updated_ms: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))


class BridgeInstance(SQLModel, table=True):
    """Every ``kiosk-bridge run`` that uses this database, leader or standby, with its
    heartbeat (written every second): how views tell live truth from frozen truth."""

    __tablename__ = "kb_bridges"

    instance: str = Field(sa_column=Column(String(64), primary_key=True))
    host: str = Field(sa_column=Column(String(255), nullable=False))
    pid: int = Field(default=0, sa_column=Column(Integer, nullable=False, default=0))
    version: str = Field(sa_column=Column(String(64), nullable=False))
    #: The broker URL without credentials (``mqtt://host:port``), for ``doctor``/``watch``.
    broker: str = Field(sa_column=Column(String(255), nullable=False))
    #: ``leader`` (writes), ``standby`` (waits for the lease), ``shared`` (a member of a
    #: shared-subscription group: writes its share), ``stopped`` (left cleanly).
    role: str = Field(sa_column=Column(String(16), nullable=False))
    #: Whether its presence link was connected at this heartbeat: a leader cut off from
    #: the broker hands the lease to a standby that is not.
    broker_connected: bool = Field(
        default=False, sa_column=Column(Boolean, nullable=False, default=False)
    )
    started_ms: int = Field(sa_column=Column(BigInteger, nullable=False))
    heartbeat_ms: int = Field(sa_column=Column(BigInteger, nullable=False))
    stopped_ms: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))


class WriterLease(SQLModel, table=True):
    """The one writer of a database. ``token`` grows by one at every change of holder
    and fences every write transaction of the bridge (:mod:`bridge.db.fence`)."""

    __tablename__ = "kb_lease"

    name: str = Field(sa_column=Column(String(32), primary_key=True))
    holder: str | None = Field(default=None, sa_column=Column(String(64), nullable=True))
    token: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    expires_ms: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))


class BridgeMeta(SQLModel, table=True):
    """Facts about this database, e.g. its random ``database_id``: the fingerprint a
    bridge announces on the broker, so tools tell apart bridges of other databases."""

    __tablename__ = "kb_meta"

    key: str = Field(sa_column=Column(String(64), primary_key=True))
    value: str = Field(sa_column=Column(String(255), nullable=False))


BRIDGE_TABLES = (
    Connectivity,
    PresenceHistory,
    CommandRecord,
    DeviceConfigRecord,
    HttpDevice,
    BridgeInstance,
    WriterLease,
    BridgeMeta,
)
