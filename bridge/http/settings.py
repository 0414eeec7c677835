"""Settings of the HTTP face: the ``http`` section of :class:`bridge.settings.Settings`.

A plain frozen model: it reads no environment of its own. ``Settings`` fills it from
``KB_HTTP__*`` variables (``KB_HTTP__AUTH_FAIL_BURST`` is ``auth_fail_burst`` here).
"""

from __future__ import annotations

import ipaddress
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from bridge.addresses import parse_host_port

# ``remotes.token``'s storage is one setting of credential management
# (``Settings.security.token_storage``); the name is kept here for the HTTP stores.
from bridge.security.settings import TokenStorage as TokenStorage
from schemas import MAX_PAYLOAD_BYTES

SecretMode = Literal["require", "warn"]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class HttpSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    #: ``KB_HTTP__LISTEN``: HOST:PORT to serve on (``kiosk-bridge run --http`` wins).
    listen: str | None = None
    #: ``KB_HTTP__API_KEYS``: comma-separated keys for ``X-API-Key``; empty disables /api/v2.
    api_keys: str = ""
    #: ``KB_HTTP__UI_KEYS`` (or ``KB_UI_KEYS``): comma-separated read-only keys for the
    #: fleet page at ``/`` (``bridge/http/ui``); the API keys open it too. They are never
    #: accepted by /api/v2, so they cannot send commands.
    ui_keys: str = ""
    #: How long a fleet page login lasts before the key must be entered again.
    ui_session_s: float = Field(default=12 * 3600.0, gt=0, le=30 * 24 * 3600)
    #: How often legacy kiosks heartbeat (the APK's fixed 30 s).
    heartbeat_interval_s: float = Field(default=30.0, gt=0)
    #: An HTTP-only device is ``lost`` after this many intervals without a heartbeat.
    timeout_factor: float = Field(default=2.5, ge=1.0)
    #: How often the sweeper looks; unset: a tenth of the timeout, between 0.2 s and 5 s.
    sweep_s: float | None = Field(default=None, gt=0)
    max_body_bytes: int = Field(default=MAX_PAYLOAD_BYTES, ge=256)
    #: Token bucket per token and endpoint: burst size and sustained requests per second.
    rate_burst: int = Field(default=5, ge=1)
    rate_per_s: float = Field(default=0.5, gt=0)
    #: Broker URL handed to kiosks at registration; unset: the bridge's broker without
    #: its credentials.
    mqtt_url: str | None = None
    #: Remote-control relay URL returned at registration, as the CMS does today.
    websocket_url: str = ""
    refresh_ttl_s: float = Field(default=3600.0, gt=0, le=7 * 24 * 3600)
    #: Commands listed per heartbeat at most.
    pending_max: int = Field(default=20, ge=1, le=500)

    # -- hardening (issue 14; bridge/http/README.md, "Abuse limits") ---------------------
    #: Failed authentication (any 401) per client address: bucket size and refill per
    #: second (60 and 1.0: 60 failures a minute). Loopback is not exempt.
    auth_fail_burst: int = Field(default=60, ge=1)
    auth_fail_per_s: float = Field(default=1.0, gt=0)
    #: Registrations per client address (20, then one every 5 s) ...
    register_address_burst: int = Field(default=20, ge=1)
    register_address_per_s: float = Field(default=0.2, gt=0)
    #: ... and from all addresses together (200, then 5 a second).
    register_global_burst: int = Field(default=200, ge=1)
    register_global_per_s: float = Field(default=5.0, gt=0)
    #: ``KB_HTTP__TRUSTED_PROXIES``: comma-separated addresses or CIDRs of reverse proxies
    #: whose ``X-Forwarded-For`` names the client; empty: the header is never trusted.
    trusted_proxies: str = ""
    #: A request's headers must arrive within this many seconds (from the connection, or
    #: from its first byte on a kept-alive one), its body within as many after them.
    header_timeout_s: float = Field(default=10.0, gt=0)
    body_timeout_s: float = Field(default=10.0, gt=0)
    #: ``KB_HTTP__REGISTRATION_SECRET``: when set, ``register`` needs it in the
    #: ``X-Registration-Secret`` header; a wrong one is a failed authentication.
    registration_secret: SecretStr | None = None
    #: ``require``: refuse a registration without the secret; ``warn``: accept it, log
    #: and count it (while old APKs are updated). A wrong secret is refused in both.
    registration_secret_mode: SecretMode = "require"
    #: How often the in-memory map of ``remotes.token`` hashes (tokens the CMS issued)
    #: is rebuilt; registrations through the bridge update it at once.
    token_refresh_s: float = Field(default=30.0, gt=0)

    @field_validator("trusted_proxies")
    @classmethod
    def _valid_proxies(cls, value: str) -> str:
        parse_networks(value)
        return value

    @field_validator("registration_secret")
    @classmethod
    def _empty_secret_is_none(cls, value: SecretStr | None) -> SecretStr | None:
        return value if value is not None and value.get_secret_value() else None

    @property
    def trusted_proxy_networks(self) -> tuple[Network, ...]:
        return parse_networks(self.trusted_proxies)

    @property
    def listen_address(self) -> tuple[str, int] | None:
        return parse_listen(self.listen) if self.listen else None

    @property
    def api_key_list(self) -> tuple[str, ...]:
        return tuple(key.strip() for key in self.api_keys.split(",") if key.strip())

    @property
    def ui_key_list(self) -> tuple[str, ...]:
        return tuple(key.strip() for key in self.ui_keys.split(",") if key.strip())

    @property
    def timeout_ms(self) -> int:
        return int(self.heartbeat_interval_s * self.timeout_factor * 1000)

    @property
    def sweep_interval_s(self) -> float:
        if self.sweep_s is not None:
            return self.sweep_s
        return min(5.0, max(0.2, self.timeout_ms / 10_000))


def parse_listen(value: str) -> tuple[str, int]:
    """``--http HOST:PORT`` (``[::1]:8080`` for IPv6), by the package's one parser."""
    return parse_host_port(value, option="--http", example="0.0.0.0:8080")


def parse_networks(value: str) -> tuple[Network, ...]:
    """``10.0.0.0/8, ::1`` as networks; raises ``ValueError`` naming a bad entry."""
    networks: list[Network] = []
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(
                f"KB_HTTP__TRUSTED_PROXIES: {item!r} is not an address or CIDR"
            ) from None
    return tuple(networks)
