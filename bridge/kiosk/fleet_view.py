"""Terminal output of ``kiosk-bridge simulate``: a progress bar, then one live line."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from bridge.kiosk.simulator import FleetStats


@contextmanager
def connect_progress(console: Console, total: int) -> Iterator[Callable[[int, int], None]]:
    """A bar of devices online; yields the callback ``Fleet.connect_all`` reports to."""
    progress = Progress(
        TextColumn("connecting"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    task = progress.add_task("connect", total=total)

    def report(done: int, _total: int) -> None:
        progress.update(task, completed=done)

    with progress:
        yield report


def summary_line(stats: FleetStats, elapsed_s: float) -> Text:
    line = Text()
    line.append(f"{elapsed_s:6.0f}s  ")
    line.append(f"online {stats.online}", style="green")
    line.append(f"  offline {stats.offline}", style="red" if stats.offline else "dim")
    line.append(f"  killed {stats.killed}  black-holed {stats.blackholed}")
    line.append(f"  connects {stats.connects}  commands {stats.commands}")
    line.append(f"  cpu {stats.cpu_percent:.0f}%  rss {stats.rss_mb:.0f} MB", style="dim")
    return line


@contextmanager
def live_summary(console: Console) -> Iterator[Callable[[FleetStats, float], None]]:
    """One line, redrawn in place on a terminal (appended when piped)."""
    with Live(Text("starting"), console=console, refresh_per_second=4, transient=True) as live:

        def update(stats: FleetStats, elapsed_s: float) -> None:
            live.update(summary_line(stats, elapsed_s))

        yield update
