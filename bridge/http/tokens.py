"""Device tokens, as the HTTP face names them.

One generator and one hash serve both the HTTP face and credential management, since both
write and compare the same ``remotes.token`` column: they live in
:mod:`bridge.passwords`, and the names here are kept for the HTTP face's modules.
"""

from __future__ import annotations

from bridge.passwords import TOKEN_HEX_CHARS, new_token
from bridge.passwords import token_sha256 as token_hash

__all__ = ["TOKEN_HEX_CHARS", "new_token", "token_hash"]
