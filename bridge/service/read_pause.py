"""Take a link's reader off the event loop while a live event is written.

While a large retained snapshot arrives, the event loop's thread parses it without a
break. A Will that arrives meanwhile (on the command link) is written by the database
thread, which releases the GIL at every SQLite step and gets it back only at the loop
thread's switch interval (5 ms): a one-row write took 60-200 ms there, and that was
most of a death's latency during a restart. For the length of that write the snapshot's
reader is removed from the event loop: its bytes wait in the kernel (TCP holds the
broker back), the loop thread has nothing to parse, and the database thread keeps the
GIL. The snapshot loses a few milliseconds per live write.

Bounded: reading resumes after :data:`MAX_PAUSE_S` whatever the write does, so a
database that hangs cannot make the link miss its keepalive. A connection that closed or
was replaced during the pause is left to the new one's reader.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

from bridge._compat.aiomqtt import reader_of

log = logging.getLogger(__name__)

#: Longest pause: far below any keepalive, far above a one-batch write.
MAX_PAUSE_S = 1.0


class ReadPause:
    """Pauses the reads of whatever socket ``socket_of`` returns (None: nothing to pause).

    :meth:`hold` as soon as a live event is queued (the loop then parses nothing more
    while the writer's task is scheduled and whatever runs before it on the database
    thread finishes), :meth:`release` once it is written; :meth:`paused` is both.
    """

    def __init__(
        self, socket_of: Callable[[], Any | None], *, max_pause_s: float = MAX_PAUSE_S
    ) -> None:
        self._socket_of = socket_of
        self._max_pause_s = max_pause_s
        self._resume: Callable[[], None] | None = None
        #: Pauses taken (tests, metrics).
        self.pauses = 0

    @property
    def holding(self) -> bool:
        return self._resume is not None

    def hold(self) -> None:
        """Take the reader off the loop now, until :meth:`release` or the bound; nothing
        when already held or not connected. Only from the event loop's thread."""
        if self._resume is not None:
            return
        loop = asyncio.get_running_loop()
        sock = self._socket_of()
        fd = sock.fileno() if sock is not None else -1
        reader = reader_of(loop, fd) if fd >= 0 else None
        if sock is None or reader is None:
            return
        held: Any = sock
        loop.remove_reader(fd)
        self.pauses += 1

        def resume() -> None:
            if self._resume is not resume:
                return
            self._resume = None
            timer.cancel()
            if held.fileno() == fd and self._socket_of() is held and reader_of(loop, fd) is None:
                loop.add_reader(fd, reader)

        timer = loop.call_later(self._max_pause_s, resume)
        self._resume = resume

    def release(self) -> None:
        """Put the reader back (if it was taken and its connection is still the one)."""
        if self._resume is not None:
            self._resume()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self.hold()
        try:
            yield
        finally:
            self.release()
