"""The one typed settings object, built once at the edge (CLI) and passed down.

Values come from, in rising priority: defaults, the renamed variables below (for one
release), ``KB_*`` environment variables, CLI flags. Nothing else in the package reads
the environment: the sections (:class:`HttpSettings` as ``Settings.http``,
:class:`SecuritySettings` as ``Settings.security``) are plain frozen models filled from
here, a section's field ``F`` from ``KB_<SECTION>__F`` (``env_nested_delimiter``), e.g.
``KB_HTTP__AUTH_FAIL_BURST``, ``KB_SECURITY__TOKEN_STORAGE``.

Renamed variables. The old names still work for one release: each one used raises a
``DeprecationWarning`` naming its new name (and ``run`` logs a warning at start); when
both are set, the new name wins.

==================================  ==========================================
old                                 new
==================================  ==========================================
``KB_API_KEYS``                     ``KB_HTTP__API_KEYS``
``KB_HTTP_<FIELD>``                 ``KB_HTTP__<FIELD>``, e.g.
                                    ``KB_HTTP__LISTEN``, ``KB_HTTP__AUTH_FAIL_BURST``,
                                    ``KB_HTTP__TRUSTED_PROXIES``,
                                    ``KB_HTTP__REGISTRATION_SECRET`` (every field of
                                    :class:`HttpSettings`)
``KB_TOKEN_STORAGE``                ``KB_SECURITY__TOKEN_STORAGE``
``KB_HTTP_TOKEN_STORAGE``           ``KB_SECURITY__TOKEN_STORAGE`` (if
                                    ``KB_TOKEN_STORAGE`` is unset)
``KB_CREDENTIAL_BACKEND``           ``KB_SECURITY__CREDENTIAL_BACKEND``
``KB_PROVISIONING``                 ``KB_SECURITY__PROVISIONING``
``KB_TLS_CA``                       ``KB_SECURITY__TLS_CA``
``KB_ROTATION_DEADLINE_S``          ``KB_SECURITY__ROTATION_DEADLINE_S``
``KB_ROTATION_POLL_S``              ``KB_SECURITY__ROTATION_POLL_S``
``KB_PREVIOUS_TOKEN_PROOF_S``       ``KB_SECURITY__PREVIOUS_TOKEN_PROOF_S``
``KB_PROOF_REQUIRED_RETRY_S``       ``KB_SECURITY__PROOF_REQUIRED_RETRY_S``
``KB_BRIDGE_USERNAME``              ``KB_SECURITY__BRIDGE_USERNAME``
``KB_OPS_USERNAME``                 ``KB_SECURITY__OPS_USERNAME``
``KB_CLAIM_USERNAME``               ``KB_SECURITY__CLAIM_USERNAME``
==================================  ==========================================

``remotes.token`` has one storage setting, ``security.token_storage``. Unset, it is
``plaintext`` when the HTTP face serves (``--http`` / ``KB_HTTP__LISTEN``: the CMS behind
it reads and issues tokens in clear, and in ``sha256`` mode a CMS-issued token is
refused) and ``sha256`` otherwise: what each side wrote by default before.
"""

from __future__ import annotations

import os
import secrets
import socket
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    Field,
    PrivateAttr,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from bridge.addresses import parse_host_port
from bridge.broker_url import BrokerAddress, parse_broker_url
from bridge.http.settings import HttpSettings
from bridge.presence import FlapPolicy, PresenceRules
from bridge.security.embedded import default_credentials_path
from bridge.security.settings import SecuritySettings
from schemas import DEFAULT_PREFIX
from schemas.topics import shared as _check_group

MqttProtocol = Literal["auto", "5", "3.1.1"]


def _default_instance() -> str:
    """Unique per process start: a second bridge started on this host without
    ``--instance`` must not take the first one's MQTT client ids (the CLI reuses the
    suffix of a bridge of this host that is no longer live, see
    :func:`bridge.service.runner.resolve_instance`, so a restart resumes its session)."""
    return f"kb-{socket.gethostname()}"[:57] + f"-{secrets.token_hex(3)}"


