"""Settings of credential management, from ``KB_*`` like the bridge's own.

Kept apart from :class:`bridge.settings.Settings` so this package can ship before the
bridge wires it; the lead may fold these fields into ``Settings``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from bridge.security.acl import StaticUsers


class SecuritySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KB_", frozen=True, extra="ignore")

    #: dynsec: Mosquitto's dynamic-security plugin; database: the embedded broker's
    #: plugin reads the bridge's table.
    credential_backend: Literal["dynsec", "database"] = "dynsec"
    #: What ``remotes.token`` holds: the token's SHA-256 (the HTTP API accepts both), or
    #: the token itself for a CMS that compares it in clear.
    token_storage: Literal["sha256", "plaintext"] = "sha256"
    #: Answer provisioning requests (the claim flow).
    provisioning: bool = True
    #: CA bundle to verify an mqtts:// broker with (default: the system's CAs).
    tls_ca: str | None = None
    #: The old token stops working this long after a rotation was asked for, confirmed
    #: by the device or not.
    rotation_deadline_s: float = Field(default=3600.0, gt=0, le=7 * 24 * 3600)
    rotation_poll_s: float = Field(default=0.5, gt=0, le=60)
    #: How long after a device's password was replaced (re-provisioning, rotation) the
    #: old token still proves, in a provisioning request, that the claimant is the
    #: device: a kiosk switched off across a forced rotation recovers by itself.
    previous_token_proof_s: float = Field(default=30 * 24 * 3600.0, ge=0, le=365 * 24 * 3600)
    #: ``retry_after_s`` of a ``proof_required`` refusal: how soon a kiosk that lost its
    #: token asks again, so an operator's ``device allow-claim`` lets it in this soon.
    proof_required_retry_s: int = Field(default=60, ge=1, le=3600)
    bridge_username: str = "_bridge"
    ops_username: str = "_ops"
    claim_username: str = "_claim"

    @property
    def users(self) -> StaticUsers:
        return StaticUsers(self.bridge_username, self.ops_username, self.claim_username)
