"""Settings of credential management: the ``security`` section of
:class:`bridge.settings.Settings`.

A plain frozen model: it reads no environment of its own. ``Settings`` fills it from
``KB_SECURITY__*`` variables (``KB_SECURITY__TLS_CA`` is ``tls_ca`` here).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# What ``remotes.token`` holds: one setting for the one column, which both credential
# management (provisioning, rotation) and the HTTP face (registration) write.
from bridge.passwords import TokenStorage as TokenStorage
from bridge.security.acl import StaticUsers


class SecuritySettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    #: dynsec: Mosquitto's dynamic-security plugin; database: the embedded broker's
    #: plugin reads the bridge's table.
    credential_backend: Literal["dynsec", "database"] = "dynsec"
    #: What ``remotes.token`` holds: the token's SHA-256, or the token itself for a CMS
    #: that reads or issues it in clear (what the HTTP face's CMS does). Left unset,
    #: :class:`bridge.settings.Settings` picks ``plaintext`` when the HTTP face serves and
    #: ``sha256`` otherwise: each side's default before the two settings were one.
    token_storage: TokenStorage = "sha256"
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
