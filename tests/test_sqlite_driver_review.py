"""An adversarial review of sqlite+sessionforge's inline statements and its own busy wait.

The first tests each showed a bug the review found (strict xfails until fixed: the busy
re-run that defeated SQLite's deadlock avoidance, ``busy_timeout`` pragmas reaching
SQLite, ``run()`` without a busy wait, a bulk ``executemany`` inline, a SQL function
waiting on the loop); the others pin guarantees that were checked and hold, beyond
tests/test_sqlite_driver.py.
Real SQLite files throughout; the other connection, when one is needed, is a plain
pysqlite one (``sqlite3``) or a second connection of the same engine.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, exc, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from sessionforge import SessionFactory

# The driver tests' helpers, and their check that no connection thread outlives a test.
from .test_sqlite_driver import (
    driver_thread,
    held_write_lock,
    no_thread_left,  # noqa: F401 (an autouse fixture: imported, it applies here)
    our_threads,
    runs_until_inline,
)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "review.db"


@pytest.fixture
async def engine(path: Path) -> AsyncIterator[AsyncEngine]:
    """Plain SQLAlchemy on the driver (no sessionforge presets), with a table ``t``."""
    engine = create_async_engine(f"sqlite+sessionforge:///{path}")
    _install_whereami(engine)
    async with engine.begin() as connection:
        await connection.exec_driver_sql("CREATE TABLE t (x INTEGER, who INTEGER)")
    yield engine
    await engine.dispose()


def _install_whereami(engine: AsyncEngine) -> None:
    """``whereami()``: the id of the thread running the statement.

    Registered on the raw ``sqlite3`` connection, past the driver: a function registered
    through the DBAPI connection keeps its statements on the connection's thread (it
    might wait on the event loop), and these tests need statements that go inline.
    """

    @event.listens_for(engine.sync_engine, "connect")
    def add_function(dbapi_connection: Any, _record: Any) -> None:
        sqlite = dbapi_connection.driver_connection.connection
        try:
            sqlite.create_function("whereami", 0, threading.get_ident)
        except sqlite3.ProgrammingError:  # check_same_thread=True: through the driver
            dbapi_connection.create_function("whereami", 0, threading.get_ident)


async def sqlite_own_busy_timeout(connection: AsyncConnection) -> int:
    """SQLite's own busy timeout (ms), read on the connection's thread past the driver."""
    thread = await driver_thread(connection)
    sqlite = thread.connection
    assert sqlite is not None
    # submit(), not run(): run() calls are made with SQLite's busy timeout in force.
    row = await thread.submit(lambda: sqlite.execute("PRAGMA busy_timeout").fetchone())
    return int(row[0])


# --- bugs: re-running SQLITE_BUSY where SQLite itself gives up at once --------------


async def test_reader_turned_writer_fails_at_once_and_the_waiting_commit_succeeds(
    path: Path,
) -> None:
    """Rollback journal: A has read (SHARED), B waits to COMMIT (PENDING), A writes.

    SQLite does not call the busy handler for A (neither could proceed): A gets
    "database is locked" at once, rolls back, and B commits. The driver re-runs A's
    INSERT until A's busy timeout while holding A's read lock, so B's COMMIT times out
    too: both transactions fail after the full timeout (aiosqlite: A fails in 1 ms, B
    commits).
    """
    db: SessionFactory[Any] = SessionFactory(
        f"sqlite:///{path}",
        sqlite_begin="deferred",
        sqlite_journal_mode="DELETE",
        sqlite_busy_timeout=1.0,
    )
    try:
        async with db.engine.begin() as connection:
            await connection.exec_driver_sql("CREATE TABLE t (x INTEGER)")
        async with db.engine.connect() as a, db.engine.connect() as b:
            await a.begin()
            await a.exec_driver_sql("SELECT count(*) FROM t")  # A holds SHARED
            await b.begin()
            await b.exec_driver_sql("INSERT INTO t VALUES (1)")  # B holds RESERVED
            committing = asyncio.create_task(b.commit())  # B waits for A's SHARED
            await asyncio.sleep(0.05)
            started = time.monotonic()
            with pytest.raises(exc.OperationalError, match="database is locked"):
                await a.exec_driver_sql("INSERT INTO t VALUES (2)")
            waited = time.monotonic() - started
            await a.rollback()
            (outcome,) = await asyncio.gather(committing, return_exceptions=True)
        assert outcome is None, f"B's COMMIT should go through once A gives up: {outcome!r}"
        assert waited < 0.3, f"A waited {waited:.2f} s for a lock it could never get"
    finally:
        await db.dispose()


async def test_wal_reader_turned_writer_does_not_wait_for_a_failure(path: Path) -> None:
    """WAL (sessionforge's preset) with ``sqlite_begin="deferred"``: A has a read
    snapshot, B holds the write lock for 0.5 s, then commits. A's INSERT cannot succeed
    either way (its snapshot is stale once B commits). SQLite says so at once; the
    driver re-runs it until B commits and then raises — the caller's retry starts late.
    """
    db: SessionFactory[Any] = SessionFactory(
        f"sqlite:///{path}", sqlite_begin="deferred", sqlite_busy_timeout=2.0
    )
    try:
        async with db.engine.begin() as connection:
            await connection.exec_driver_sql("CREATE TABLE t (x INTEGER)")
        async with db.engine.connect() as a, db.engine.connect() as b:
            await a.begin()
            await a.exec_driver_sql("SELECT count(*) FROM t")
            await b.begin()
            await b.exec_driver_sql("INSERT INTO t VALUES (1)")

            async def commit_later() -> None:
                await asyncio.sleep(0.5)
                await b.commit()

            committing = asyncio.create_task(commit_later())
            started = time.monotonic()
            with pytest.raises(exc.OperationalError, match="database is locked"):
                await a.exec_driver_sql("INSERT INTO t VALUES (2)")
            waited = time.monotonic() - started
            await a.rollback()
            await committing
        assert waited < 0.2, f"A waited {waited:.2f} s before failing"
    finally:
        await db.dispose()


# --- bugs: PRAGMA busy_timeout that reaches SQLite ----------------------------------


@pytest.mark.parametrize(
    "pragma",
    [
        "PRAGMA busy_timeout = '1500'",
        "PRAGMA busy_timeout = +1500",
        "PRAGMA busy_timeout = 1500 -- ms",
        "PRAGMA busy_timeout = 1500.0",
    ],
)
async def test_every_pragma_busy_timeout_is_the_drivers(engine: AsyncEngine, pragma: str) -> None:
    async with engine.connect() as connection:
        assert await connection.scalar(text(pragma)) == 1500
        assert await connection.scalar(text("PRAGMA busy_timeout")) == 1500
        assert await sqlite_own_busy_timeout(connection) == 0


async def test_a_quoted_pragma_busy_timeout_does_not_block_the_loop(
    engine: AsyncEngine, path: Path
) -> None:
    async with engine.connect() as connection:
        await connection.exec_driver_sql("PRAGMA busy_timeout = '600'")
        insert = "INSERT INTO t (x, who) VALUES (1, whereami()) RETURNING who"
        runs = len(await runs_until_inline(connection, insert))  # timed there, then inline
        await connection.commit()
        longest_gap = 0.0

        async def ticker() -> None:
            nonlocal longest_gap
            last = time.monotonic()
            while True:
                await asyncio.sleep(0.005)
                now = time.monotonic()
                longest_gap, last = max(longest_gap, now - last), now

        ticking = asyncio.create_task(ticker())
        await asyncio.sleep(0.02)
        with held_write_lock(path) as holder:
            asyncio.get_running_loop().call_later(0.2, holder.rollback)  # let go at 0.2 s
            await connection.exec_driver_sql(insert)  # waits for it, the loop running on
        await asyncio.sleep(0.02)
        ticking.cancel()
        await connection.commit()
        assert await connection.scalar(text("SELECT count(*) FROM t")) == runs + 1
    assert longest_gap < 0.1, f"the event loop stood still for {longest_gap:.2f} s"


async def test_raw_run_waits_for_a_lock_like_sqlite(engine: AsyncEngine, path: Path) -> None:
    """The documented raw-connection API (``driver_connection.run``) lost SQLite's wait."""
    async with engine.connect() as connection:
        thread = await driver_thread(connection)
        with held_write_lock(path) as holder:
            asyncio.get_running_loop().call_later(0.2, holder.rollback)
            await thread.run(lambda c: c.execute("INSERT INTO t (x) VALUES (1)"))
        assert await connection.scalar(text("SELECT count(*) FROM t")) == 1


# --- bugs: what runs inline ---------------------------------------------------------


async def test_a_bulk_executemany_runs_on_the_thread(engine: AsyncEngine) -> None:
    """One row at a time (quick, timed, inline), then 20 000 in one executemany — the
    ORM's ``session.execute(insert(Model), rows)`` sends the same SQL as ``add()``."""
    loop_thread = threading.get_ident()
    insert = "INSERT INTO t (x, who) VALUES (:x, whereami())"
    async with engine.begin() as connection:
        last_who = "SELECT who FROM t ORDER BY rowid DESC LIMIT 1"
        for _ in range(50):  # one row at a time until one ran inline
            await connection.execute(text(insert), {"x": -1})
            if await connection.scalar(text(last_who)) == loop_thread:
                break
        else:
            pytest.skip("no statement ran inline: this machine is too busy for INLINE_BUDGET")
        started = time.perf_counter()
        await connection.execute(text(insert), [{"x": i} for i in range(20_000)])
        elapsed = time.perf_counter() - started
        on_loop = await connection.scalar(
            text("SELECT count(*) FROM t WHERE x >= 0 AND who = :who"), {"who": loop_thread}
        )
    assert on_loop == 0, f"{on_loop} rows inserted on the loop's thread ({elapsed * 1000:.0f} ms)"


async def test_a_sql_function_may_wait_on_the_event_loop(engine: AsyncEngine) -> None:
    """A function registered through the DBAPI connection keeps its statements on the
    connection's thread: one that waits on the event loop works however often it runs
    (inline, it would wait on the loop it blocks)."""
    loop = asyncio.get_running_loop()

    async def answer() -> int:
        return 42

    def from_the_loop() -> int:
        return asyncio.run_coroutine_threadsafe(answer(), loop).result(timeout=5)

    @event.listens_for(engine.sync_engine, "connect")
    def add_function(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.create_function("from_the_loop", 0, from_the_loop)

    await engine.dispose()  # new connections, with the function
    async with engine.connect() as connection:
        for _ in range(20):
            assert await connection.scalar(text("SELECT from_the_loop()")) == 42


# --- guarantees checked and found holding -------------------------------------------


async def test_check_same_thread_true_keeps_every_call_on_the_connections_thread(
    path: Path,
) -> None:
    """``check_same_thread=True`` turns inline off; statements, executemany, streams,
    COMMIT and the pool's reset all work from the connection's thread."""
    engine = create_async_engine(
        f"sqlite+sessionforge:///{path}?check_same_thread=true",
    )
    _install_whereami(engine)
    try:
        async with engine.begin() as connection:
            await connection.exec_driver_sql("CREATE TABLE t (x INTEGER, who INTEGER)")
            thread = await driver_thread(connection)
            assert not thread.inline
            insert = "INSERT INTO t (x, who) VALUES (?, whereami())"
            for i in range(3):
                await connection.exec_driver_sql(insert, (i,))
            await connection.exec_driver_sql(insert, [(3,), (4,)])
            home = await thread.run(lambda c: threading.get_ident())
        async with engine.connect() as connection:
            result = await connection.stream(text("SELECT x, who FROM t ORDER BY x"))
            rows = [tuple(row) async for row in result]
        assert rows == [(i, home) for i in range(5)]
    finally:
        await engine.dispose()


async def test_connect_arg_timeout_is_the_drivers_wait(path: Path) -> None:
    engine = create_async_engine(f"sqlite+sessionforge:///{path}", connect_args={"timeout": 0.3})
    try:
        async with engine.begin() as connection:
            await connection.exec_driver_sql("CREATE TABLE t (x INTEGER)")
        async with engine.connect() as connection:
            assert await connection.scalar(text("PRAGMA busy_timeout")) == 300
            assert await sqlite_own_busy_timeout(connection) == 0
            await connection.rollback()
            with held_write_lock(path):
                started = time.monotonic()
                with pytest.raises(exc.OperationalError, match="database is locked"):
                    await connection.exec_driver_sql("INSERT INTO t VALUES (1)")
                waited = time.monotonic() - started
        assert 0.3 <= waited < 1.5
    finally:
        await engine.dispose()


async def test_commit_waiting_for_a_reader_is_rerun_and_commits_once(path: Path) -> None:
    """Rollback journal: a COMMIT gets SQLITE_BUSY while another connection reads; the
    driver re-runs it (the transaction stays open) and the rows are written once."""
    engine = create_async_engine(f"sqlite+sessionforge:///{path}")
    reader = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        async with engine.begin() as connection:
            await connection.exec_driver_sql("CREATE TABLE t (x INTEGER)")
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM t").fetchall()  # holds SHARED
        asyncio.get_running_loop().call_later(0.2, reader.rollback)
        started = time.monotonic()
        async with engine.begin() as connection:
            await connection.exec_driver_sql("INSERT INTO t VALUES (1)")
            await connection.exec_driver_sql("INSERT INTO t VALUES (2)")
        assert time.monotonic() - started >= 0.15  # the COMMIT did wait for the reader
        assert reader.execute("SELECT x FROM t ORDER BY x").fetchall() == [(1,), (2,)]
    finally:
        reader.close()
        await engine.dispose()


async def test_executemany_in_a_transaction_rerun_after_busy_writes_each_row_once(
    path: Path,
) -> None:
    """A deferred transaction that has not read: its executemany is inline-eligible and
    re-run after SQLITE_BUSY; the first row failed, so nothing was written twice."""
    db: SessionFactory[Any] = SessionFactory(
        f"sqlite:///{path}", sqlite_begin="deferred", sqlite_busy_timeout=3.0
    )
    try:
        async with db.engine.begin() as connection:
            await connection.exec_driver_sql("CREATE TABLE t (x INTEGER)")
        with held_write_lock(path) as holder:
            asyncio.get_running_loop().call_later(0.2, holder.rollback)
            async with db.engine.begin() as connection:
                await connection.exec_driver_sql("SELECT 1")  # the BEGIN is sent
                await connection.exec_driver_sql(
                    "INSERT INTO t VALUES (?)", [(i,) for i in range(5)]
                )
        async with db.engine.connect() as connection:
            rows = (await connection.exec_driver_sql("SELECT x FROM t ORDER BY x")).all()
        assert [row[0] for row in rows] == [0, 1, 2, 3, 4]
    finally:
        await db.dispose()


async def test_cancelled_in_the_busy_wait_leaves_pool_and_connection_sound(path: Path) -> None:
    db: SessionFactory[Any] = SessionFactory(f"sqlite:///{path}", pool_size=1, max_overflow=0)
    try:
        async with db.engine.begin() as connection:
            await connection.exec_driver_sql("CREATE TABLE t (x INTEGER)")
        for _ in range(2):  # the second time, BEGIN IMMEDIATE + INSERT run inline
            async with db.begin() as session:
                await session.execute(text("INSERT INTO t VALUES (0)"))
        threads = len(our_threads())
        with held_write_lock(path):

            async def blocked() -> None:
                async with db.begin() as session:
                    await session.execute(text("INSERT INTO t VALUES (1)"))

            task = asyncio.create_task(blocked())
            await asyncio.sleep(0.1)
            assert not task.done()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert db.status().checked_out == 0
        async with db.begin() as session:  # the one pooled connection, still usable
            await session.execute(text("INSERT INTO t VALUES (2)"))
        async with db() as session:
            assert (await session.scalars(text("SELECT x FROM t ORDER BY x"))).all() == [0, 0, 2]
        assert len(our_threads()) == threads
    finally:
        await db.dispose()


async def test_inline_statements_after_an_abandoned_stream_run_in_order(
    engine: AsyncEngine,
) -> None:
    """A stream left early posts its cursor's close; the next statements (inline once
    timed) wait for it, and the transaction commits what they wrote."""
    insert = "INSERT INTO t (x, who) VALUES (?, whereami())"
    async with engine.begin() as connection:
        for i in range(200):
            await connection.exec_driver_sql(insert, (i,))
    async with engine.begin() as connection:
        for _ in range(3):
            result = await connection.stream(text("SELECT x FROM t ORDER BY x"))
            async for row in result:
                assert row[0] == 0
                break
            await result.close()
            await connection.exec_driver_sql(insert, (1000,))
            await connection.exec_driver_sql(insert, (1001,))
        whos = (
            await connection.exec_driver_sql("SELECT who FROM t WHERE x >= 1000 ORDER BY rowid")
        ).all()
    assert len(whos) == 6
    async with engine.connect() as connection:
        assert await connection.scalar(text("SELECT count(*) FROM t")) == 206
