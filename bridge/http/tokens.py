"""Device tokens: generated with ``secrets``, compared and stored by their SHA-256."""

from __future__ import annotations

import hashlib
import secrets

TOKEN_HEX_CHARS = 64


def new_token() -> str:
    """64 hex characters (256 random bits): the length the CMS column and APK expect."""
    return secrets.token_hex(TOKEN_HEX_CHARS // 2)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()
