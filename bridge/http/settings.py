"""Settings of the HTTP face, from ``KB_*`` environment variables like the bridge's."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas import MAX_PAYLOAD_BYTES

TokenStorage = Literal["plaintext", "sha256"]


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
