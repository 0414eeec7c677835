"""Single keystrokes from a terminal, for ``top``'s keys, with a timeout.

The terminal is put in cbreak mode (keys arrive unbuffered and unechoed, Ctrl-C still
interrupts) and restored on exit; on anything but a terminal there are no keys and
:meth:`Keys.read` just waits out its timeout, which keeps ``top`` usable in a pipe.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import termios
import time
import tty
from collections.abc import Iterator
from typing import TextIO


class Keys:
    def __init__(self, stream: TextIO | None) -> None:
        #: ``None`` when stdin is not a terminal.
        self._stream = stream

    @property
    def live(self) -> bool:
        return self._stream is not None

    def read(self, timeout_s: float) -> str | None:
        """One key pressed within ``timeout_s``, else ``None`` after it."""
        if self._stream is None:
            # The refresh interval of a view without keys, not synchronisation.
            time.sleep(timeout_s)
            return None
        ready, _, _ = select.select([self._stream], [], [], timeout_s)
        if not ready:
            return None
        return os.read(self._stream.fileno(), 1).decode(errors="replace")


@contextlib.contextmanager
def keys(stream: TextIO = sys.stdin) -> Iterator[Keys]:
    """Keys from ``stream`` while the block runs (none if it is not a terminal)."""
    if not stream.isatty():
        yield Keys(None)
        return
    fd = stream.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield Keys(stream)
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
