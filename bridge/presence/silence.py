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
"""

from __future__ import annotations

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
class _Online:
    session: int
    last_heard_ms: int


@dataclass(slots=True)
class SilenceClock:
    """Which online devices have been silent too long."""

    policy: SilencePolicy = field(default_factory=SilencePolicy)
    _online: dict[str, _Online] = field(default_factory=dict)
    #: Configured status intervals by device (absent: the policy's default).
    _intervals: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self._online)

    def __contains__(self, device_id: object) -> bool:
        return device_id in self._online

    def born(self, device_id: str, session: int, now_ms: int) -> None:
        """A birth: online in ``session`` (an older session's birth changes nothing)."""
        current = self._online.get(device_id)
        if current is not None and current.session > session:
            return
        self._online[device_id] = _Online(session, now_ms)

    def ended(self, device_id: str, session: int) -> None:
        """An offline or a Will of ``session``: the device is no longer watched (unless
        it is already online in a newer session)."""
        current = self._online.get(device_id)
        if current is not None and current.session <= session:
            del self._online[device_id]

    def heard(self, device_id: str, now_ms: int) -> None:
        """Anything from the device: its clock starts again."""
        current = self._online.get(device_id)
        if current is not None and now_ms > current.last_heard_ms:
            current.last_heard_ms = now_ms

    def set_interval(self, device_id: str, status_interval_ms: int | None) -> None:
        if status_interval_ms:
            self._intervals[device_id] = status_interval_ms
        else:
            self._intervals.pop(device_id, None)

    def bound_of(self, device_id: str) -> int:
        return self.policy.bound_ms(self._intervals.get(device_id))

    def due(self, now_ms: int, since_ms: int) -> list[tuple[str, int]]:
        """``(device, session)`` of every online device silent for longer than its bound,
        counting from ``since_ms`` at the earliest (the current subscription's start).
        Each is forgotten as it is returned: it is reported once."""
        found: list[tuple[str, int]] = []
        intervals = self._intervals
        policy = self.policy
        default = policy.bound_ms()
        for device_id, online in self._online.items():
            quiet_since = max(online.last_heard_ms, since_ms)
            interval = intervals.get(device_id)
            bound = default if interval is None else policy.bound_ms(interval)
            if now_ms - quiet_since > bound:
                found.append((device_id, online.session))
        for device_id, _ in found:
            del self._online[device_id]
        return found


__all__ = ["SILENT", "SilenceClock", "SilencePolicy"]
