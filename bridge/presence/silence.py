"""Silence: the defence against a Will that never comes.

A kiosk's Last Will is published by the broker node that holds its connection. When
that node dies (``kill -9``, power), or a broker without persistence restarts, the Wills
of its kiosks die with it, and their retained birth says ``online`` forever. So the
bridge also watches for silence: a device that is online and from which nothing
(status, presence, ack) has arrived for its bound becomes ``lost`` with reason
``silent``; its next birth ends that as usual (a new session).

The bound (:meth:`SilencePolicy.bound_ms`) is 2.5 x the device's status interval
(``KB-STAT-2``: a status every interval, +-10% jitter, so two whole intervals may pass
without a false alarm), never less than 1.5 x its keepalive (the broker's own dead-link
rule), or an explicit ``KB_SILENT_AFTER_S``.

Silence counts only while the bridge is connected and subscribed: :meth:`SilenceClock.due`
takes ``since_ms``, the moment the current subscription started, and no device is
silent for longer than that. A reconnect of the bridge or a broker failover restarts
every clock, so the bridge's own outage never turns a live kiosk ``silent``.

Pure: no I/O, no clock reads; callers pass every time. The running bridge feeds it from
the ingest and asks :meth:`SilenceClock.due` every tick (:mod:`bridge.service.silence`).
A tick costs the devices that are due, not the fleet: each online device has one entry
in a heap, keyed by the earliest moment it could be silent, and only entries whose
moment has come are looked at (a scan of 100,000 devices every half second was a
twentieth of a 100,000-device restart).
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

#: The reason stored with a ``lost`` that silence decided (a Will has none).
SILENT = "silent"


@dataclass(frozen=True, slots=True)
class SilencePolicy:
    #: The status interval of devices without a configured one.
    status_interval_ms: int = 30_000
    #: The kiosks' keepalive: silence is never judged sooner than 1.5 x this.
    keepalive_ms: int = 30_000
    #: An explicit bound for every device (still never below the keepalive floor).
    silent_after_ms: int | None = None

    def bound_ms(self, status_interval_ms: int | None = None) -> int:
        floor = (self.keepalive_ms * 3 + 1) // 2
        if self.silent_after_ms is not None:
            return max(self.silent_after_ms, floor)
        interval = status_interval_ms if status_interval_ms else self.status_interval_ms
        return max((interval * 5 + 1) // 2, floor)


@dataclass(slots=True)
class SilenceClock:
    """Which online devices have been silent too long.

    ``now_ms`` and ``since_ms`` never go back between calls (the bridge's clock and the
    start of its current subscription)."""

    policy: SilencePolicy = field(default_factory=SilencePolicy)
    #: Session and last-heard moment of each online device, kept as plain ints in two
    #: dicts rather than an object per device: dicts of str and int are invisible to the
    #: cyclic garbage collector, which walked 100,000 such objects in every full
    #: collection (pauses up to 100 ms during a 100,000-device restart).
    _session: dict[str, int] = field(default_factory=dict)
    _heard_ms: dict[str, int] = field(default_factory=dict)
    #: Configured status intervals by device (absent: the policy's default).
    _intervals: dict[str, int] = field(default_factory=dict)
    #: ``(earliest silent moment, entry id, device)``: never later than the device's
    #: real moment, which only moves later as it is heard (or its bound changes, which
    #: pushes a new entry). An entry whose id is not the device's in :attr:`_entry` is
    #: stale and skipped.
    _heap: list[tuple[int, int, str]] = field(default_factory=list)
    _entry: dict[str, int] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    def __len__(self) -> int:
        return len(self._session)

    def __contains__(self, device_id: object) -> bool:
        return device_id in self._session

    def _schedule(self, device_id: str, at_ms: int) -> None:
        entry = next(self._ids)
        self._entry[device_id] = entry
        heapq.heappush(self._heap, (at_ms, entry, device_id))

    def born(self, device_id: str, session: int, now_ms: int) -> None:
        """A birth: online in ``session`` (an older session's birth changes nothing)."""
        current = self._session.get(device_id)
        if current is not None and current > session:
            return
        heard = self._heard_ms.get(device_id)
        self._session[device_id] = session
        self._heard_ms[device_id] = now_ms
        if heard is None or now_ms < heard:
            self._schedule(device_id, now_ms + self.bound_of(device_id))

    def ended(self, device_id: str, session: int) -> None:
        """An offline or a Will of ``session``: the device is no longer watched (unless
        it is already online in a newer session)."""
        current = self._session.get(device_id)
        if current is not None and current <= session:
            self._forget(device_id)

    def _forget(self, device_id: str) -> None:
        del self._session[device_id]
        del self._heard_ms[device_id]
        del self._entry[device_id]

    def heard(self, device_id: str, now_ms: int) -> None:
        """Anything from the device: its clock starts again."""
        heard = self._heard_ms.get(device_id)
        if heard is not None and now_ms > heard:
            self._heard_ms[device_id] = now_ms

    def set_interval(self, device_id: str, status_interval_ms: int | None) -> None:
        if status_interval_ms:
            self._intervals[device_id] = status_interval_ms
        else:
            self._intervals.pop(device_id, None)
        heard = self._heard_ms.get(device_id)
        if heard is not None:
            # The bound may be shorter now: the device's earliest moment moves earlier.
            self._schedule(device_id, heard + self.bound_of(device_id))

    def bound_of(self, device_id: str) -> int:
        return self.policy.bound_ms(self._intervals.get(device_id))

    def due(self, now_ms: int, since_ms: int) -> list[tuple[str, int]]:
        """``(device, session)`` of every online device silent for longer than its bound,
        counting from ``since_ms`` at the earliest (the current subscription's start).
        Each is forgotten as it is returned: it is reported once."""
        found: list[tuple[str, int]] = []
        heap = self._heap
        while heap and heap[0][0] < now_ms:
            _, entry, device_id = heapq.heappop(heap)
            if self._entry.get(device_id) != entry:
                continue
            moment = max(self._heard_ms[device_id], since_ms) + self.bound_of(device_id)
            if now_ms > moment:
                found.append((device_id, self._session[device_id]))
                self._forget(device_id)
            else:
                self._schedule(device_id, moment)
        return found


__all__ = ["SILENT", "SilenceClock", "SilencePolicy"]
