"""sqlite+sessionforge, the driver of drivers/sqlite.py, on a SQLite file and in memory.

The default driver of sqlite:// URLs: the whole suite runs on it (and, with
SESSIONFORGE_TEST_SQLITE_DRIVER=aiosqlite, on aiosqlite);
these tests cover what is the driver's own: DBAPI results, errors, streaming, the
deferred BEGIN, cancellation, and its threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, exc, insert, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.util import greenlet_spawn

from sessionforge import FactoryConfig, SessionFactory
from sessionforge.dialects import is_retryable, known_drivers
from sessionforge.drivers.sqlite import ConnectionThread

from .conftest import FactoryMaker
from .models import Models

KINDS = [pytest.param("file", id="sqlite-file"), pytest.param("memory", id="sqlite-memory")]


@pytest.fixture(params=KINDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Overrides conftest's: this module is about the driver, always ours."""
    if request.param == "file":
        return f"sqlite+sessionforge:///{tmp_path / 'driver.db'}"
    return "sqlite+sessionforge://"


@pytest.fixture
def file_url(tmp_path: Path) -> str:
    return f"sqlite+sessionforge:///{tmp_path / 'driver.db'}"


@pytest.fixture
async def engine(file_url: str) -> AsyncIterator[AsyncEngine]:
    """Plain SQLAlchemy on the driver: no sessionforge presets."""
    engine = create_async_engine(file_url)
    yield engine
    await engine.dispose()


