"""The broker's first ``dynamic-security.json``: the fixed principals and their roles.

Written once, before Mosquitto first starts with the plugin (``kiosk-bridge broker
init``); from then on the plugin owns the file and rewrites it on every change, and the
bridge manages device clients over ``$CONTROL/dynamic-security/v1``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bridge.passwords import hash_password
from bridge.security.acl import (
    DEFAULT_ACL_ACCESS,
    ROLE_BRIDGE,
    ROLE_CLAIM,
    ROLE_DYNSEC_ADMIN,
    ROLE_OPS,
    StaticUsers,
    static_groups,
    static_roles,
)
from schemas import DEFAULT_PREFIX

#: Shortest password accepted for a fixed principal: these are long-lived secrets.
MIN_PASSWORD_CHARS = 16


@dataclass(frozen=True, slots=True)
class BootstrapSecrets:
    bridge_password: str
    ops_password: str
    claim_password: str
    users: StaticUsers = field(default_factory=StaticUsers)

    def __post_init__(self) -> None:
        for name in ("bridge_password", "ops_password", "claim_password"):
            value = getattr(self, name)
            if len(value) < MIN_PASSWORD_CHARS:
                raise ValueError(f"{name} must have at least {MIN_PASSWORD_CHARS} characters")


def _client(username: str, password: str, roles: list[str]) -> dict[str, Any]:
    return {
        "username": username,
        **hash_password(password).as_dynsec(),
        "roles": [{"rolename": role} for role in roles],
    }


def dynsec_config(secrets: BootstrapSecrets, prefix: str = DEFAULT_PREFIX) -> dict[str, Any]:
    users = secrets.users
    return {
        "clients": [
            # One credential for the bridge's connection and its credential management:
            # provisioning must create clients on the connection that hears the request.
            _client(users.bridge, secrets.bridge_password, [ROLE_BRIDGE, ROLE_DYNSEC_ADMIN]),
            _client(users.ops, secrets.ops_password, [ROLE_OPS]),
            _client(users.claim, secrets.claim_password, [ROLE_CLAIM]),
        ],
        "roles": static_roles(prefix),
        "groups": static_groups(),
        "defaultACLAccess": dict(DEFAULT_ACL_ACCESS),
    }


def write_dynsec_config(
    path: Path, secrets: BootstrapSecrets, prefix: str = DEFAULT_PREFIX, *, overwrite: bool = False
) -> Path:
    """Write the file (mode 0600); refuses to replace an existing one unless told to,
    because the plugin's copy holds every device credential created since."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"{path} exists and holds the broker's credentials; pass --force to replace it"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(dynsec_config(secrets, prefix), indent=2) + "\n"
    temp = path.with_name(f".{path.name}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    temp.replace(path)
    return path
