"""Test brokers as context managers: started on entry, stopped on exit, and stopped
too when starting fails half-way (a node up, another not)."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class StartStop:
    """Gives ``with`` to a class that has ``start()`` and ``stop()``."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