class Gate:
    """A SQL function, ``gate()``, that blocks the connection's thread until opened."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.opened = threading.Event()

    def __call__(self) -> int:
        self.entered.set()
        self.opened.wait(timeout=60)
        return 1

    def install(self, engine: AsyncEngine) -> None:
        @event.listens_for(engine.sync_engine, "connect")
        def add_function(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.create_function("gate", 0, self)

    async def wait_entered(self, task: asyncio.Task[None]) -> None:
        while not await asyncio.to_thread(self.entered.wait, 0.05):
            if task.done():
                await task  # raises what stopped it short of the gate
                raise AssertionError("the task ended without reaching the gate")


@contextlib.contextmanager
def held_write_lock(path: str | Path) -> Iterator[sqlite3.Connection]:
    """A plain pysqlite connection holding the write lock of ``path`` until rollback()."""
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        holder.execute("BEGIN IMMEDIATE")
        yield holder
    finally:
        holder.rollback()
        holder.close()


async def driver_thread(connection: Any) -> ConnectionThread:
    """The ``ConnectionThread`` of an ``AsyncConnection`` on the driver."""
    raw = await connection.get_raw_connection()
    thread = raw.driver_connection
    assert isinstance(thread, ConnectionThread)
    return thread


async def runs_until_inline(connection: Any, statement: str, *params: Any) -> list[int]:
    """Run ``statement`` (its one value: the thread running it) until it ran on the
    loop's thread; the threads it ran on. Skips on a machine so loaded that even a
    trivial statement stays over INLINE_BUDGET (then there is nothing to check)."""
    seen: list[int] = []
    for _ in range(50):
        seen.append(await connection.scalar(text(statement), *params))
        if seen[-1] == threading.get_ident():
            return seen
    pytest.skip("no statement ran inline: this machine is too busy for INLINE_BUDGET")


def our_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "sessionforge-sqlite"]


@pytest.fixture(autouse=True)
def no_thread_left() -> Iterator[None]:
    """Every test ends with no connection thread of ours running."""
    before = set(our_threads())
    yield
    gc.collect()
    for thread in set(our_threads()) - before:
        thread.join(timeout=60)
        assert not thread.is_alive(), "a connection thread outlived its engine"


# --- wiring -----------------------------------------------------------------------


def test_known_driver_with_pysqlite_twin() -> None:
    config = FactoryConfig.from_url("sqlite+sessionforge:///app.db")
    assert config.async_url.drivername == "sqlite+sessionforge"
    assert config.sync_url.drivername == "sqlite+pysqlite"
    assert any(d.dialect == "sqlite" and d.driver == "sessionforge" for d in known_drivers())


def test_the_driver_is_the_default_and_aiosqlite_stays_selectable() -> None:
    assert FactoryConfig.from_url("sqlite:///app.db").bound_url.drivername == "sqlite+sessionforge"
    given = FactoryConfig.from_url("sqlite+aiosqlite:///app.db")
    assert (given.bound_url.drivername, given.sync_url.drivername) == (
        "sqlite+aiosqlite",
        "sqlite+pysqlite",
    )


async def test_sync_twin_sees_the_async_writes(db: SessionFactory[Any], models: Models) -> None:
    async with db.begin() as session:
        session.add(models.Item(name="from async"))
    with db.sync.begin() as sync_session:
        assert sync_session.scalars(select(models.Item.name)).all() == ["from async"]


# --- DBAPI results ----------------------------------------------------------------


async def test_rowcount_and_lastrowid(db: SessionFactory[Any], models: Models) -> None:
    table = models.Item.__table__
    async with db.begin() as session:
        first = await session.execute(insert(table).values(name="a"))
        second = await session.execute(insert(table).values(name="b"))
        assert (first.lastrowid, second.lastrowid) == (1, 2)
        updated = await session.execute(table.update().values(name=table.c.name + "!"))
        assert updated.rowcount == 2
        deleted = await session.execute(table.delete().where(table.c.id == 1))
        assert deleted.rowcount == 1
        assert (await session.execute(select(table.c.name))).scalars().all() == ["b!"]


async def test_executemany(make_factory: FactoryMaker, models: Models) -> None:
    db = make_factory()
    async with db.engine.begin() as connection:
        await connection.run_sync(models.metadata.create_all)
        sql = f"INSERT INTO {models.item} (id, name) VALUES (?, ?)"
        await connection.exec_driver_sql(sql, [(1, "a"), (2, "b"), (3, "c")])
        update = f"UPDATE {models.item} SET name = name || '!' WHERE id = ?"
        result = await connection.exec_driver_sql(update, [(1,), (3,)])
        assert result.rowcount == 2
    async with db.begin() as session:
        names = await session.scalars(select(models.Item.name).order_by(models.Item.id))
        assert names.all() == ["a!", "b", "c!"]


async def test_stream_fetches_in_batches(make_factory: FactoryMaker, models: Models) -> None:
    db = make_factory()
    async with db.engine.begin() as connection:
        await connection.run_sync(models.metadata.create_all)
        await connection.execute(
            insert(models.Item.__table__), [{"name": f"n{i:03}"} for i in range(250)]
        )
    async with db.begin() as session:
        result = await session.stream_scalars(
            select(models.Item.name).order_by(models.Item.id).execution_options(yield_per=100)
        )
        sizes = [len(part) async for part in result.partitions()]
        # And the connection serves other statements with the cursor closed.
        assert await session.scalar(select(models.Item.name).where(models.Item.id == 1)) == "n000"
    assert sizes == [100, 100, 50]


async def test_raw_connection_runs_on_its_thread(make_factory: FactoryMaker) -> None:
    db = make_factory()
    async with db.engine.connect() as connection:
        raw = await connection.get_raw_connection()
        thread = raw.driver_connection
        assert isinstance(thread, ConnectionThread)
        name = await thread.run(lambda _c: threading.current_thread().name)
        rows = await thread.run(lambda c: c.execute("SELECT 6 * 7").fetchall())
    assert (name, rows) == ("sessionforge-sqlite", [(42,)])


async def test_raw_connection_runs_after_the_deferred_begin(make_factory: FactoryMaker) -> None:
    db = make_factory()
    async with db.engine.begin() as connection:  # our preset's BEGIN IMMEDIATE, kept
        raw = await connection.get_raw_connection()
        thread = raw.driver_connection
        assert isinstance(thread, ConnectionThread)
        assert await thread.run(lambda c: c.in_transaction)


# --- errors, transactions ---------------------------------------------------------


async def test_errors_are_sqlite3_errors_wrapped_by_sqlalchemy(
    db: SessionFactory[Any], models: Models
) -> None:
    async with db.begin() as session:
        session.add(models.Item(name="taken"))
    with pytest.raises(exc.IntegrityError) as caught:
        async with db.begin() as session:
            session.add(models.Item(name="taken"))
    assert isinstance(caught.value.orig, sqlite3.IntegrityError)
    with pytest.raises(exc.OperationalError, match="syntax error") as syntax:
        async with db.begin() as session:
            await session.execute(text("SELEKT 1"))
    assert isinstance(syntax.value.orig, sqlite3.OperationalError)
    with pytest.raises(exc.IntegrityError):  # executemany reports it too
        async with db.engine.begin() as connection:
            sql = f"INSERT INTO {models.item} (name) VALUES (?)"
            await connection.exec_driver_sql(sql, [("new",), ("taken",)])
    async with db.begin() as session:  # the connection is fine, nothing half-written
        assert (await session.scalars(select(models.Item.name))).all() == ["taken"]


async def test_readonly_refuses_writes_then_the_connection_writes_again(
    db: SessionFactory[Any], models: Models
) -> None:
    with pytest.raises(exc.OperationalError, match="readonly"):
        async with db.begin(readonly=True) as session:
            session.add(models.Item(name="refused"))
    async with db.begin() as session:
        session.add(models.Item(name="written"))
    async with db.begin(readonly=True) as session:
        assert (await session.scalars(select(models.Item.name))).all() == ["written"]


async def test_savepoints(db: SessionFactory[Any], models: Models) -> None:
    async with db.begin() as session:
        session.add(models.Item(name="outer"))
        savepoint = await session.begin_nested()
        session.add(models.Item(name="inner"))
        await session.flush()
        await savepoint.rollback()
        async with session.begin_nested():
            session.add(models.Item(name="kept"))
    async with db.begin() as session:
        names = await session.scalars(select(models.Item.name).order_by(models.Item.id))
        assert names.all() == ["outer", "kept"]


async def test_autocommit_connection_writes_at_once(
    db: SessionFactory[Any], models: Models
) -> None:
    async with db.engine.connect() as connection:
        autocommit = await connection.execution_options(isolation_level="AUTOCOMMIT")
        await autocommit.execute(insert(models.Item.__table__).values(name="at once"))
        with db.sync() as other:  # another connection sees it at once
            assert other.scalars(select(models.Item.name)).all() == ["at once"]
    async with db.begin() as session:  # and the pooled connection has transactions again
        session.add(models.Item(name="in a transaction"))
        assert session.in_transaction()


async def test_deferred_begin_reports_a_lock_from_the_first_statement(
    file_url: str, models: Models
) -> None:
    """The BEGIN travels with the first statement; its failure is that statement's."""
    db: SessionFactory[Any] = SessionFactory(file_url, sqlite_busy_timeout=0.01)
    try:
        async with db.engine.begin() as connection:
            await connection.run_sync(models.metadata.create_all)
        with held_write_lock(db.config.sync_url.database or "") as locked:
            with pytest.raises(exc.OperationalError, match="database is locked") as caught:
                async with db.begin() as session:
                    session.add(models.Item(name="blocked"))
            assert is_retryable(caught.value)
            locked.rollback()
        async with db.begin() as session:  # nothing stuck: the next one writes
            session.add(models.Item(name="written"))
        async with db.begin() as session:
            assert (await session.scalars(select(models.Item.name))).all() == ["written"]
    finally:
        await db.dispose()


