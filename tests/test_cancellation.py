"""Cancellation never leaks: the pool comes back whole, nothing idles in a transaction."""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, text
from sqlalchemy import exc as sa_exc

from sessionforge import SessionFactory

from .conftest import NO_FAILING_COMMIT, FactoryMaker, count_rows
from .models import Models


def sleep_sql(db: SessionFactory[Any], seconds: float) -> str:
    if db.url.get_backend_name() == "postgresql":
        return f"SELECT pg_sleep({seconds})"
    if db.url.get_backend_name() == "mysql":
        return f"SELECT SLEEP({seconds})"
    # A recursive CTE keeps SQLite busy in aiosqlite's thread for ~0.7 s; it cannot be
    # interrupted from the event loop, so cleanup waits for it (see the README).
    return (
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 5000000) "
        "SELECT count(*) FROM n"
    )


async def server_states(db: SessionFactory[Any], application_name: str) -> list[str]:
    """States of this application's server sessions, seen from a fresh session."""
    async with db() as session:
        rows = await session.execute(
            text(
                "SELECT state FROM pg_stat_activity "
                "WHERE application_name = :name AND pid <> pg_backend_pid()"
            ),
            {"name": application_name},
        )
        return list(rows.scalars())


async def assert_whole(db: SessionFactory[Any], application_name: str | None = None) -> None:
    assert db.status().checked_out == 0
    if application_name is not None:
        assert "idle in transaction" not in await server_states(db, application_name)
    async with db.begin() as session:  # and a fresh transaction works
        assert (await session.execute(text("SELECT 42"))).scalar() == 42
    gc.collect()  # a leaked connection would warn here ("non-checked-in connection")


def pool_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What SQLAlchemy's pool logged as errors ("Exception during reset or similar")."""
    return [
        record.getMessage()
        for record in caplog.records
        if record.name.startswith("sqlalchemy.pool") and record.levelno >= logging.ERROR
    ]


async def test_cancellation_storm_leaves_the_pool_whole(
    make_factory: FactoryMaker, db_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """1,000 tasks over a pool of 5, half cancelled at random points."""
    application_name = f"{prefix}-storm"
    postgres = db_url.startswith("postgres")
    in_memory = db_url.startswith("sqlite") and db_url.endswith("://")  # either driver
    pool: dict[str, Any] = {} if in_memory else {"pool_size": 5, "max_overflow": 0}
    if postgres:  # to find its backends in pg_stat_activity
        pool["application_name"] = application_name
    db = make_factory(pool_timeout=60, **pool)
    rng = random.Random(1234)

    async def in_begin() -> None:
        async with db.begin() as session:
            await session.execute(text("SELECT 1"))
            await asyncio.sleep(rng.random() * 0.005)
            await session.execute(text("SELECT 2"))

    async def in_session() -> None:
        async with db() as session:
            await session.execute(text("SELECT 1"))
            await session.commit()

    async def in_run_transaction() -> None:
        async def work(session: Any) -> None:
            await session.execute(text("SELECT 1"))
            await asyncio.sleep(rng.random() * 0.005)

        await db.run_transaction(work)

    async def in_atomic() -> None:
        async with db.atomic() as session:
            await session.execute(text("SELECT 1"))
            async with db.atomic():
                await session.execute(text("SELECT 2"))

    kinds = [in_begin, in_session, in_run_transaction, in_atomic]
    tasks = [asyncio.create_task(kinds[i % 4]()) for i in range(1000)]
    loop = asyncio.get_running_loop()
    for task in tasks:
        if rng.random() < 0.5:
            loop.call_later(rng.random() * 0.05, task.cancel)
    with caplog.at_level(logging.ERROR, logger="sqlalchemy.pool"):
        results = await asyncio.gather(*tasks, return_exceptions=True)
    assert pool_errors(caplog) == []  # no connection was returned half-reset

    outcomes = {type(result).__name__ for result in results if result is not None}
    assert outcomes <= {"CancelledError"}, outcomes  # nothing but cancellations
    assert any(isinstance(result, asyncio.CancelledError) for result in results)
    assert any(result is None for result in results)
    await assert_whole(db, application_name if postgres else None)


@pytest.mark.parametrize("where", ["begin", "session", "atomic", "run_transaction"])
async def test_cancelled_mid_query_propagates_and_leaks_nothing(
    where: str, make_factory: FactoryMaker, db_url: str, prefix: str
) -> None:
    application_name = f"{prefix}-midquery"
    postgres = db_url.startswith("postgres")
    db = make_factory(**({"application_name": application_name} if postgres else {}))
    started = asyncio.Event()
    statement = text(sleep_sql(db, 5))

    async def run() -> None:
        if where == "begin":
            async with db.begin() as session:
                started.set()
                await session.execute(statement)
        elif where == "session":
            async with db() as session:
                started.set()
                await session.execute(statement)
        elif where == "atomic":
            async with db.atomic() as session:
                started.set()
                await session.execute(statement)
        else:

            async def work(session: Any) -> None:
                started.set()
                await session.execute(statement)

            await db.run_transaction(work)

    task = asyncio.create_task(run())
    await started.wait()
    await asyncio.sleep(0.1)  # well inside the statement
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()
    if postgres:
        # The interrupted connection was not returned dirty: nothing of ours is still
        # running pg_sleep or idling in a transaction.
        for _ in range(50):
            states = await server_states(db, application_name)
            if "active" not in states:
                break
            await asyncio.sleep(0.1)
        assert "active" not in states
    await assert_whole(db, application_name if postgres else None)


async def test_asyncio_timeout_and_taskgroup_work_normally(make_factory: FactoryMaker) -> None:
    db = make_factory()
    statement = text(sleep_sql(db, 5))
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.1), db.begin() as session:
            await session.execute(statement)

    async def fails() -> None:
        await asyncio.sleep(0.05)
        raise LookupError("sibling failed")

    async def victim() -> None:
        async with db.begin() as session:
            await session.execute(statement)

    with pytest.raises(ExceptionGroup) as raised:
        async with asyncio.TaskGroup() as group:
            group.create_task(victim())
            group.create_task(fails())
    assert raised.group_contains(LookupError)
    await assert_whole(db)


