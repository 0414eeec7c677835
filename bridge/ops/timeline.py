"""``device show``: one device's history as a single timeline, and why it is down.

:func:`load_device` does the reads; :func:`build_timeline` and :func:`explain` are pure
over the rows so that every wording is tested without a database.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from sqlalchemy import Engine, select

from bridge.db.models import CommandRecord, Connectivity, PresenceHistory, Remote
from bridge.db.tables import table_of
from bridge.ops.durations import format_duration, parse_duration
from bridge.ops.errors import NotFound
from bridge.ops.timefmt import ago, clock, iso_utc, naive_utc_to_ms
from bridge.ops.uptime import APPLIED, Availability, availability, load_transitions
from schemas import DeviceConfig, Status

HIST = table_of(PresenceHistory)
CONN = table_of(Connectivity)
REMOTES = table_of(Remote)
COMMANDS = table_of(CommandRecord)

UPTIME_WINDOWS: Final = ("1h", "24h", "7d")
#: Three missed status intervals (30 s by default) is a gap worth showing.
DEFAULT_STATUS_GAP_MS: Final = 90_000
FINISHED_COMMANDS: Final = frozenset(
    {"succeeded", "failed", "rejected", "expired", "cancelled", "superseded"}
)


@dataclass(frozen=True, slots=True)
class HistoryRow:
    id: int
    state: str
    prev_state: str | None
    session: int
    reason: str | None
    verdict: str
    device_ts_ms: int | None
    received_ms: int
    committed_ms: int
    writer: str | None


@dataclass(frozen=True, slots=True)
class ConnectivityView:
    state: str
    session: int
    since_ms: int
    reason: str | None
    status_session: int
    last_seq: int
    last_status_ms: int | None
    last_device_ts_ms: int | None
    flapping: bool
    transitions: int
    legacy_status: str | None
    writer: str | None
    updated_ms: int
    #: Set by a successful wipe: the device must be provisioned again.
    needs_provisioning: bool = False


@dataclass(frozen=True, slots=True)
class RemoteView:
    name: str | None
    status: str
    last_seen_ms: int | None
    app_version: str | None
    android_version: str | None
    ip_address: str | None
    battery: int | None
    wifi: int | None
    deleted_ms: int | None


@dataclass(frozen=True, slots=True)
class CommandView:
    id: str
    type: str
    state: str
    created_ms: int
    finished_ms: int | None
    acked_ms: int | None
    attempts: int
    detail: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.type,
            "state": self.state,
            "created_at": iso_utc(self.created_ms),
            "acked_at": iso_utc(self.acked_ms),
            "finished_at": iso_utc(self.finished_ms),
            "attempts": self.attempts,
            "detail": self.detail,
        }


@dataclass(frozen=True, slots=True)
class TimelineEntry:
    at_ms: int
    #: birth, offline, will, unknown, status, command
    kind: str
    text: str
    session: int | None = None
    #: The history verdict; ``None`` for entries that are not presence events.
    verdict: str | None = None

    @property
    def ignored(self) -> bool:
        return self.verdict is not None and self.verdict not in APPLIED

    def to_json(self) -> dict[str, Any]:
        return {
            "at": iso_utc(self.at_ms),
            "at_ms": self.at_ms,
            "kind": self.kind,
            "text": self.text,
            "session": self.session,
            "verdict": self.verdict,
            "ignored": self.ignored,
        }


@dataclass(frozen=True, slots=True)
class ConfigView:
    desired_version: int | None
    reported_version: int | None
    note: str

    @property
    def in_sync(self) -> bool | None:
        if self.desired_version is None or self.reported_version is None:
            return None
        return self.desired_version == self.reported_version

    def to_json(self) -> dict[str, Any]:
        return {
            "desired_version": self.desired_version,
            "reported_version": self.reported_version,
            "in_sync": self.in_sync,
            "note": self.note,
        }


@dataclass(frozen=True, slots=True)
class DeviceReport:
    device_id: str
    now_ms: int
    remote: RemoteView | None
    connectivity: ConnectivityView | None
    history: list[HistoryRow]
    commands: list[CommandView]
    timeline: list[TimelineEntry]
    why: list[str]
    uptime: dict[str, Availability] = field(default_factory=dict)
    config: ConfigView | None = None

    @property
    def state(self) -> str:
        return self.connectivity.state if self.connectivity else "unknown"


# --- pure parts -----------------------------------------------------------------------


def describe_event(row: HistoryRow, newest_session: int | None = None) -> TimelineEntry:
    """One presence event in words, with what the bridge did with it."""
    if row.state == "online":
        kind, text = "birth", f"birth: online, session {row.session}"
    elif row.state == "offline":
        kind = "offline"
        text = f"announced offline ({row.reason or 'no reason'}), session {row.session}"
    else:
        kind, text = "will", f"Last Will: connection lost, session {row.session}"
    verdict = row.verdict
    if verdict == "reset":
        text += " (accepted as a reset: lower session after a long downtime)"
    elif verdict == "stale":
        newer = f"; session {newest_session} is newer" if newest_session else ""
        text += f" - ignored as stale (older session or earlier step{newer})"
    elif verdict == "duplicate":
        text += " - duplicate (retained replay or repeat), no change"
    elif verdict == "deleted":
        text += " - ignored: the device is soft-deleted in the CMS"
    elif verdict == "unknown_device":
        text += " - ignored: no device row in the CMS and no birth"
    if row.device_ts_ms is not None:
        skew = row.device_ts_ms - row.received_ms
        if abs(skew) >= 5_000:
            text += f" [device clock {'+' if skew > 0 else '-'}{format_duration(abs(skew))}]"
    return TimelineEntry(row.received_ms, kind, text, row.session, verdict)


def describe_command(cmd: CommandView) -> TimelineEntry:
    text = f"command {cmd.type} {cmd.id[:8]} -> {cmd.state}"
    if cmd.finished_ms is not None:
        text += f" after {format_duration(max(0, cmd.finished_ms - cmd.created_ms))}"
    if cmd.attempts > 1:
        text += f" ({cmd.attempts} attempts)"
    if cmd.detail:
        text += f": {cmd.detail}"
    return TimelineEntry(cmd.created_ms, "command", text)


def build_timeline(
    history: Sequence[HistoryRow],
    commands: Sequence[CommandView],
    connectivity: ConnectivityView | None,
    now_ms: int,
    *,
    status_gap_ms: int = DEFAULT_STATUS_GAP_MS,
) -> list[TimelineEntry]:
    """Presence events, commands, reconciliation and telemetry gaps, oldest first."""
    newest = connectivity.session if connectivity else None
    entries = [describe_event(row, newest) for row in history]
    entries += [describe_command(cmd) for cmd in commands]
    if connectivity is not None:
        if connectivity.state == "unknown" and connectivity.since_ms:
            entries.append(
                TimelineEntry(
                    connectivity.since_ms,
                    "unknown",
                    "set unknown by reconciliation: the broker held no retained presence",
                )
            )
        if connectivity.last_status_ms is not None:
            entries.append(
                TimelineEntry(
                    connectivity.last_status_ms,
                    "status",
                    f"last status stored (session {connectivity.status_session}, "
                    f"seq {connectivity.last_seq})",
                )
            )
        gap = status_gap(connectivity, now_ms, status_gap_ms)
        if gap is not None:
            entries.append(TimelineEntry(now_ms, "status", gap))
    entries.sort(key=lambda e: e.at_ms)
    return entries


def status_gap(connectivity: ConnectivityView, now_ms: int, gap_ms: int) -> str | None:
    """A sentence when an online device has been silent longer than ``gap_ms``."""
    if connectivity.state != "online":
        return None
    last = connectivity.last_status_ms
    if last is None or last < connectivity.since_ms:
        silent = now_ms - connectivity.since_ms
        if silent > gap_ms:
            return f"no status since it came online {format_duration(silent)} ago"
        return None
    if now_ms - last > gap_ms:
        return f"status gap: online but silent for {format_duration(now_ms - last)}"
    return None


def explain(
    connectivity: ConnectivityView | None,
    history: Sequence[HistoryRow],
    remote: RemoteView | None,
    now_ms: int,
    *,
    status_gap_ms: int = DEFAULT_STATUS_GAP_MS,
) -> list[str]:
    """The plain answer to "why is it offline?" (or why it shows what it shows)."""
    lines: list[str] = []
    if remote is not None and remote.deleted_ms is not None:
        lines.append(
            f"Soft-deleted in the CMS since {clock(remote.deleted_ms)}: the bridge ignores it."
        )
    if connectivity is None:
        lines.append(
            "The bridge has never stored presence for this device: it exists only in the CMS "
            "(never connected, or connected before the bridge was installed and has no "
            "retained presence)."
        )
        return lines
    c = connectivity
    since = f"{clock(c.since_ms)} ({ago(c.since_ms, now_ms)})" if c.since_ms else "unknown time"
    if c.state == "online":
        lines.append(f"Online since {since}, session {c.session}.")
        gap = status_gap(c, now_ms, status_gap_ms)
        if gap:
            lines.append(f"But: {gap}; the connection may be half-open or the app stuck.")
    elif c.state == "offline":
        lines.append(
            f"Offline since {since}: the device announced it ({c.reason or 'no reason'}) "
            f"and disconnected cleanly (session {c.session})."
        )
    elif c.state == "lost":
        lines.append(
            f"Lost since {since}: the connection died without a goodbye and the broker "
            f"published its Last Will (session {c.session}). Power, network or app crash."
        )
    elif c.session == 0:
        lines.append(
            "Never seen: the bridge has no presence from this device, and when it last "
            "(re)connected the broker held no retained presence for it."
        )
        return lines
    else:
        lines.append(
            f"Unknown since {since}: when the bridge last (re)connected, the broker held no "
            f"retained presence for it ({c.reason or 'no reason recorded'}), so its last "
            f"state (session {c.session}) can no longer be trusted."
        )
    applied = [row for row in history if row.verdict in APPLIED]
    if applied:
        last = applied[-1]
        lines.append(
            f"Last applied transition: {last.prev_state or 'new'} -> {last.state}"
            + (f" ({last.reason})" if last.reason else "")
            + f" at {clock(last.received_ms)}, session {last.session}, by {last.writer or '?'}."
        )
        later = [row for row in history if row.id > last.id and row.verdict not in APPLIED]
        if later:
            counts = Counter(row.verdict for row in later)
            shown = ", ".join(f"{n} {verdict}" for verdict, n in sorted(counts.items()))
            lines.append(f"Since then {len(later)} event(s) were ignored: {shown}.")
    newer = sorted({row.session for row in history if row.session > c.session})
    if newer:
        lines.append(
            f"A newer session was seen ({', '.join(map(str, newer))}) but not applied: "
            "check the ignored events above."
        )
    elif c.status_session > c.session:
        lines.append(
            f"Telemetry from a newer session ({c.status_session}) arrived after this state: "
            "the device reconnected but its birth has not been processed."
        )
    elif c.state != "online":
        lines.append("No newer session has been seen since.")
    if remote is not None and c.legacy_status is not None and remote.status != _expected(c):
        if c.flapping:
            lines.append(
                f"The CMS shows {remote.status}: the device is flapping ({c.transitions} "
                "transitions) and is held Disconnected until it settles."
            )
        elif c.state != "online" and remote.status == "Connected":
            lines.append(
                "The CMS still shows Connected: the offline grace period has not ended yet."
            )
    elif c.flapping:
        lines.append(f"Flapping: {c.transitions} transitions; the CMS holds it Disconnected.")
    return lines


def _expected(c: ConnectivityView) -> str:
    return "Connected" if c.state == "online" else "Disconnected"


def config_view(
    desired: DeviceConfig | None, reported: Status | None, *, source: str | None
) -> ConfigView:
    """Desired config version (retained ``config``) vs the one the kiosk reports."""
    if source is None:
        return ConfigView(
            None,
            None,
            "unknown: the database does not store config versions yet; pass --broker "
            "(or KB_BROKER) to read the retained config and status",
        )
    desired_v = desired.version if desired else None
    reported_v = reported.config_version if reported else None
    if desired_v is None:
        note = "no retained desired config on the broker"
    elif reported_v is None:
        note = "the kiosk's retained status reports no config_version"
    elif desired_v == reported_v:
        note = "the kiosk applies the desired config"
    else:
        note = f"the kiosk applies version {reported_v}, not the desired {desired_v}"
    return ConfigView(desired_v, reported_v, f"{note} (read from {source})")


# --- reads ------------------------------------------------------------------------------


def load_device(
    engine: Engine,
    device_id: str,
    now_ms: int,
    *,
    history_limit: int = 50,
    commands_limit: int = 10,
    status_gap_ms: int = DEFAULT_STATUS_GAP_MS,
) -> DeviceReport:
    """Everything the tables know about ``device_id``; raises :class:`NotFound`."""
    with engine.connect() as conn:
        remote_row = conn.execute(
            select(REMOTES).where(REMOTES.c.device_identifier == device_id)
        ).first()
        conn_row = conn.execute(select(CONN).where(CONN.c.device_id == device_id)).first()
        hist_rows = conn.execute(
            select(HIST)
            .where(HIST.c.device_id == device_id)
            .order_by(HIST.c.id.desc())
            .limit(history_limit)
        ).all()
        cmd_rows = conn.execute(
            select(COMMANDS)
            .where(COMMANDS.c.device_id == device_id)
            .order_by(COMMANDS.c.created_at.desc())
            .limit(commands_limit)
        ).all()
    if remote_row is None and conn_row is None and not hist_rows:
        raise NotFound(
            f"device {device_id!r} is not known: no row in remotes, kb_connectivity or history",
            hint="`kiosk-bridge devices --search TEXT` lists similar ids",
        )
    remote = _remote_view(remote_row) if remote_row is not None else None
    connectivity = _connectivity_view(conn_row) if conn_row is not None else None
    history = [_history_row(row) for row in reversed(hist_rows)]
    commands = [_command_view(row) for row in reversed(cmd_rows)]
    windows = {name: parse_duration(name) for name in UPTIME_WINDOWS}
    transitions = load_transitions(engine, now_ms - max(windows.values()), now_ms, [device_id]).get(
        device_id, []
    )
    return DeviceReport(
        device_id=device_id,
        now_ms=now_ms,
        remote=remote,
        connectivity=connectivity,
        history=history,
        commands=commands,
        timeline=build_timeline(
            history, commands, connectivity, now_ms, status_gap_ms=status_gap_ms
        ),
        why=explain(connectivity, history, remote, now_ms, status_gap_ms=status_gap_ms),
        uptime={
            name: availability(transitions, now_ms - span, now_ms) for name, span in windows.items()
        },
    )


def _remote_view(row: Any) -> RemoteView:
    return RemoteView(
        name=row.name,
        status=row.status,
        last_seen_ms=naive_utc_to_ms(row.last_seen_at),
        app_version=row.app_version,
        android_version=row.android_version,
        ip_address=row.ip_address,
        battery=row.battery_level,
        wifi=row.wifi_strength,
        deleted_ms=naive_utc_to_ms(row.deleted_at),
    )


def _connectivity_view(row: Any) -> ConnectivityView:
    return ConnectivityView(
        state=row.state,
        session=int(row.session),
        since_ms=int(row.since_ms),
        reason=row.reason,
        status_session=int(row.status_session),
        last_seq=int(row.last_seq),
        last_status_ms=None if row.last_status_ms is None else int(row.last_status_ms),
        last_device_ts_ms=None if row.last_device_ts_ms is None else int(row.last_device_ts_ms),
        flapping=bool(row.flapping),
        transitions=int(row.transitions),
        legacy_status=row.legacy_status,
        writer=row.writer,
        updated_ms=int(row.updated_ms),
        needs_provisioning=bool(row.needs_provisioning),
    )


def _history_row(row: Any) -> HistoryRow:
    return HistoryRow(
        id=int(row.id),
        state=row.state,
        prev_state=row.prev_state,
        session=int(row.session),
        reason=row.reason,
        verdict=row.verdict,
        device_ts_ms=None if row.device_ts_ms is None else int(row.device_ts_ms),
        received_ms=int(row.received_ms),
        committed_ms=int(row.committed_ms),
        writer=row.writer,
    )


def _command_view(row: Any) -> CommandView:
    created = naive_utc_to_ms(row.created_at) or 0
    return CommandView(
        id=row.id,
        type=row.type,
        state=row.state,
        created_ms=created,
        finished_ms=naive_utc_to_ms(row.finished_at),
        acked_ms=naive_utc_to_ms(row.acked_at),
        attempts=int(row.attempts),
        detail=row.detail or row.last_error,
    )
