"""The one typed settings object, built once at the edge (CLI) and passed down.

Values come from, in rising priority: defaults, ``KB_*`` environment variables, CLI
flags. Nothing else in the package reads the environment.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from bridge.broker_url import BrokerAddress, parse_broker_url
from bridge.http.settings import HttpSettings
from bridge.presence import FlapPolicy, PresenceRules
from bridge.security.embedded import default_credentials_path
from bridge.security.settings import SecuritySettings
from schemas import DEFAULT_PREFIX
from schemas.topics import shared as _check_group

MqttProtocol = Literal["auto", "5", "3.1.1"]


def _default_instance() -> str:
    return f"kb-{socket.gethostname()}"[:64]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KB_", frozen=True, extra="ignore")

    broker: str | None = Field(
        default=None,
        description="mqtt[s]://[user:pass@]host:port; unset = start the embedded broker",
    )
    listen: str = Field(default="127.0.0.1:1883", description="Embedded broker HOST:PORT")
    #: The embedded broker lets anyone connect and publish anything: a quick local try
    #: only. Off (secure) by default.
    embedded_open: bool = False
    #: The embedded broker's fixed credentials (``_bridge``, ``_ops``, ``_claim``); unset:
    #: next to the SQLite database (see :mod:`bridge.security.embedded`).
    embedded_credentials: str | None = None
    db: str = "sqlite:///kiosk-bridge.db"
    prefix: str = DEFAULT_PREFIX
    shared_group: str | None = None
    instance: str = Field(default_factory=_default_instance)
    #: MQTT version of the command connection ("auto": 5, or 3.1.1 if refused).
    mqtt_protocol: MqttProtocol = "auto"
    #: MQTT version of the presence/telemetry connection: 3.1.1 by default, since paho
    #: parses a message there at about 2.5x its MQTT 5 rate and nothing on it needs 5.
    presence_protocol: MqttProtocol = "3.1.1"
    keepalive_s: int = Field(default=10, ge=5, le=3600)
    #: The bridge's own persistent session survives this long without it.
    session_expiry_s: int = Field(default=3600, ge=0)
    reconnect_base_s: float = Field(default=0.5, gt=0)
    reconnect_cap_s: float = Field(default=30.0, gt=0)

    offline_grace_s: float = Field(default=0.0, ge=0)
    flap_half_life_s: float = Field(default=60.0, gt=0)
    flap_suppress_at: float = Field(default=5.0, gt=0)
    flap_reuse_below: float = Field(default=1.0, gt=0)
    reset_after_s: float = Field(default=10.0, ge=0)

    status_flush_s: float = Field(default=0.05, gt=0, le=10)
    status_batch_max: int = Field(default=2000, ge=1)
    #: At most one telemetry write per device per this many seconds (0: no limit).
    status_min_interval_s: float = Field(default=5.0, ge=0)
    presence_batch_max: int = Field(default=1000, ge=1)
    presence_buffer_max: int = Field(default=100_000, ge=100)
    db_retry_cap_s: float = Field(default=5.0, gt=0)

    #: The full outbox pass (claim, retries, expiry sweep) runs this often...
    command_poll_s: float = Field(default=0.5, gt=0, le=10)
    #: ...and a read-only probe for new commands this often (0 turns it off), so a row
    #: the CMS inserts is picked up within milliseconds.
    command_probe_s: float = Field(default=0.005, ge=0, le=10)
    command_ack_timeout_s: float = Field(default=15.0, gt=0)
    command_retry_cap_s: float = Field(default=120.0, gt=0)
    command_max_attempts: int = Field(default=5, ge=1, le=100)
    #: Publishes awaiting PUBACK at once: paces a fan-out.
    command_inflight: int = Field(default=200, ge=1, le=10_000)

    #: The HTTP face and the credential management read their own ``KB_*`` variables;
    #: they are parts of this one object, built at the same time.
    http: HttpSettings = Field(default_factory=HttpSettings)
    security: SecuritySettings = Field(default_factory=SecuritySettings)

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    #: History rows and finished commands older than this are pruned (0 keeps them).
    retention_days: float = Field(default=90.0, ge=0)
    retention_every_s: float = Field(default=3600.0, gt=0)

    @field_validator("instance")
    @classmethod
    def _instance_ok(cls, value: str) -> str:
        if not value or len(value) > 64 or any(ch in value for ch in "/+#\x00 "):
            raise ValueError("instance must be 1-64 characters without '/', '+', '#' or spaces")
        return value

    @field_validator("shared_group")
    @classmethod
    def _group_ok(cls, value: str | None) -> str | None:
        if value:
            _check_group("x", value)
        return value or None

    @field_validator("broker")
    @classmethod
    def _broker_ok(cls, value: str | None) -> str | None:
        if value:
            parse_broker_url(value)
        return value or None

    @property
    def broker_address(self) -> BrokerAddress | None:
        return parse_broker_url(self.broker) if self.broker else None

    @property
    def listen_address(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"--listen {self.listen!r} must be HOST:PORT, e.g. 127.0.0.1:1883")
        return host, int(port)

    @property
    def embedded_credentials_path(self) -> Path:
        if self.embedded_credentials:
            return Path(self.embedded_credentials)
        return default_credentials_path(self.db)

    @property
    def client_id(self) -> str:
        return f"kiosk-bridge-{self.instance}"

    @property
    def rules(self) -> PresenceRules:
        return PresenceRules(
            flap=FlapPolicy(
                half_life_ms=int(self.flap_half_life_s * 1000),
                suppress_at=self.flap_suppress_at,
                reuse_below=self.flap_reuse_below,
            ),
            reset_after_ms=int(self.reset_after_s * 1000),
            grace_ms=self.grace_ms,
        )

    @property
    def grace_ms(self) -> int:
        return int(self.offline_grace_s * 1000)


def load_settings(**overrides: object) -> Settings:
    """Environment plus explicit overrides (``None`` overrides are ignored)."""
    given = {key: value for key, value in overrides.items() if value is not None}
    return Settings(**given)  # type: ignore[arg-type]


__all__ = ["MqttProtocol", "Settings", "load_settings"]