@pytest.mark.parametrize("at", ["commit", "reset"])
async def test_cancelled_while_the_block_ends_commits_and_closes_first(
    at: str,
    db: SessionFactory[Any],
    models: Models,
    outside: Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A cancellation arriving as the COMMIT goes out, or as the connection goes back to
    the pool, waits for both; then it reaches the caller (as async_sessionmaker's does)."""
    caller: asyncio.Task[None] | None = None

    def cancel_caller(*_args: Any) -> None:
        if caller is not None:
            caller.cancel()

    pool = db.engine.sync_engine.pool
    target = db.engine.sync_engine if at == "commit" else pool
    event.listen(target, at, cancel_caller)
    invalidated: list[object] = []
    event.listen(pool, "invalidate", lambda *args: invalidated.append(args))

    async def write() -> None:
        async with db.begin() as session:
            session.add(models.Item(name="kept"))

    with caplog.at_level(logging.ERROR, logger="sqlalchemy.pool"):
        caller = asyncio.create_task(write())
        with pytest.raises(asyncio.CancelledError):
            await caller
        event.remove(target, at, cancel_caller)
        assert db.status().checked_out == 0
        assert count_rows(outside, models.Item.__tablename__) == 1
        gc.collect()  # a session left holding its connection would be reported here
    assert pool_errors(caplog) == []
    assert invalidated == []  # the connection went back to the pool sound
    await assert_whole(db)


@pytest.mark.skip_backend("mysql", reason=NO_FAILING_COMMIT)
@pytest.mark.parametrize("where", ["begin", "run_transaction"])
async def test_a_cancellation_during_a_failing_commit_still_reaches_the_caller(
    where: str, db: SessionFactory[Any], models: Models, outside: Engine
) -> None:
    """The COMMIT fails (deferred foreign key) after the caller was cancelled: the caller
    sees its cancellation, chained to the COMMIT's error, and nothing is retried."""
    caller: asyncio.Task[None] | None = None
    attempts = 0

    def cancel_caller(*_args: Any) -> None:
        if caller is not None and not caller.cancelling():
            caller.cancel()

    event.listen(db.engine.sync_engine, "commit", cancel_caller)

    async def orphan(session: Any) -> None:
        nonlocal attempts
        attempts += 1
        session.add(models.Child(id=1, parent_id=42))  # no such parent: COMMIT fails

    async def run() -> None:
        if where == "begin":
            async with db.begin() as session:
                await orphan(session)
        else:
            await db.run_transaction(orphan, retry_if=lambda _exc: True)

    caller = asyncio.create_task(run())
    with pytest.raises(asyncio.CancelledError) as raised:
        await caller
    event.remove(db.engine.sync_engine, "commit", cancel_caller)
    assert caller.cancelled()
    assert isinstance(raised.value.__cause__, sa_exc.IntegrityError)
    assert attempts == 1
    assert count_rows(outside, models.child) == 0
    await assert_whole(db)


async def test_a_writer_cancelled_while_its_begin_waits_leaves_no_lock_behind(
    tmp_path: Path,
) -> None:
    """SQLite: cancelled twice while BEGIN IMMEDIATE waits for the write lock, the
    writer's connection goes back to the pool before the BEGIN has returned; it must
    not keep the transaction that BEGIN opens later (and with it the file's lock)."""
    path = tmp_path / "lock.db"
    db = SessionFactory(f"sqlite:///{path}", pool_size=2, max_overflow=0, sqlite_busy_timeout=2.0)
    try:
        await _cancel_a_waiting_writer(db, path)
    finally:
        await db.dispose()


async def _cancel_a_waiting_writer(db: SessionFactory[Any], path: Path) -> None:
    async with db.begin() as session:
        await session.execute(text("CREATE TABLE lock_probe (x INTEGER)"))

    async def holder() -> None:
        async with db.begin() as session:
            await session.execute(text("INSERT INTO lock_probe VALUES (1)"))
            await asyncio.sleep(0.6)

    async def writer() -> None:
        async with db.begin() as session:
            await session.execute(text("INSERT INTO lock_probe VALUES (2)"))

    holding = asyncio.create_task(holder())
    await asyncio.sleep(0.05)
    writing = asyncio.create_task(writer())
    await asyncio.sleep(0.15)  # its BEGIN IMMEDIATE waits in aiosqlite's thread
    writing.cancel()
    await asyncio.sleep(0.05)
    writing.cancel()
    await asyncio.gather(holding, writing, return_exceptions=True)
    await asyncio.sleep(0.3)  # well past the holder's COMMIT: a late BEGIN has returned

    outside = sqlite3.connect(path, timeout=0.5, isolation_level=None)
    try:
        outside.execute("INSERT INTO lock_probe VALUES (9)")  # "database is locked" if kept
    finally:
        outside.close()
    for value in (3, 4):  # both pooled connections start transactions again
        async with db.begin() as session:
            await session.execute(text("INSERT INTO lock_probe VALUES (:x)"), {"x": value})
    await assert_whole(db)
