"""Human output of the ops commands as rich renderables (the CLI prints them)."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from bridge.ops.choices import STATES
from bridge.ops.durations import format_duration
from bridge.ops.fleet import FleetRow, FleetSummary
from bridge.ops.fleet_watch import Change
from bridge.ops.timefmt import ago, clock
from bridge.ops.timeline import DeviceReport
from bridge.ops.uptime import Availability, DeviceUptime

if TYPE_CHECKING:
    from bridge.ops.doctor import DoctorReport

STATE_STYLE: Final = {"online": "green", "offline": "yellow", "lost": "red", "unknown": "dim"}
# By the doctor's Level values: importing bridge.ops.doctor here would load the MQTT
# stack into every command that prints a table.
_LEVEL_STYLE: Final = {"OK": "green", "WARN": "yellow", "FAIL": "bold red"}
_KIND_STYLE: Final = {
    "birth": "green",
    "offline": "yellow",
    "will": "red",
    "unknown": "dim",
    "status": "cyan",
    "command": "magenta",
}


def _state(state: str) -> Text:
    return Text(state, style=STATE_STYLE.get(state, ""))


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _opt(value: object, unit: str = "") -> str:
    return "-" if value is None else f"{value}{unit}"


# --- devices ---------------------------------------------------------------------------


#: Columns left out of the compact table (the demo's, which must fit 80 columns).
_WIDE_ONLY = frozenset({"FLAPPING", "WIFI", "APP"})


def fleet_table(rows: Sequence[FleetRow], now_ms: int, *, compact: bool = False) -> Table:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    columns = (
        ("DEVICE", "left"),
        ("STATE", "left"),
        ("SINCE", "right"),
        ("CMS STATUS", "left"),
        ("FLAPPING", "left"),
        ("BATTERY", "right"),
        ("WIFI", "right"),
        ("LAST SEEN", "right"),
        ("APP", "left"),
    )
    shown = [not (compact and name in _WIDE_ONLY) for name, _ in columns]
    for (name, justify), keep in zip(columns, shown, strict=True):
        if keep:
            table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for row in rows:
        state = _state(row.state)
        if row.reason and row.state != "online":
            state.append(f" ({row.reason})", style="dim")
        if row.deleted:
            state.append(" [deleted]", style="dim")
        if row.needs_provisioning:
            state.append(" [wiped: needs provisioning]", style="bold yellow")
        cells = (
            row.device_id,
            state,
            ago(row.since_ms, now_ms),
            row.legacy_status,
            Text("yes", style="magenta") if row.flapping else "",
            _opt(row.battery, "%"),
            _opt(row.wifi, " dBm"),
            ago(row.last_seen_ms, now_ms),
            row.app_version or "-",
        )
        table.add_row(*(cell for cell, keep in zip(cells, shown, strict=True) if keep))
    return table


def fleet_summary_line(summary: FleetSummary, fleet_total: int) -> Text:
    line = Text(_plural(summary.total, "device"), style="bold")
    if summary.total != fleet_total:
        line.append(f" (of {fleet_total})", style="dim")
    line.append(": ")
    for n, state in enumerate(STATES):
        if n:
            line.append(", ")
        line.append(f"{summary.by_state.get(state, 0)} {state}", style=STATE_STYLE[state])
    line.append(f"  |  CMS: {summary.connected} Connected, {summary.disconnected} Disconnected")
    line.append(f"  |  {summary.flapping} flapping", style="magenta" if summary.flapping else "")
    return line


def fleet_change_line(change: Change) -> Text:
    """``07:12:03.120Z  lobby-1  state  online -> lost  (reboot)`` for ``devices --watch``."""
    line = Text(clock(change.at_ms, millis=True)[11:], style="dim")
    line.append(f"  {change.device_id:<20} ", style="bold")
    line.append(f"{change.what:<13}")
    line.append(change.old or "-", style=STATE_STYLE.get(change.old or "", "dim"))
    line.append(" -> ")
    line.append(change.new or "-", style=STATE_STYLE.get(change.new or "", "bold"))
    if change.detail:
        line.append(f"  ({change.detail})", style="dim")
    return line


# --- device show -------------------------------------------------------------------------


def _uptime_cell(a: Availability) -> str:
    return "n/a" if a.percent is None else f"{a.percent:.2f}%"


def device_report(report: DeviceReport) -> RenderableType:
    now = report.now_ms
    parts: list[RenderableType] = []
    title = Text(f"Device {report.device_id}", style="bold")
    if report.remote and report.remote.name:
        title.append(f"  ({report.remote.name})", style="dim")
    parts.append(title)
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="dim")
    facts.add_column()
    c = report.connectivity
    state = _state(report.state)
    if c is not None:
        state.append(
            f" since {clock(c.since_ms) if c.since_ms else '-'} ({ago(c.since_ms or None, now)})"
            f", session {c.session}"
        )
        if c.reason and c.state != "online":
            state.append(f", reason {c.reason}")
        if c.flapping:
            state.append(f"  FLAPPING ({c.transitions} transitions)", style="magenta")
    facts.add_row("state", state)
    if c is not None and c.needs_provisioning:
        facts.add_row(
            "provisioning",
            Text(
                "needed: wiped by a command; the device gets a credential again by a "
                "claim or `kiosk-bridge device enroll`",
                style="bold yellow",
            ),
        )
    r = report.remote
    if r is not None:
        facts.add_row("CMS status", f"{r.status}   last seen {ago(r.last_seen_ms, now)}")
        facts.add_row(
            "device",
            f"app {r.app_version or '-'}  android {r.android_version or '-'}  "
            f"ip {r.ip_address or '-'}",
        )
        facts.add_row("telemetry", f"battery {_opt(r.battery, '%')}  wifi {_opt(r.wifi, ' dBm')}")
        if r.deleted_ms is not None:
            facts.add_row("deleted", Text(clock(r.deleted_ms), style="red"))
    else:
        facts.add_row("CMS", Text("no row in remotes", style="yellow"))
    if report.config is not None:
        cfg = report.config
        facts.add_row(
            "config",
            f"desired {_opt(cfg.desired_version)}  reported {_opt(cfg.reported_version)}  "
            f"- {cfg.note}",
        )
    parts.append(facts)
    parts.append(Text("\nWhy is it in this state?", style="bold"))
    why = Table.grid(padding=(0, 1))
    why.add_column(no_wrap=True)
    why.add_column()
    for line in report.why:
        # A grid, so that a wrapped sentence stays indented under its bullet.
        why.add_row(" -", line)
    parts.append(why)
    parts.append(Text("\nUptime", style="bold"))
    uptime = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for name in ("WINDOW", "AVAILABILITY", "ONLINE", "ANNOUNCED", "LOST", "UNKNOWN", "CHANGES"):
        uptime.add_column(name, justify="right" if name != "WINDOW" else "left")
    for name, a in report.uptime.items():
        uptime.add_row(
            name,
            _uptime_cell(a),
            format_duration(a.online_ms),
            format_duration(a.announced_ms),
            format_duration(a.lost_ms),
            format_duration(a.unknown_ms),
            str(a.transitions),
        )
    parts.append(uptime)
    parts.append(Text("\nTimeline (oldest first)", style="bold"))
    timeline = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    timeline.add_column("TIME (UTC)", no_wrap=True)
    timeline.add_column("KIND", no_wrap=True)
    timeline.add_column("EVENT")
    for entry in report.timeline:
        style = "dim" if entry.ignored else _KIND_STYLE.get(entry.kind, "")
        timeline.add_row(clock(entry.at_ms, millis=True), Text(entry.kind, style=style), entry.text)
    if not report.timeline:
        timeline.add_row("-", "", "no events recorded")
    parts.append(timeline)
    parts.append(Text("\nRecent commands", style="bold"))
    if report.commands:
        commands = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
        for name in ("CREATED (UTC)", "ID", "TYPE", "STATE", "ATTEMPTS", "DETAIL"):
            commands.add_column(name)
        for cmd in reversed(report.commands):
            commands.add_row(
                clock(cmd.created_ms),
                cmd.id[:8],
                cmd.type,
                cmd.state,
                str(cmd.attempts),
                cmd.detail or "",
            )
        parts.append(commands)
    else:
        parts.append(Text("  none recorded in kb_commands", style="dim"))
    return Group(*parts)


# --- uptime --------------------------------------------------------------------------------


def uptime_table(rows: Sequence[DeviceUptime]) -> Table:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for name in (
        "DEVICE",
        "AVAILABILITY",
        "ONLINE",
        "ANNOUNCED OFFLINE",
        "LOST",
        "UNKNOWN",
        "CHANGES",
        "ANNOUNCED REASONS",
    ):
        justify = "left" if name in ("DEVICE", "ANNOUNCED REASONS") else "right"
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for row in rows:
        a = row.availability
        reasons = ", ".join(
            f"{why} {format_duration(ms)}" for why, ms in sorted(a.announced_by_reason.items())
        )
        pct = _uptime_cell(a)
        table.add_row(
            row.device_id,
            Text(pct, style="red" if a.percent is not None and a.percent < 99 else ""),
            format_duration(a.online_ms),
            format_duration(a.announced_ms),
            format_duration(a.lost_ms),
            format_duration(a.unknown_ms),
            str(a.transitions),
            reasons,
        )
    return table


CSV_COLUMNS: Final = (
    "device",
    "availability_percent",
    "online_ms",
    "announced_offline_ms",
    "lost_ms",
    "unknown_ms",
    "transitions",
    "announced_by_reason",
)


def uptime_csv(rows: Sequence[DeviceUptime]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        a = row.availability
        writer.writerow(
            [
                row.device_id,
                "" if a.percent is None else f"{a.percent:.4f}",
                a.online_ms,
                a.announced_ms,
                a.lost_ms,
                a.unknown_ms,
                a.transitions,
                ";".join(f"{k}={v}" for k, v in sorted(a.announced_by_reason.items())),
            ]
        )
    return out.getvalue()


# --- doctor ----------------------------------------------------------------------------------


def doctor_report(report: DoctorReport) -> RenderableType:
    table = Table.grid(padding=(0, 2))
    table.add_column(no_wrap=True)
    table.add_column(no_wrap=True, style="bold")
    table.add_column()
    for check in report.checks:
        body = Text(check.summary)
        for detail in check.details:
            body.append(f"\n- {detail}", style="dim")
        if check.hint:
            body.append(f"\nfix: {check.hint}", style="cyan")
        style = _LEVEL_STYLE[check.level.value]
        table.add_row(Text(check.level.value, style=style), check.name, body)
    fails = sum(1 for c in report.checks if c.level.value == "FAIL")
    warns = sum(1 for c in report.checks if c.level.value == "WARN")
    verdict = (
        Text("all checks passed", style="green")
        if not fails and not warns
        else Text(f"{fails} failed, {warns} warning(s)", style="red" if fails else "yellow")
    )
    return Group(table, Text(""), verdict)
