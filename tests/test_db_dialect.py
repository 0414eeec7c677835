"""The dialect capabilities, checked against the real databases they describe."""

from __future__ import annotations

from sqlalchemy import Column, Integer, MetaData, String, Table, insert, select

from bridge.db.dialect import capabilities
from bridge.db.engine import make_engine


def test_capabilities_match_the_database(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        caps = capabilities(engine)
        assert caps is capabilities(engine)  # one object per dialect
        assert caps.row_locks == (engine.dialect.name != "sqlite")
        assert caps.set_based_status == (engine.dialect.name != "postgresql")
        table = Table(
            "kb_test_caps",
            MetaData(),
            Column("id", Integer, primary_key=True),
            Column("v", String(8)),
        )
        table.create(engine, checkfirst=True)
        try:
            locked = str(caps.locked(select(table)).compile(engine))
            assert ("FOR UPDATE" in locked) == caps.row_locks
            with engine.begin() as conn:
                conn.execute(caps.locked(select(table)))  # the database accepts it
                if caps.returning:
                    returned = conn.execute(insert(table).values(v="x").returning(table.c.id))
                    assert returned.scalar_one() >= 1
        finally:
            table.drop(engine)
    finally:
        engine.dispose()
