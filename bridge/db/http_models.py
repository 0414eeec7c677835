"""``kb_http_devices``: what the HTTP face knows about a device that the tables lack.

A device with a row here has registered or heartbeated over HTTP. It is *HTTP-only*
while its connectivity row carries the session this table issued: an MQTT birth brings
a session of the device's own, and from then on MQTT presence alone judges it.
"""

from __future__ import annotations

from sqlalchemy import Engine
from sqlmodel import SQLModel

from bridge.db.models import HttpDevice
from bridge.db.tables import table_of

HTTP_TABLES = (HttpDevice,)


def create_http_schema(engine: Engine) -> None:
    """Create ``kb_http_devices`` if missing (until ``create_schema`` covers it)."""
    SQLModel.metadata.create_all(engine, tables=[table_of(m) for m in HTTP_TABLES])