async def test_empty_transaction_sends_nothing(engine: AsyncEngine) -> None:
    """A BEGIN followed by COMMIT or ROLLBACK, nothing between: neither is sent."""

    @event.listens_for(engine.sync_engine, "begin")
    def begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    async with engine.connect() as connection:
        raw = await connection.get_raw_connection()
        thread = raw.driver_connection
        assert isinstance(thread, ConnectionThread)
        await connection.begin()
        assert raw.dbapi_connection is not None
        assert raw.dbapi_connection.in_transaction  # as far as anyone can tell
        await connection.commit()
        assert not await thread.run(lambda c: c.in_transaction)


# --- inline statements and the driver's busy wait ----------------------------------


async def test_quick_statements_run_inline_once_timed_and_slow_ones_on_the_thread(
    engine: AsyncEngine,
) -> None:
    """The first run of a statement is on the connection's thread, timed there; a quick
    one then runs on the event loop's thread (no hop), a slow one stays on the thread.
    (The functions are registered on the raw sqlite3 connection: the driver does not
    know them, so only their time decides; see below for registered ones.)"""

    def slow_whereami() -> int:
        time.sleep(0.003)
        return threading.get_ident()

    def register(c: sqlite3.Connection) -> int:
        c.create_function("whereami", 0, threading.get_ident)
        c.create_function("slow_whereami", 0, slow_whereami)
        return threading.get_ident()

    loop_thread = threading.get_ident()
    async with engine.connect() as connection:
        its_thread = await (await driver_thread(connection)).run(register)
        quick = await runs_until_inline(connection, "SELECT whereami()")
        slow = [await connection.scalar(text("SELECT slow_whereami()")) for _ in range(3)]
    assert its_thread != loop_thread
    assert quick[0] == its_thread  # timed there first
    assert slow == [its_thread] * 3  # 3 ms each: never inline


