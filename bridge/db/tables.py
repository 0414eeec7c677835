"""The SQLAlchemy ``Table`` of a SQLModel class, typed.

SQLModel sets ``__table__`` on each ``table=True`` class when the class is created; the
attribute is invisible to a type checker. This is the one place that reads it.
"""

from __future__ import annotations

from sqlalchemy import Table
from sqlmodel import SQLModel


def table_of(model: type[SQLModel]) -> Table:
    """``model.__table__``, checked to be a ``Table``."""
    table = getattr(model, "__table__", None)
    if not isinstance(table, Table):
        raise TypeError(f"{model.__name__} is not a table model (table=True)")
    return table


__all__ = ["table_of"]