def _renamed() -> tuple[tuple[str, str, tuple[str, str]], ...]:
    """(old variable, new variable, (section, field)), in falling priority for a field
    that two old names fed (``token_storage``)."""
    table: list[tuple[str, str, tuple[str, str]]] = []
    for field in HttpSettings.model_fields:
        # ``KB_UI_KEYS`` is the name issue 21 gave the fleet page's keys: an alias too.
        flat = {"api_keys": "KB_API_KEYS", "ui_keys": "KB_UI_KEYS"}
        old = flat.get(field, f"KB_HTTP_{field.upper()}")
        table.append((old, f"KB_HTTP__{field.upper()}", ("http", field)))
    for field in SecuritySettings.model_fields:
        table.append((f"KB_{field.upper()}", f"KB_SECURITY__{field.upper()}", ("security", field)))
    # The HTTP face's own name for the same column: it decides only without the other.
    table.append(
        ("KB_HTTP_TOKEN_STORAGE", "KB_SECURITY__TOKEN_STORAGE", ("security", "token_storage"))
    )
    return tuple(table)


#: The variables renamed when the sections moved under ``Settings`` (see the table above).
RENAMED_VARIABLES = _renamed()
#: Where the names of the renamed variables in use travel from the source to the object.
_RENAMED_KEY = "_kb_renamed_in_use"


class _RenamedEnvSource(PydanticBaseSettingsSource):
    """The old, flat variable names, below the new ones in priority, each with a warning."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        super().__init__(settings_cls)
        self._environ = environ

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        # Unused: __call__ builds the nested values itself.
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        values: dict[str, dict[str, Any]] = {}
        in_use: list[str] = []
        for old, new, (section, field) in RENAMED_VARIABLES:
            if old not in self._environ:
                continue
            in_use.append(f"{old} -> {new}")
            if new in self._environ:
                note = f"{old} is deprecated and ignored: {new} is set and wins"
            elif field in values.get(section, {}):
                note = (
                    f"{old} is deprecated and ignored: a prior old name already set it; use {new}"
                )
            else:
                note = f"{old} is deprecated: use {new} (the old name goes in the next release)"
                values.setdefault(section, {})[field] = self._environ[old]
            warnings.warn(note, DeprecationWarning, stacklevel=2)
        return {**values, _RENAMED_KEY: tuple(in_use)} if in_use else {}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="KB_", env_nested_delimiter="__", frozen=True, extra="ignore"
    )

    broker: str | None = Field(
        default=None,
        description=(
            "mqtt[s]://[user:pass@]host:port, or a comma-separated list of the nodes of a "
            "cluster (tried in order); unset = start the embedded broker"
        ),
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
    #: The bounded wait of the broker probes at every connect: an MQTT 5 CONNECT left
    #: unanswered (then 3.1.1), a retained or shared-subscription probe message.
    probe_timeout_s: float = Field(default=3.0, gt=0, le=60)
    #: How the retained presence is read at (re)connect: ``wildcard`` (one subscription),
    #: ``per_device`` (the exact topics of the database's known devices: brokers that do
    #: not replay retained messages to wildcards, RabbitMQ), ``auto`` (by the probe).
    reconcile: Literal["auto", "wildcard", "per_device"] = "auto"
    #: Devices per SUBSCRIBE in a device-by-device reconcile.
    reconcile_batch: int = Field(default=200, ge=1, le=10_000)
    #: A device online from which nothing arrived for this long is ``lost`` (reason
    #: ``silent``): a Will that died with a broker node. Unset: 2.5 x its status interval
    #: (``kiosk_status_interval_s`` or its configured one), never below 1.5 x
    #: ``kiosk_keepalive_s``; 0 turns the detection off.
    silent_after_s: float | None = Field(default=None, ge=0)
    #: The status interval of kiosks without a configured one (the contract's default).
    kiosk_status_interval_s: float = Field(default=30.0, gt=0)
    #: The kiosks' MQTT keepalive (the contract allows 10 to 30 s): silence is never
    #: judged sooner than the broker itself would publish the Will.
    kiosk_keepalive_s: float = Field(default=30.0, gt=0)

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

    #: ``KB_HTTP__*``: the HTTP face.
    http: HttpSettings = Field(default_factory=HttpSettings)
    #: ``KB_SECURITY__*``: credential management, and ``remotes.token``'s storage.
    security: SecuritySettings = Field(default_factory=SecuritySettings)

    #: Without a heartbeat of a writing instance for this long, every view says the
    #: device states may be stale (the CLI exits 4; kb_fleet_health.states_live is 0).
    stale_after_s: float = Field(default=10.0, gt=0)
    #: The writer lease: a standby takes over this long after the leader's last renewal.
    lease_ttl_s: float = Field(default=2.0, gt=0)
    #: Every instance writes its kb_bridges heartbeat (and renews or tries the lease)
    #: this often.
    heartbeat_s: float = Field(default=0.5, gt=0)

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    #: History rows and finished commands older than this are pruned (0 keeps them).
    retention_days: float = Field(default=90.0, ge=0)
    retention_every_s: float = Field(default=3600.0, gt=0)

    _renamed_in_use: tuple[str, ...] = PrivateAttr(default=())

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Below the new names, so that the new name wins when both are set.
        renamed = _RenamedEnvSource(settings_cls, os.environ)
        return init_settings, env_settings, renamed, dotenv_settings, file_secret_settings

    @model_validator(mode="wrap")
    @classmethod
    def _sections(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> Settings:
        in_use: tuple[str, ...] = ()
        if isinstance(data, dict):
            data = dict(data)
            in_use = tuple(data.pop(_RENAMED_KEY, ()))
            data["security"] = _with_token_storage(data.get("security"), data.get("http"))
        settings: Settings = handler(data)
        settings._renamed_in_use = in_use
        return settings

    @property
    def renamed_in_use(self) -> tuple[str, ...]:
        """``"OLD -> NEW"`` for each renamed variable this object was built with."""
        return self._renamed_in_use

    @field_validator("instance")
    @classmethod
    def _instance_ok(cls, value: str) -> str:
        if not value or len(value) > 64 or any(ch in value for ch in "/+#\x00 "):
            raise ValueError("instance must be 1-64 characters without '/', '+', '#' or spaces")
        if value == "sync":
            # {prefix}/_bridge/sync/... is the bridges' marker topic.
            raise ValueError("instance must not be 'sync'")
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
        return parse_host_port(self.listen, option="--listen", example="127.0.0.1:1883")

    @property
    def embedded_credentials_path(self) -> Path:
        if self.embedded_credentials:
            return Path(self.embedded_credentials)
        return default_credentials_path(self.db)

    @property
    def stale_after_ms(self) -> int:
        return int(self.stale_after_s * 1000)

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


def _given(section: object, field: str) -> Any:
    """A section's field as given (model or dict), or ``None`` when it was not given."""
    if isinstance(section, BaseModel):
        return getattr(section, field) if field in section.model_fields_set else None
    if isinstance(section, Mapping):
        return section.get(field)
    return None


