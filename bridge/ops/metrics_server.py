"""Serve a Prometheus registry over HTTP for as long as a context is open.

prometheus_client's own threaded WSGI server does the serving (``/metrics`` and any
other path answer with the exposition format); this module only makes it stoppable and
usable from asyncio. Binding happens on entry, so a taken port fails at start-up with
``OSError`` rather than later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, start_http_server

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class MetricsServer:
    host: str
    #: The bound port (the real one when 0 was asked for).
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"


@contextlib.asynccontextmanager
async def serve_metrics(
    registry: CollectorRegistry, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[MetricsServer]:
    """Serve ``registry`` on ``host:port`` until the block exits."""
    httpd, thread = await asyncio.to_thread(start_http_server, port, host, registry)
    server = MetricsServer(host, int(httpd.server_address[1]))
    log.info("serving metrics on %s", server.url)
    try:
        yield server
    finally:

        def stop() -> None:
            # shutdown() waits for serve_forever's poll loop to notice (up to 0.5 s).
            httpd.shutdown()
            httpd.server_close()
            thread.join(timeout=5)

        await asyncio.to_thread(stop)
        log.info("metrics server on %s stopped", server.url)
