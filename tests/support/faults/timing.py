"""Deadlines shared by the fault-injection helpers and tests."""

from __future__ import annotations

#: Generous: the CI machine has two shared cores and runs brokers, databases and fleets.
SETTLE_S = 60.0
