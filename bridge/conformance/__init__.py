"""``kiosk-bridge conformance``: judge any kiosk implementation against the contract.

The kit plays the bridge and the CMS, starts the kiosk under test (``--kiosk-cmd``)
behind a TCP proxy it controls, in front of a broker it starts (or ``--broker``), acts
(commands, a stale Will, SIGTERM, ``kill -9``, dropped, refused and silent links),
records what passes on the wire and on the broker, then judges each clause.

One concern per module: :mod:`.clauses` (ids and texts), :mod:`.wire` (MQTT packets),
:mod:`.observations` (the record), :mod:`.verdicts` (pure judgement), :mod:`.runner`
(the actions), :mod:`.broker`, :mod:`.network`, :mod:`.process`, :mod:`.client` (I/O),
:mod:`.report` (output), :mod:`.specimens` (kiosks with one deliberate flaw each).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bridge.conformance.clauses import CLAUSES, Clause, Outcome, Verdict
    from bridge.conformance.verdicts import judge

__all__ = ["CLAUSES", "Clause", "Outcome", "Verdict", "judge"]

# Loaded on first use (PEP 562): ``kiosk-bridge --help`` imports the CLI's conformance
# command for its options (clauses, broker kinds), and the verdicts would pull the whole
# contract in at every start-up of every command.
_LAZY = {
    "CLAUSES": "bridge.conformance.clauses",
    "Clause": "bridge.conformance.clauses",
    "Outcome": "bridge.conformance.clauses",
    "Verdict": "bridge.conformance.clauses",
    "judge": "bridge.conformance.verdicts",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
