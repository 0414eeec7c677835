"""The HTTP face of the bridge: legacy kiosk endpoints and the CMS API (issue 9).

The names below load on first use (PEP 562): the settings tree imports
``bridge.http.settings``, and with it this package, in every CLI command; importing
FastAPI and the routes there would cost every ``kiosk-bridge devices`` half a second.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bridge.db.http_models import HTTP_TABLES, create_http_schema
    from bridge.db.models import HttpDevice
    from bridge.http.app import create_app
    from bridge.http.face import HttpFace
    from bridge.http.settings import HttpSettings

_HOMES = {
    "HTTP_TABLES": "bridge.db.http_models",
    "create_http_schema": "bridge.db.http_models",
    "HttpDevice": "bridge.db.models",
    "create_app": "bridge.http.app",
    "HttpFace": "bridge.http.face",
    "HttpSettings": "bridge.http.settings",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)


__all__ = [
    "HTTP_TABLES",
    "HttpDevice",
    "HttpFace",
    "HttpSettings",
    "create_app",
    "create_http_schema",
]
