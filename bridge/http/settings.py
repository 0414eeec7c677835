"""Settings of the HTTP face, from ``KB_*`` environment variables like the bridge's."""

from __future__ import annotations

import ipaddress
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas import MAX_PAYLOAD_BYTES

TokenStorage = Literal["plaintext", "sha256"]
SecretMode = Literal["require", "warn"]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class HttpSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KB_", frozen=True, extra="ignore")

    #: ``KB_HTTP_LISTEN``: HOST:PORT to serve on (``kiosk-bridge run --http`` wins).
    http_listen: str | None = None
    #: ``KB_API_KEYS``: comma-separated keys for ``X-API-Key``; empty disables /api/v2.
    api_keys: str = ""
    #: How often legacy kiosks heartbeat (the APK's fixed 30 s).
    http_heartbeat_interval_s: float = Field(default=30.0, gt=0)
    #: An HTTP-only device is ``lost`` after this many intervals without a heartbeat.
    http_timeout_factor: float = Field(default=2.5, ge=1.0)
    #: How often the sweeper looks; unset: a tenth of the timeout, between 0.2 s and 5 s.
    http_sweep_s: float | None = Field(default=None, gt=0)
    http_max_body_bytes: int = Field(default=MAX_PAYLOAD_BYTES, ge=256)
    #: Token bucket per token and endpoint: burst size and sustained requests per second.
    http_rate_burst: int = Field(default=5, ge=1)
    http_rate_per_s: float = Field(default=0.5, gt=0)
    #: ``plaintext`` keeps ``remotes.token`` as the CMS reads it today; ``sha256`` stores
    #: only the token's hash there (once nothing in the CMS reads the token any more).
    http_token_storage: TokenStorage = "plaintext"
    #: Broker URL handed to kiosks at registration; unset: the bridge's broker without
    #: its credentials.
    http_mqtt_url: str | None = None
    #: Remote-control relay URL returned at registration, as the CMS does today.
    http_websocket_url: str = ""
    http_refresh_ttl_s: float = Field(default=3600.0, gt=0, le=7 * 24 * 3600)
    #: Commands listed per heartbeat at most.
    http_pending_max: int = Field(default=20, ge=1, le=500)

    # -- hardening (issue 14; bridge/http/README.md, "Abuse limits") ---------------------
    #: Failed authentication (any 401) per client address: bucket size and refill per
    #: second (60 and 1.0: 60 failures a minute). Loopback is not exempt.
    http_auth_fail_burst: int = Field(default=60, ge=1)
    http_auth_fail_per_s: float = Field(default=1.0, gt=0)
    #: Registrations per client address (20, then one every 5 s) ...
    http_register_address_burst: int = Field(default=20, ge=1)
    http_register_address_per_s: float = Field(default=0.2, gt=0)
    #: ... and from all addresses together (200, then 5 a second).
    http_register_global_burst: int = Field(default=200, ge=1)
    http_register_global_per_s: float = Field(default=5.0, gt=0)
    #: ``KB_HTTP_TRUSTED_PROXIES``: comma-separated addresses or CIDRs of reverse proxies
    #: whose ``X-Forwarded-For`` names the client; empty: the header is never trusted.
    http_trusted_proxies: str = ""
    #: A request's headers must arrive within this many seconds (from the connection, or
    #: from its first byte on a kept-alive one), its body within as many after them.
    http_header_timeout_s: float = Field(default=10.0, gt=0)
    http_body_timeout_s: float = Field(default=10.0, gt=0)
    #: ``KB_HTTP_REGISTRATION_SECRET``: when set, ``register`` needs it in the
    #: ``X-Registration-Secret`` header; a wrong one is a failed authentication.
    http_registration_secret: SecretStr | None = None
    #: ``require``: refuse a registration without the secret; ``warn``: accept it, log
    #: and count it (while old APKs are updated). A wrong secret is refused in both.
    http_registration_secret_mode: SecretMode = "require"
    #: How often the in-memory map of ``remotes.token`` hashes (tokens the CMS issued)
    #: is rebuilt; registrations through the bridge update it at once.
    http_token_refresh_s: float = Field(default=30.0, gt=0)

    @field_validator("http_trusted_proxies")
    @classmethod
    def _valid_proxies(cls, value: str) -> str:
        parse_networks(value)
        return value

    @field_validator("http_registration_secret")
    @classmethod
    def _empty_secret_is_none(cls, value: SecretStr | None) -> SecretStr | None:
        return value if value is not None and value.get_secret_value() else None

    @property
    def trusted_proxy_networks(self) -> tuple[Network, ...]:
        return parse_networks(self.http_trusted_proxies)

    @property
    def listen_address(self) -> tuple[str, int] | None:
        return parse_listen(self.http_listen) if self.http_listen else None

    @property
    def api_key_list(self) -> tuple[str, ...]:
        return tuple(key.strip() for key in self.api_keys.split(",") if key.strip())

    @property
    def http_timeout_ms(self) -> int:
        return int(self.http_heartbeat_interval_s * self.http_timeout_factor * 1000)

    @property
    def sweep_interval_s(self) -> float:
        if self.http_sweep_s is not None:
            return self.http_sweep_s
        return min(5.0, max(0.2, self.http_timeout_ms / 10_000))


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8080`` for IPv6); raises ``ValueError`` saying what is wrong."""
    host, _, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--http {value!r} must be HOST:PORT, e.g. 0.0.0.0:8080")
    return host, int(port)


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
                f"KB_HTTP_TRUSTED_PROXIES: {item!r} is not an address or CIDR"
            ) from None
    return tuple(networks)
