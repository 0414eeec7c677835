"""What the ops commands' options offer, import-free: the CLI builds every command's
``--help`` from these at start-up, and importing :mod:`bridge.ops.fleet` for them would
import SQLAlchemy and the table models first."""

from __future__ import annotations

from typing import Final

#: Connectivity states, in the order the summaries list them.
STATES: Final = ("online", "offline", "lost", "unknown")
#: ``devices --sort`` columns.
SORT_KEYS: Final[tuple[str, ...]] = (
    "device",
    "state",
    "since",
    "legacy",
    "battery",
    "wifi",
    "last-seen",
    "app",
)
#: Clock skew between a kiosk and the bridge worth a warning in ``doctor``.
DEFAULT_SKEW_THRESHOLD_MS: Final = 30_000
