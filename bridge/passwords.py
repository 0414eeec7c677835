"""Tokens and the password hash Mosquitto's dynamic-security plugin stores.

The dynsec format (Mosquitto 2.0) is PBKDF2-HMAC-SHA512 with a 12-byte random salt, both
base64-encoded next to an iteration count. The bridge writes the same format when it
bootstraps ``dynamic-security.json`` and keeps it in ``kb_device_credentials`` for the
embedded broker, so one verifier serves both.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Final, Literal

#: How ``remotes.token`` is stored: hashed (the bridge alone issues tokens) or in clear
#: (a CMS that reads and issues tokens itself).
TokenStorage = Literal["sha256", "plaintext"]

#: Mosquitto 2.0's own default. Tokens are 256 random bits, so the hash never has to
#: slow down a guesser; a low count keeps a reconnect storm of thousands cheap.
ITERATIONS: Final = 101
SALT_BYTES: Final = 12
TOKEN_HEX_CHARS: Final = 64
_TOKEN_RE: Final = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class PasswordHash:
    hash_b64: str
    salt_b64: str
    iterations: int = ITERATIONS

    def as_dynsec(self) -> dict[str, str | int]:
        """The three fields of a client in ``dynamic-security.json``."""
        return {"password": self.hash_b64, "salt": self.salt_b64, "iterations": self.iterations}


def hash_password(
    password: str, *, salt: bytes | None = None, iterations: int = ITERATIONS
) -> PasswordHash:
    salt = salt if salt is not None else secrets.token_bytes(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return PasswordHash(
        base64.b64encode(digest).decode(), base64.b64encode(salt).decode(), iterations
    )


def verify_password(password: str, stored: PasswordHash) -> bool:
    try:
        salt = base64.b64decode(stored.salt_b64, validate=True)
        expected = base64.b64decode(stored.hash_b64, validate=True)
    except ValueError:
        return False
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, stored.iterations)
    return hmac.compare_digest(digest, expected)


def new_token() -> str:
    """64 lowercase hex characters: fits ``remotes.token`` and the HTTP API's bearer."""
    return secrets.token_hex(TOKEN_HEX_CHARS // 2)


def is_token(value: object) -> bool:
    return isinstance(value, str) and _TOKEN_RE.fullmatch(value) is not None


def token_sha256(token: str) -> str:
    """What ``remotes.token`` holds in ``sha256`` mode, and how every presented token is
    looked up (HTTP bearer, provisioning proof): the one token hash of the package.

    ``surrogatepass``: a bearer decoded from JSON may hold a lone surrogate (``"\\ud800"``);
    it must hash to a digest that matches nothing, not raise. Every valid string hashes as
    plain UTF-8, so stored digests are unchanged.
    """
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def nonce_sha256(nonce: str) -> str:
    return hashlib.sha256(nonce.encode()).hexdigest()
