"""Human output of ``commands``, ``commands show`` and ``send --wait`` (rich renderables)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Final

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from bridge.ops.commands import STATES, CommandRow, lifecycle, why_pending
from bridge.ops.timefmt import ago, clock

STATE_STYLE: Final = {
    "succeeded": "green",
    "failed": "red",
    "rejected": "red",
    "expired": "red",
    "cancelled": "yellow",
    "superseded": "dim",
    "queued": "cyan",
    "sent": "cyan",
    "delivered": "cyan",
    "received": "cyan",
}


def _state(state: str) -> Text:
    return Text(state, style=STATE_STYLE.get(state, ""))


def _table(*columns: str) -> Table:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for name in columns:
        table.add_column(name, no_wrap=name != "WHY")
    return table


def commands_table(rows: Sequence[CommandRow], now_ms: int) -> Table:
    table = _table("CREATED (UTC)", "ID", "DEVICE", "TYPE", "STATE", "ATTEMPTS", "FINISHED", "WHY")
    for row in rows:
        table.add_row(
            clock(row.created_ms),
            # As `device show` prints them; `commands show` takes such a prefix.
            row.id[:8],
            row.device_id,
            row.kind,
            _state(row.state),
            str(row.attempts),
            ago(row.finished_ms, now_ms),
            why_pending(row, now_ms) or "",
        )
    return table


def state_summary(rows: Sequence[CommandRow]) -> Text:
    """``59 commands: 57 succeeded, 2 expired`` in lifecycle order."""
    counts = Counter(row.state for row in rows)
    line = Text(f"{len(rows)} command{'s' if len(rows) != 1 else ''}", style="bold")
    if rows:
        line.append(": ")
        parts = [state for state in STATES if counts.get(state)]
        for n, state in enumerate(parts):
            if n:
                line.append(", ")
            line.append(f"{counts[state]} {state}", style=STATE_STYLE.get(state, ""))
    return line


def command_detail(row: CommandRow, now_ms: int) -> RenderableType:
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="dim")
    facts.add_column()
    facts.add_row("device", row.device_id)
    facts.add_row("type", row.kind)
    facts.add_row("args", row.args)
    state = _state(row.state)
    state.append(f"  after {row.attempts} attempt{'s' if row.attempts != 1 else ''}")
    facts.add_row("state", state)
    why = why_pending(row, now_ms)
    if why:
        facts.add_row("why", why)
    steps = _table("TIME (UTC)", "STEP", "NOTE")
    for step in lifecycle(row):
        steps.add_row(clock(step.at_ms, millis=True), _state(step.step), step.note)
    return Group(Text(f"Command {row.id}", style="bold"), facts, Text(""), steps)


def grouped_results(rows: Sequence[CommandRow], now_ms: int, *, verbose: bool) -> RenderableType:
    """``send --wait``: one line per final state with the reason (its devices listed
    when few); with ``verbose`` the per-device table as well."""
    parts: list[RenderableType] = []
    by_state: dict[str, list[CommandRow]] = {}
    for row in rows:
        by_state.setdefault(row.state, []).append(row)
    for state in STATES:
        group = by_state.get(state)
        if not group:
            continue
        line = Text(f"{len(group):>5} ", style="bold")
        line.append(state, style=STATE_STYLE.get(state, ""))
        reasons = Counter(why_pending(row, now_ms) for row in group)
        for reason, n in reasons.most_common(3):
            if reason:
                line.append(f"\n        {n} x {reason}" if len(reasons) > 1 else f"  {reason}")
        if state != "succeeded" and not verbose:
            shown = ", ".join(row.device_id for row in group[:10])
            more = f" and {len(group) - 10} more" if len(group) > 10 else ""
            line.append(f"\n        devices: {shown}{more}", style="dim")
        parts.append(line)
    if verbose:
        table = _table("DEVICE", "ID", "STATE", "ATTEMPTS", "WHY")
        for row in rows:
            table.add_row(
                row.device_id,
                row.id,
                _state(row.state),
                str(row.attempts),
                why_pending(row, now_ms) or "",
            )
        parts.append(table)
    parts.append(state_summary(rows))
    return Group(*parts)
