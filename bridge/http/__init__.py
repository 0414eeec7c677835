"""The HTTP face of the bridge: legacy kiosk endpoints and the CMS API (issue 9)."""

from bridge.db.http_models import HTTP_TABLES, create_http_schema
from bridge.db.models import HttpDevice
from bridge.http.app import create_app
from bridge.http.face import HttpFace
from bridge.http.settings import HttpSettings

__all__ = [
    "HTTP_TABLES",
    "HttpDevice",
    "HttpFace",
    "HttpSettings",
    "create_app",
    "create_http_schema",
]