def _with_token_storage(security: object, http: object) -> object:
    """``security`` with ``token_storage`` filled in when it was not given: ``plaintext``
    if the HTTP face serves (its CMS reads and issues ``remotes.token`` in clear, and a
    CMS-issued token in clear is refused in ``sha256`` mode), else ``sha256`` - each
    side's default from when they were two settings, so neither kind of deployment
    changes."""
    if _given(security, "token_storage") is not None:
        return security
    storage = "plaintext" if _given(http, "listen") else "sha256"
    if isinstance(security, SecuritySettings):
        return security.model_copy(update={"token_storage": storage})
    if isinstance(security, Mapping):
        return {**security, "token_storage": storage}
    return {"token_storage": storage}


def setting_name(loc: tuple[int | str, ...]) -> str:
    """How a user names the setting at ``loc`` (a validation error's): the flag for a
    top-level field (``--offline-grace-s``), the variable for a section's
    (``KB_HTTP__AUTH_FAIL_BURST``), which has no flag."""
    parts = [str(part) for part in loc]
    if len(parts) > 1 and parts[0] in ("http", "security"):
        return "KB_" + "__".join(parts[:2]).upper()
    return "--" + "-".join(parts).replace("_", "-")


def load_settings(**overrides: object) -> Settings:
    """Environment plus explicit overrides (``None`` overrides are ignored)."""
    given = {key: value for key, value in overrides.items() if value is not None}
    return Settings(**given)  # type: ignore[arg-type]


__all__ = ["RENAMED_VARIABLES", "MqttProtocol", "Settings", "load_settings", "setting_name"]
