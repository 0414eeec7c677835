"""The one order in which a transaction may lock the bridge's tables.

Two transactions that lock rows of two tables in opposite orders can deadlock on
MariaDB and PostgreSQL (SQLite has one write lock per database and cannot). Every
store's transaction takes its row locks (``SELECT ... FOR UPDATE``, ``UPDATE``,
``INSERT``, ``DELETE``) in the order below, skipping tables it does not touch; within
one table, rows are locked in key order (sorted device ids). ``tests/test_db_lock_order.py``
records the locks real transactions take on MariaDB and PostgreSQL and checks them
against this list.

Why this order: presence has always gone ``kb_connectivity`` then ``remotes`` (it
decides from the fence it locked, then writes the CMS's row); everything that changes
a credential starts from the device's ``remotes`` row (it must exist and not be
deleted); commands come after the rows they depend on (a wipe's success marks the
device's connectivity row first).
``kb_device_config`` comes first because ``set_config`` stores the desired config
before it mirrors ``remote_control_enabled`` into ``remotes``.
"""

from __future__ import annotations

from typing import Final

LOCK_ORDER: Final = (
    # Every write transaction of a running bridge first share-locks the writer lease's
    # row (bridge/db/fence.py); taking the lease locks it alone, in a transaction of its
    # own.
    "kb_lease",
    "kb_device_config",
    "kb_connectivity",
    "remotes",
    "kb_http_devices",
    "kb_device_credentials",
    "kb_previous_credentials",
    "kb_claim_windows",
    "kb_provision_nonces",
    "kb_commands",
)

#: Tables that are only appended to (a new row per INSERT, an auto-increment key, no
#: unique key a second writer could hit, never read FOR UPDATE): nobody ever waits for
#: their locks, so where a transaction writes them does not matter.
APPEND_ONLY: Final = ("kb_presence_history", "kb_security_audit")

RANK: Final = {table: rank for rank, table in enumerate(LOCK_ORDER)}


def out_of_order(tables: list[str]) -> tuple[str, str] | None:
    """The first pair in ``tables`` (a transaction's locks, in the order taken) that
    goes against :data:`LOCK_ORDER`, or ``None``. Going back to a table locked earlier in
    the same transaction (an UPDATE of the row it selected FOR UPDATE) takes no new lock."""
    highest: str | None = None
    seen: set[str] = set()
    for table in tables:
        if table not in RANK or table in seen:
            continue
        seen.add(table)
        if highest is not None and RANK[table] < RANK[highest]:
            return highest, table
        if highest is None or RANK[table] > RANK[highest]:
            highest = table
    return None


__all__ = ["APPEND_ONLY", "LOCK_ORDER", "RANK", "out_of_order"]