async def test_a_statement_that_turns_slow_goes_back_to_the_thread(engine: AsyncEngine) -> None:
    delay = {"seconds": 0.0}

    def sometimes_slow() -> int:
        time.sleep(delay["seconds"])
        return threading.get_ident()

    loop_thread = threading.get_ident()
    async with engine.connect() as connection:
        await (await driver_thread(connection)).run(
            lambda c: c.create_function("sometimes_slow", 0, sometimes_slow)
        )
        statement = "SELECT sometimes_slow()"
        assert (await runs_until_inline(connection, statement))[0] != loop_thread
        delay["seconds"] = 0.01  # now slow: one run blocks the loop, then the thread again
        assert await connection.scalar(text(statement)) == loop_thread
        assert await connection.scalar(text(statement)) != loop_thread


async def test_statements_naming_a_registered_function_stay_on_the_thread(
    engine: AsyncEngine,
) -> None:
    """A function registered through the DBAPI connection (an engine ``connect``
    listener) may wait on the event loop: its statements never run inline; others do."""

    @event.listens_for(engine.sync_engine, "connect")
    def add_function(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.create_function("whereami", 0, threading.get_ident)

    loop_thread = threading.get_ident()
    async with engine.connect() as connection:
        thread = await driver_thread(connection)
        await thread.run(lambda c: c.create_function("here", 0, threading.get_ident))
        await runs_until_inline(connection, "SELECT here()")  # others do go inline
        named = [await connection.scalar(text("SELECT WhereAmI()")) for _ in range(10)]
    assert loop_thread not in named


async def test_a_lock_held_elsewhere_is_waited_out_without_blocking_the_loop(
    file_url: str, models: Models
) -> None:
    db: SessionFactory[Any] = SessionFactory(file_url)
    try:
        async with db.engine.begin() as connection:
            await connection.run_sync(models.metadata.create_all)
        async with db.begin() as session:  # the BEGIN and INSERT are timed: inline next
            session.add(models.Item(name="first"))
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.005)
                ticks += 1

        async def writer() -> None:
            async with db.begin() as session:
                session.add(models.Item(name="waited"))

        with held_write_lock(db.config.sync_url.database or "") as locked:
            ticking = asyncio.create_task(ticker())
            writing = asyncio.create_task(writer())
            await asyncio.sleep(0.3)
            assert not writing.done()  # waiting for the lock...
            assert ticks >= 20  # ...while the loop runs other tasks
            locked.rollback()
        await asyncio.wait_for(writing, timeout=5)
        ticking.cancel()
        async with db() as session:
            names = (
                await session.scalars(select(models.Item.name).order_by(models.Item.id))
            ).all()
        assert names == ["first", "waited"]
    finally:
        await db.dispose()


async def test_an_executemany_outside_a_transaction_waits_on_its_thread(
    file_url: str, models: Models
) -> None:
    """Each row commits on its own there, so it is never re-run after a busy lock: it
    waits as SQLite does, on the connection's thread, and every row is written once."""
    engine = create_async_engine(file_url, isolation_level="AUTOCOMMIT")
    try:
        async with engine.begin() as connection:
            await connection.run_sync(models.metadata.create_all)
        table = models.Item.__table__.name

        async def write_rows() -> None:
            async with engine.connect() as connection:
                await connection.exec_driver_sql(
                    f"INSERT INTO {table} (name) VALUES (?)", [(f"row {i}",) for i in range(5)]
                )

        with held_write_lock(file_url.partition(":///")[2]) as locked:
            writing = asyncio.create_task(write_rows())
            await asyncio.sleep(0.3)
            assert not writing.done()
            locked.rollback()
        await asyncio.wait_for(writing, timeout=5)
        async with engine.connect() as connection:
            assert await connection.scalar(text(f"SELECT count(*) FROM {table}")) == 5
    finally:
        await engine.dispose()


async def test_the_busy_timeout_bounds_the_wait(file_url: str, models: Models) -> None:
    db: SessionFactory[Any] = SessionFactory(file_url, sqlite_busy_timeout=0.3)
    try:
        async with db.engine.begin() as connection:
            await connection.run_sync(models.metadata.create_all)
        with held_write_lock(db.config.sync_url.database or "") as locked:
            started = time.monotonic()
            with pytest.raises(exc.OperationalError, match="database is locked"):
                async with db.begin() as session:
                    session.add(models.Item(name="blocked"))
            waited = time.monotonic() - started
            locked.rollback()
        assert 0.3 <= waited < 3
        assert db.status().checked_out == 0
    finally:
        await db.dispose()


