"""Clock skew between kiosks and the bridge, from the timestamps ``kb_connectivity`` keeps.

A device's ``ts`` minus the bridge's receive time is its clock offset plus the delivery
delay. Positive values can only be the device's clock running ahead; negative ones mix a
clock behind with late delivery (a retained message replayed to a restarted bridge).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, select

from bridge.db.models import Connectivity
from bridge.db.tables import table_of

CONN = table_of(Connectivity)


@dataclass(frozen=True, slots=True)
class SkewRow:
    device_id: str
    state: str
    last_device_ts_ms: int | None
    last_status_ms: int | None
    updated_ms: int


@dataclass(frozen=True, slots=True)
class SkewReport:
    samples: int
    median_ms: int | None
    max_abs_ms: int | None
    #: (device, skew) beyond the threshold, largest first.
    beyond: list[tuple[str, int]] = field(default_factory=list)
    threshold_ms: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "median_ms": self.median_ms,
            "max_abs_ms": self.max_abs_ms,
            "threshold_ms": self.threshold_ms,
            "beyond": [{"device": d, "skew_ms": s} for d, s in self.beyond],
        }


def device_skew(row: SkewRow) -> int | None:
    """``ts - received`` of the last message whose pair of times the row still holds.

    The status writer sets ``last_status_ms`` with the status ``ts``; a presence event
    sets ``updated_ms`` and, when it carries one, the ``ts`` (births and announced
    offlines do, Wills and reconciliation do not), so the pair is trusted only then.
    """
    ts = row.last_device_ts_ms
    if ts is None:
        return None
    if row.last_status_ms is not None and row.last_status_ms >= row.updated_ms:
        return ts - row.last_status_ms
    if row.state in ("online", "offline") and row.updated_ms > 0:
        return ts - row.updated_ms
    return None


def skew_report(rows: Iterable[SkewRow], threshold_ms: int) -> SkewReport:
    pairs = [(row.device_id, s) for row in rows if (s := device_skew(row)) is not None]
    if not pairs:
        return SkewReport(0, None, None, [], threshold_ms)
    values: Sequence[int] = [s for _, s in pairs]
    beyond = sorted(
        ((d, s) for d, s in pairs if abs(s) > threshold_ms), key=lambda p: (-abs(p[1]), p[0])
    )
    return SkewReport(
        samples=len(pairs),
        median_ms=round(statistics.median(values)),
        max_abs_ms=max(abs(v) for v in values),
        beyond=beyond,
        threshold_ms=threshold_ms,
    )


def load_skew_rows(engine: Engine) -> list[SkewRow]:
    stmt = select(
        CONN.c.device_id,
        CONN.c.state,
        CONN.c.last_device_ts_ms,
        CONN.c.last_status_ms,
        CONN.c.updated_ms,
    )
    with engine.connect() as conn:
        return [
            SkewRow(
                row.device_id,
                row.state,
                None if row.last_device_ts_ms is None else int(row.last_device_ts_ms),
                None if row.last_status_ms is None else int(row.last_status_ms),
                int(row.updated_ms),
            )
            for row in conn.execute(stmt)
        ]
