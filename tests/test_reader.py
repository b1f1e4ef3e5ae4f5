"""db.reader(): reads on an AUTOCOMMIT connection, writes refused, the pool left as it was."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import delete, event, func, insert, select, text, update
from sqlalchemy.engine import Engine

from sessionforge import ReadOnlySessionError, SessionFactory

from .conftest import DbMaker, FactoryMaker, count_rows
from .models import Models

TWINS = [pytest.param("async", id="async"), pytest.param("sync", id="sync")]


async def add_item(db: SessionFactory[Any], models: Models, name: str) -> None:
    async with db.begin() as session:
        session.add(models.Item(name=name))


@pytest.mark.parametrize("twin", TWINS)
async def test_reader_reads_without_begin_or_commit(
    twin: str, db: SessionFactory[Any], models: Models
) -> None:
    await add_item(db, models, "ada")
    statements: list[str] = []
    engine = db.engine.sync_engine if twin == "async" else db.sync.engine
    listen = ("before_cursor_execute", "begin", "commit", "rollback")

    def record(name: str) -> Any:
        return lambda *args, **kw: statements.append(name)

    recorders = {name: record(name) for name in listen}
    for name, fn in recorders.items():
        event.listen(engine, name, fn)
    try:
        query = select(models.Item.name)
        if twin == "async":
            async with db.reader() as session:
                names = (await session.scalars(query)).all()
        else:
            with db.sync.reader() as sync_session:
                names = sync_session.scalars(query).all()
    finally:
        for name, fn in recorders.items():
            event.remove(engine, name, fn)
    assert names == ["ada"]
    # SQLAlchemy's "begin" event fires for its bookkeeping, but no BEGIN statement is
    # sent (the SQLite preset's BEGIN would be a cursor execute) and nothing commits.
    assert statements.count("before_cursor_execute") == 1
    assert "commit" not in statements
    assert db.status().checked_out == 0


async def test_reader_leaves_no_transaction_open_on_the_server(
    pg_url: str, make_factory: FactoryMaker, prefix: str
) -> None:
    db = make_factory(pg_url, application_name=f"{prefix}-reader")
    states = text(
        "SELECT state FROM pg_stat_activity WHERE application_name = :name AND pid <> "
        "pg_backend_pid()"
    )
    async with db.reader() as session:
        await session.execute(text("SELECT 1"))
        async with make_factory(pg_url).reader() as observer:
            seen = (await observer.scalars(states, {"name": f"{prefix}-reader"})).all()
    assert seen == ["idle"]  # a begin() session would be "idle in transaction" here


@pytest.mark.parametrize("twin", TWINS)
async def test_reader_refuses_writes_and_writes_nothing(
    twin: str, db: SessionFactory[Any], models: Models, outside: Engine
) -> None:
    await add_item(db, models, "ada")
    attempts = [
        ("flush", "it was asked to flush changes"),
        ("insert", "it was asked to run an INSERT"),
        ("update", "it was asked to run an UPDATE"),
        ("delete", "it was asked to run a DELETE"),  # through scalars(), not execute()
    ]
    for kind, message in attempts:
        with pytest.raises(ReadOnlySessionError, match=message) as info:
            if twin == "async":
                async with db.reader() as session:
                    if kind == "flush":
                        session.add(models.Item(name="bob"))
                        await session.flush()
                    elif kind == "insert":
                        await session.execute(insert(models.Item).values(name="bob"))
                    elif kind == "delete":
                        await session.scalars(delete(models.Item))
                    else:
                        await session.execute(update(models.Item).values(name="bob"))
            else:
                with db.sync.reader() as sync_session:
                    if kind == "flush":
                        sync_session.add(models.Item(name="bob"))
                        sync_session.flush()
                    elif kind == "insert":
                        sync_session.execute(insert(models.Item).values(name="bob"))
                    elif kind == "delete":
                        sync_session.scalars(delete(models.Item))
                    else:
                        sync_session.execute(update(models.Item).values(name="bob"))
        assert "write in db.begin()" in str(info.value)
    assert count_rows(outside, models.item) == 1
    assert db.status().checked_out == 0


@pytest.mark.parametrize("twin", TWINS)
async def test_pooled_connection_comes_back_transactional(
    twin: str, make_db: DbMaker, models: Models
) -> None:
    # One connection: the reader's, then a begin() whose rollback must really undo.
    db = await make_db(pool_size=1, max_overflow=0)
    for _ in range(2):
        if twin == "async":
            async with db.reader() as session:
                await session.execute(select(func.count()).select_from(models.Item))
            with pytest.raises(RuntimeError, match="undo"):
                async with db.begin() as session:
                    session.add(models.Item(name="undone"))
                    await session.flush()
                    raise RuntimeError("undo")
        else:
            with db.sync.reader() as sync_session:
                sync_session.execute(select(func.count()).select_from(models.Item))
            with pytest.raises(RuntimeError, match="undo"), db.sync.begin() as sync_session:
                sync_session.add(models.Item(name="undone"))
                sync_session.flush()
                raise RuntimeError("undo")
    async with db() as session:
        assert await session.scalar(select(func.count()).select_from(models.Item)) == 0


async def test_reader_does_not_hold_sqlite_writers_back(tmp_path: Any, models: Models) -> None:
    # A begin() block takes SQLite's write lock at BEGIN IMMEDIATE; a reader takes none.
    db = SessionFactory(f"sqlite:///{tmp_path / 'r.db'}", sqlite_busy_timeout=0.2)
    try:
        async with db.engine.begin() as connection:
            await connection.run_sync(models.metadata.create_all)
        async with db.reader() as reader:
            await reader.execute(select(models.Item))  # holds its connection
            await asyncio.wait_for(add_item(db, models, "written meanwhile"), 5)
            names = (await reader.scalars(select(models.Item.name))).all()
        assert names == ["written meanwhile"]  # each statement its own snapshot
    finally:
        await db.dispose()


def test_readers_are_the_factorys_own_sessions(db: SessionFactory[Any]) -> None:
    session = db.reader(info={"who": "report"})
    assert isinstance(session, db.class_)
    assert session.info == {"who": "report"}
    assert isinstance(db.sync.reader(), db.sync.class_)


async def test_factory_listeners_reach_readers_even_when_added_later(
    db: SessionFactory[Any], models: Models
) -> None:
    await add_item(db, models, "ada")
    async with db.reader() as session:  # the reader classes exist from here on
        await session.execute(select(models.Item))
    seen: list[str] = []
    listener = lambda state: seen.append("orm execute")  # noqa: E731
    event.listen(db, "do_orm_execute", listener)
    try:
        async with db.reader() as session:
            await session.execute(select(models.Item))
    finally:
        event.remove(db, "do_orm_execute", listener)
    assert seen == ["orm execute"]


async def test_reader_under_test_isolation_reads_inside_it_and_leaves_it_whole(
    db: SessionFactory[Any], models: Models, outside: Engine
) -> None:
    from sessionforge.testing import isolated

    async with isolated(db):
        await add_item(db, models, "ada")
        async with db.reader() as session:  # on the test's connection, inside its transaction
            assert (await session.scalars(select(models.Item.name))).all() == ["ada"]
        with pytest.raises(RuntimeError, match="undo"):
            async with db.begin() as session:
                session.add(models.Item(name="undone"))
                await session.flush()
                raise RuntimeError("undo")
        async with db.reader() as session:
            assert (await session.scalars(select(models.Item.name))).all() == ["ada"]
    assert count_rows(outside, models.item) == 0
    assert db.status().checked_out == 0
