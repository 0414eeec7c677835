"""Human durations as the CLI takes and shows them: ``90s``, ``5m``, ``1h30m``, ``7d``."""

from __future__ import annotations

import re
from typing import Final

_UNIT_MS: Final = {
    "ms": 1,
    "s": 1_000,
    "m": 60_000,
    "h": 3_600_000,
    "d": 86_400_000,
    "w": 604_800_000,
}
_PART: Final = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_SHOWN: Final = (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1_000))


def parse_duration(text: str) -> int:
    """Milliseconds in ``text``; raises ``ValueError`` with an example of the syntax.

    A bare number is refused: ``--stale 5`` could mean seconds or minutes.
    """
    compact = text.strip().lower().replace(" ", "")
    if not compact:
        raise ValueError("empty duration: use e.g. 90s, 5m, 1h30m or 7d")
    pos = 0
    total = 0.0
    for match in _PART.finditer(compact):
        if match.start() != pos:
            break
        total += float(match[1]) * _UNIT_MS[match[2]]
        pos = match.end()
    if pos != len(compact):
        raise ValueError(
            f"invalid duration {text!r}: use a number with a unit (ms, s, m, h, d, w), "
            "e.g. 90s, 5m, 1h30m or 7d"
        )
    return round(total)


def format_duration(ms: int | float, *, parts: int = 2) -> str:
    """``3d 4h``, ``5m 2s``, ``850ms``: the ``parts`` largest units, truncated."""
    ms = int(ms)
    if ms < 0:
        return "-" + format_duration(-ms, parts=parts)
    if ms < 1_000:
        return f"{ms}ms"
    out: list[str] = []
    rest = ms
    for unit, size in _SHOWN:
        if rest >= size or out:
            count, rest = divmod(rest, size)
            if count or out:
                out.append(f"{count}{unit}")
        if len(out) == parts:
            break
    return " ".join(part for part in out if not part.startswith("0")) or "0s"
