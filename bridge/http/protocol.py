"""uvicorn's h11 protocol with a deadline for request headers.

uvicorn cuts idle kept-alive connections (``timeout_keep_alive``) but has no limit on
how long a request's headers may take: a client that connects and sends nothing, or
one header byte every few seconds, holds its connection (and a file descriptor) for
ever. Here a timer runs from the connection (or the first byte after a response) until
the headers are complete; when it fires, the socket is closed. Trickling bytes after a
response (a body the app never read) re-arms it too, since uvicorn's keep-alive timer
is cancelled by any data. The body has its own deadline (``limits.BodyTimeout``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class HeaderDeadlineProtocol(H11Protocol):
    header_timeout_s: ClassVar[float] = 10.0
    on_cut: ClassVar[Callable[[], None]] = staticmethod(lambda: None)

    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        before = self.cycle
        if before is None or before.response_complete:
            self._arm()  # between requests: these bytes are (or precede) headers
        super().data_received(data)
        if self.cycle is not before:
            self._disarm()  # a request's headers are complete

    def on_response_complete(self) -> None:
        before = self.cycle
        super().on_response_complete()
        if self.cycle is not before:
            self._disarm()  # a pipelined request started from the buffer

    def _arm(self) -> None:
        if self._header_timer is None and not self.transport.is_closing():
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._expired)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _expired(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a request is being served: its body has a deadline of its own
        type(self).on_cut()
        if self.conn.our_state in (h11.IDLE, h11.DONE):
            with contextlib.suppress(h11.LocalProtocolError):
                self.conn.send(h11.ConnectionClosed())
        self.transport.close()


def header_deadline_protocol(
    timeout_s: float, on_cut: Callable[[], None] | None = None
) -> type[HeaderDeadlineProtocol]:
    """A protocol class for ``uvicorn.Config(http=...)`` with this deadline."""
    attrs: dict[str, Any] = {"header_timeout_s": timeout_s}
    if on_cut is not None:
        attrs["on_cut"] = staticmethod(on_cut)
    return type("BoundHeaderDeadlineProtocol", (HeaderDeadlineProtocol,), attrs)