async def test_pragma_busy_timeout_is_the_drivers(file_url: str) -> None:
    """SQLite's own busy timeout stays 0; the pragma reads and sets the driver's wait."""
    db: SessionFactory[Any] = SessionFactory(file_url, sqlite_busy_timeout=2.5)
    try:
        async with db.engine.connect() as connection:
            assert await connection.scalar(text("PRAGMA busy_timeout")) == 2500
            assert await connection.scalar(text("PRAGMA busy_timeout = 1234")) == 1234
            assert await connection.scalar(text("pragma main.busy_timeout")) == 1234
            thread = await driver_thread(connection)
            assert thread.busy_timeout == 1.234
            assert await thread.run(lambda c: c.execute("PRAGMA busy_timeout").fetchone()) == (
                1234,  # run() calls are made with SQLite's busy timeout in force...
            )
            sqlite = thread.connection
            assert sqlite is not None  # ...and it is 0 between them, for inline calls
            assert await thread.submit(
                lambda: sqlite.execute("PRAGMA busy_timeout").fetchone()
            ) == (0,)
    finally:
        await db.dispose()


# --- cancellation and threads -----------------------------------------------------


async def test_cancelled_statement_finishes_and_the_connection_serves_on(
    make_factory: FactoryMaker, models: Models
) -> None:
    db = make_factory()
    gate = Gate()
    gate.install(db.engine)
    async with db.engine.begin() as connection:
        await connection.run_sync(models.metadata.create_all)

    async def held() -> None:
        async with db.begin() as session:
            session.add(models.Item(name="cancelled"))
            await session.execute(text("SELECT gate()"))

    task = asyncio.create_task(held())
    await gate.wait_entered(task)
    task.cancel()
    gate.opened.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert db.status().checked_out == 0
    async with db.begin() as session:  # not "database is locked"; rolled back
        session.add(models.Item(name="next"))
    async with db.begin() as session:
        assert (await session.scalars(select(models.Item.name))).all() == ["next"]


async def test_invalidated_connection_releases_its_lock(engine: AsyncEngine) -> None:
    """Plain SQLAlchemy invalidates a cancelled connection: the thread closes it."""
    gate = Gate()
    gate.install(engine)
    async with engine.begin() as connection:
        await connection.exec_driver_sql("CREATE TABLE t (x INTEGER)")

    async def held() -> None:
        async with engine.connect() as connection:
            await connection.exec_driver_sql("BEGIN IMMEDIATE")
            await connection.exec_driver_sql("INSERT INTO t VALUES (1)")
            await connection.exec_driver_sql("SELECT gate()")

    task = asyncio.create_task(held())
    await gate.wait_entered(task)
    task.cancel()
    gate.opened.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    async with engine.begin() as connection:
        await connection.exec_driver_sql("INSERT INTO t VALUES (2)")
        rows = (await connection.exec_driver_sql("SELECT x FROM t")).scalars().all()
    assert rows == [2]


async def test_one_thread_per_connection_all_ended_by_dispose(file_url: str) -> None:
    # Counted by name: other tests' threads may come and go meanwhile.
    before = len(our_threads())
    db: SessionFactory[Any] = SessionFactory(file_url, pool_size=4, max_overflow=0)
    entered = asyncio.Event()
    release = asyncio.Event()

    async def hold() -> None:
        async with db.begin() as session:
            await session.execute(text("SELECT 1"))
            if db.status().checked_out == 4:
                entered.set()
            await release.wait()

    tasks = [asyncio.create_task(hold()) for _ in range(4)]
    await entered.wait()
    assert len(our_threads()) == before + 4
    release.set()
    await asyncio.gather(*tasks)
    await db.dispose()
    assert len(our_threads()) == before


async def test_connection_collected_unclosed_ends_its_thread(engine: AsyncEngine) -> None:
    dbapi = engine.dialect.loaded_dbapi
    connection = await greenlet_spawn(dbapi.connect, ":memory:")
    thread = connection.driver_connection
    assert isinstance(thread, ConnectionThread)
    del connection
    gc.collect()
    await asyncio.to_thread(thread.join)
    assert not thread.alive


async def test_plain_sqlalchemy_on_the_driver(tmp_path: Path) -> None:
    engine = create_async_engine("sqlite+sessionforge://")  # StaticPool, one connection
    try:
        async with engine.begin() as connection:
            await connection.exec_driver_sql("CREATE TABLE t (x)")
            await connection.exec_driver_sql("INSERT INTO t VALUES (1)")
        async with engine.connect() as connection:
            assert (await connection.exec_driver_sql("SELECT x FROM t")).scalar() == 1
            assert (await connection.scalar(text("SELECT 'abc' REGEXP 'b'"))) == 1
    finally:
        await engine.dispose()
