"""Who may see the fleet page: a login cookie made from a key, and the CSRF rule.

The page is read-only. A visitor enters a key once, either one of the CMS API keys
(``KB_HTTP__API_KEYS``) or a read-only page key (``KB_HTTP__UI_KEYS``); the answer is
a cookie that holds no key, only ``<issued unix s>.<HMAC-SHA256(key, issued)>``. So:

- a stolen cookie is not a key: it opens the page until it ages out (``ui_session_s``),
  never ``/api/v2`` (which reads ``X-API-Key`` only and ignores cookies);
- removing a key from the settings ends every session made with it at once;
- nothing is kept on the server, so sessions survive a restart of the bridge.

The cookie is ``HttpOnly`` (no script can read it) and ``SameSite=Strict`` (no other
site's page can make the browser send it). The login ``POST`` is the one write; a form
on another site could still post it (login CSRF: logging a victim in with the
attacker's key), so it must come from this origin: ``Origin`` (sent by browsers on
every POST) must name this host, and ``Sec-Fetch-Site``, when present, must be
``same-origin`` or ``none``.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Iterable
from typing import Annotated, Final
from urllib.parse import urlsplit

from fastapi import Depends, Request

from bridge.http.deps import Ctx
from bridge.http.errors import ApiError

COOKIE: Final = "kb_ui_session"
_CONTEXT: Final = b"kiosk-bridge fleet page session v1:"
#: A cookie issued this far in the future still counts (clocks of two instances).
_FUTURE_SLACK_S: Final = 60


def _mac(key: str, issued: int) -> str:
    secret = key.encode("utf-8", "surrogatepass")
    return hmac.new(secret, _CONTEXT + str(issued).encode(), hashlib.sha256).hexdigest()


def matching_key(presented: str, keys: Iterable[str]) -> bool:
    """Whether ``presented`` is one of ``keys``, compared against each in constant time."""
    raw = presented.encode("utf-8", "surrogatepass")
    # Compare against every key, so timing does not tell which one nearly matched.
    matched = [hmac.compare_digest(raw, key.encode("utf-8", "surrogatepass")) for key in keys]
    return any(matched)


def make_session(key: str, now_s: int | None = None) -> str:
    issued = int(time.time()) if now_s is None else now_s
    return f"{issued}.{_mac(key, issued)}"


def session_valid(value: str, keys: Iterable[str], max_age_s: float, now_s: int) -> bool:
    """Whether the cookie ``value`` was made from one of ``keys`` within ``max_age_s``."""
    issued_text, dot, mac = value.partition(".")
    if not dot or not issued_text.isdigit() or len(issued_text) > 12 or len(mac) != 64:
        return False
    issued = int(issued_text)
    if issued > now_s + _FUTURE_SLACK_S or now_s - issued > max_age_s:
        return False
    presented = mac.encode("ascii", "replace")
    matched = [hmac.compare_digest(presented, _mac(key, issued).encode()) for key in keys]
    return any(matched)


def page_keys(ctx: Ctx) -> tuple[str, ...]:
    """Every key that opens the page: the CMS API keys and the read-only page keys."""
    return (*ctx.settings.api_key_list, *ctx.settings.ui_key_list)


def signed_in(request: Request, keys: tuple[str, ...], max_age_s: float) -> bool:
    value = request.cookies.get(COOKIE)
    return bool(value and keys) and session_valid(value or "", keys, max_age_s, int(time.time()))


def require_session(request: Request, ctx: Ctx) -> None:
    """The data endpoints' guard: 401 (a failed authentication) without a valid cookie."""
    if not signed_in(request, page_keys(ctx), ctx.settings.ui_session_s):
        raise ApiError(401, "not_signed_in", "sign in to the fleet page first")


Session = Annotated[None, Depends(require_session)]


def same_origin_post(request: Request) -> bool:
    """Whether a POST may be this site's own form (see the module's docstring)."""
    fetch_site = request.headers.get("sec-fetch-site")
    if fetch_site is not None and fetch_site not in ("same-origin", "none"):
        return False
    if fetch_site == "same-origin":
        # Set by the browser itself (a page cannot forge a Sec- header); it holds even
        # where the browser sends ``Origin: null``.
        return True
    origin = request.headers.get("origin")
    if origin is None:
        # Browsers send Origin on every POST; a client without it is not a browser
        # page another site could aim, so there is no forged request to refuse.
        return True
    host = request.headers.get("host")
    parts = urlsplit(origin)
    return bool(host) and parts.scheme in ("http", "https") and parts.netloc == host
