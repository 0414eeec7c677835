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

from bridge.conformance.clauses import CLAUSES, Clause, Outcome, Verdict
from bridge.conformance.verdicts import judge

__all__ = ["CLAUSES", "Clause", "Outcome", "Verdict", "judge"]
