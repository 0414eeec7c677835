"""What each supported database can do, decided once per engine.

The stores used to test ``engine.dialect.name != "sqlite"`` each for itself; the rules
live here instead, with the reason for each.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Literal, TypeVar

from sqlalchemy import Engine
from sqlalchemy.sql import Select

Upsert = Literal["on_conflict", "on_duplicate_key"]
S = TypeVar("S", bound=Select[object])


@dataclass(frozen=True, slots=True)
class Capabilities:
    name: str
    #: ``SELECT ... FOR UPDATE`` takes row locks. SQLite has none to take: a write
    #: transaction there starts with ``BEGIN IMMEDIATE`` and holds the database's one
    #: write lock instead (bridge/db/engine.py).
    row_locks: bool
    #: ``INSERT/UPDATE ... RETURNING`` (SQLite 3.35+, PostgreSQL, MariaDB 10.5+ for
    #: INSERT only: treated as absent there).
    returning: bool
    #: The dialect's form of an upsert.
    upsert: Upsert
    #: Status batches as UPDATEs joined to the batch (SQLite, MariaDB); PostgreSQL's
    #: driver pipelines per-row statements in C, which measured faster (status_store).
    set_based_status: bool

    def locked(self, stmt: S) -> S:
        """``stmt`` with ``FOR UPDATE`` where the database takes row locks."""
        return stmt.with_for_update() if self.row_locks else stmt


@cache
def _for(name: str) -> Capabilities:
    if name == "sqlite":
        return Capabilities(name, False, True, "on_conflict", True)
    if name in ("mysql", "mariadb"):
        return Capabilities(name, True, False, "on_duplicate_key", True)
    return Capabilities(name, True, True, "on_conflict", False)


def capabilities(engine: Engine) -> Capabilities:
    """The capabilities of ``engine``'s database (one object per dialect)."""
    return _for(engine.dialect.name)


__all__ = ["Capabilities", "Upsert", "capabilities"]
