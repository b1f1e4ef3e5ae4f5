"""The one-task-per-session guard without leaks (issue 11).

A block that ends while another task still runs an operation on its session waits for
that operation, then rolls back and closes: nothing stays checked out and the caller's
error stays the first one. Every I/O method is guarded, a subclass's own included, and
the guards look methods up when called, so class patching reaches them.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from unittest import mock

import pytest
import sqlmodel.ext.asyncio.session
from sqlalchemy import exc as sa_exc
from sqlalchemy import literal, select, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from sessionforge import ConcurrentSessionUseError, SessionFactory

from .conftest import DbMaker
from .test_cancellation import assert_whole
from .test_concurrent_use import slow_sql


@pytest.fixture
def application_name(prefix: str) -> str:
    return f"{prefix}-guard"


@pytest.fixture
def make_named_db(make_db: DbMaker, backend: str, application_name: str) -> DbMaker:
    """``make_db``, with an application_name to find on the server (PostgreSQL only)."""

    async def make(**options: Any) -> SessionFactory[Any]:
        if backend == "postgres":
            options["application_name"] = application_name
        return await make_db(**options)

    return make


@pytest.fixture
async def named_db(make_named_db: DbMaker) -> SessionFactory[Any]:
    """The ``db`` fixture's factory, named on the server (see ``make_named_db``)."""
    return await make_named_db()


def is_postgres(db: SessionFactory[Any]) -> bool:
    return db.url.get_backend_name() == "postgresql"


async def assert_nothing_left(db: SessionFactory[Any], application_name: str) -> None:
    await assert_whole(db, application_name if is_postgres(db) else None)


# 1. a block ending while another task is in an operation on its session -------------

Block = Callable[[SessionFactory[Any], Callable[[Any], Awaitable[None]]], Awaitable[None]]


async def in_session(db: SessionFactory[Any], work: Callable[[Any], Awaitable[None]]) -> None:
    async with db() as session:
        await work(session)


async def in_begin(db: SessionFactory[Any], work: Callable[[Any], Awaitable[None]]) -> None:
    async with db.begin() as session:
        await work(session)


async def in_run_transaction(
    db: SessionFactory[Any], work: Callable[[Any], Awaitable[None]]
) -> None:
    await db.run_transaction(work)


async def in_scope(db: SessionFactory[Any], work: Callable[[Any], Awaitable[None]]) -> None:
    async with db.scope() as session:
        await work(session)


BLOCKS = [
    pytest.param(in_session, id="session"),
    pytest.param(in_begin, id="begin"),
    pytest.param(in_run_transaction, id="run_transaction"),
    pytest.param(in_scope, id="scope"),
]


@pytest.mark.parametrize("block", BLOCKS)
async def test_gather_on_one_session_leaks_nothing(
    named_db: SessionFactory[Any], application_name: str, block: Block
) -> None:
    db = named_db
    for round_ in range(3):
        finished: list[int] = []
        calls = 0

        async def slow(session: Any) -> None:
            row = (await session.execute(text(slow_sql(db)))).one()
            finished.append(row[1])  # noqa: B023 - this round's list

        async def work(session: Any) -> None:
            nonlocal calls
            calls += 1
            await session.execute(text("SELECT 0"))  # a transaction is open
            await asyncio.gather(slow(session), session.execute(text("SELECT 2")))

        with pytest.raises(ConcurrentSessionUseError) as raised:
            await block(db, work)
        # The caller's error is the gather's, not one from the block's exit.
        assert "called session.execute() while" in str(raised.value), round_
        assert raised.value.__context__ is None
        assert calls == 1  # run_transaction does not retry it
        assert finished == [1]  # the exit waited: the other task's work was not cut off
        await assert_nothing_left(db, application_name)


async def test_a_begin_block_rolls_back_after_the_other_task(
    named_db: SessionFactory[Any], application_name: str, models: Any
) -> None:
    db = named_db

    async def slow_insert(session: Any) -> None:
        await session.execute(text(slow_sql(db)))
        session.add(models.Item(name="late"))
        await session.flush()

    with pytest.raises(ConcurrentSessionUseError):
        async with db.begin() as session:
            session.add(models.Item(name="early"))
            await session.flush()
            await asyncio.gather(slow_insert(session), session.get(models.Item, 1))
    async with db() as session:  # both rows were rolled back with the block
        assert (await session.scalars(select(models.Item.name))).all() == []
    await assert_nothing_left(db, application_name)


async def test_the_exit_waits_for_an_operation_that_fails(
    named_db: SessionFactory[Any], application_name: str
) -> None:
    db = named_db
    sql = slow_sql(db)

    def slow_then_fail(sync: Session) -> None:
        sync.execute(text(sql))
        raise LookupError("the other task's own error")

    for block in (in_session, in_begin):
        holder: asyncio.Task[Any] | None = None

        async def work(session: Any) -> None:
            nonlocal holder
            holder = asyncio.create_task(session.run_sync(slow_then_fail))
            await asyncio.sleep(0.02)
            await session.execute(text("SELECT 2"))

        with pytest.raises(ConcurrentSessionUseError):
            await block(db, work)
        assert holder is not None
        assert holder.done()
        with pytest.raises(LookupError):
            holder.result()
        await assert_nothing_left(db, application_name)


async def test_the_exit_waits_for_an_operation_whose_task_is_cancelled(
    named_db: SessionFactory[Any], application_name: str
) -> None:
    db = named_db
    for block in (in_session, in_begin):
        holder: asyncio.Task[Any] | None = None

        async def work(session: Any) -> None:
            nonlocal holder
            holder = asyncio.create_task(session.execute(text(slow_sql(db))))
            await asyncio.sleep(0.02)
            asyncio.get_running_loop().call_later(0.05, holder.cancel)
            await session.execute(text("SELECT 2"))

        with pytest.raises(ConcurrentSessionUseError):
            await block(db, work)
        assert holder is not None
        assert holder.done()
        await assert_nothing_left(db, application_name)


async def test_cancelling_a_block_while_its_exit_waits(
    named_db: SessionFactory[Any], application_name: str
) -> None:
    """The cancellation waits for the exit (the other operation, then the close)."""
    db = named_db
    for block in (in_session, in_begin):
        finished: list[int] = []

        async def slow(session: Any) -> None:
            row = (await session.execute(text(slow_sql(db)))).one()
            finished.append(row[1])  # noqa: B023 - this round's list

        async def work(session: Any) -> None:
            await asyncio.gather(slow(session), session.execute(text("SELECT 2")))

        task = asyncio.create_task(block(db, work))
        await asyncio.sleep(0.05)  # the gather has failed; the exit is waiting
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert finished == [1]
        await assert_nothing_left(db, application_name)


async def test_a_direct_close_from_another_task_waits(
    named_db: SessionFactory[Any], application_name: str
) -> None:
    db = named_db
    session = db()
    results = await asyncio.gather(session.scalar(text(slow_sql(db))), session.close())
    assert results[1] is None
    await assert_nothing_left(db, application_name)


async def test_a_waiting_close_that_is_cancelled_leaves_the_session_to_its_holder(
    named_db: SessionFactory[Any], application_name: str
) -> None:
    db = named_db
    async with db() as session:
        holder = asyncio.create_task(session.execute(text(slow_sql(db))))
        await asyncio.sleep(0.02)
        closing = asyncio.create_task(session.close())
        await asyncio.sleep(0.02)
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        assert (await holder).one()[1] == 1  # undisturbed
        assert await session.scalar(text("SELECT 3")) == 3  # and the session still works
    await assert_nothing_left(db, application_name)


class ClosingSession(AsyncSession):
    """A subclass whose own (guarded) coroutine methods end the session themselves."""

    async def query_and_leave(self) -> int:
        async with self:  # AsyncSession.__aexit__ closes in a task of its own
            return int(await self.scalar(text("SELECT 5")) or 0)

    async def query_and_close(self) -> int:
        value = await self.scalar(text("SELECT 6"))
        await self.close()
        return int(value or 0)


async def test_an_exit_inside_the_holders_own_operation_does_not_deadlock(
    make_named_db: DbMaker, application_name: str
) -> None:
    db = await make_named_db(class_=ClosingSession)
    async with asyncio.timeout(5):
        assert await db().query_and_leave() == 5
        assert await db().query_and_close() == 6
        async with db.begin() as session:
            assert await session.query_and_close() == 6
    await assert_nothing_left(db, application_name)


# The servers only: a statement the server can be made to drop (SQLite's runs on).
@pytest.mark.parametrize(
    "backend",
    [
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("mysql", marks=pytest.mark.mysql),
    ],
)
async def test_past_pool_timeout_the_connection_is_invalidated(
    make_named_db: DbMaker, backend: str, application_name: str
) -> None:
    db = await make_named_db(pool_timeout=0.3)
    holder: asyncio.Task[Any] | None = None

    async def work(session: Any) -> None:
        nonlocal holder
        sleep = "SELECT pg_sleep(30)" if is_postgres(db) else "SELECT SLEEP(30)"
        holder = asyncio.create_task(session.execute(text(sleep)))
        await asyncio.sleep(0.05)
        await session.execute(text("SELECT 2"))

    for block in (in_session, in_begin):
        started = time.monotonic()
        with pytest.raises(ConcurrentSessionUseError):
            await block(db, work)
        assert time.monotonic() - started < 5
        assert holder is not None
        assert holder.done()
        with pytest.raises(sa_exc.DBAPIError):
            holder.result()  # its connection was dropped under it
        await assert_nothing_left(db, application_name)


# 2. every I/O method is guarded, a subclass's own included --------------------------


class MySession(AsyncSession):
    async def my_query(self, sql: str) -> Any:
        return (await self.execute(text(sql))).one()

    async def my_rows(self, sql: str) -> AsyncIterator[Any]:
        for row in (await self.execute(text(sql))).all():
            yield row


def session_classes() -> list[Any]:
    return [
        pytest.param(
            sqlmodel.ext.asyncio.session.AsyncSession,
            "exec",
            # assert_whole's session.execute(): SQLModel deprecates it in favour of exec()
            marks=pytest.mark.filterwarnings("ignore::DeprecationWarning"),
            id="sqlmodel-exec",
        ),
        pytest.param(MySession, "my_query", id="subclass-coroutine"),
        pytest.param(MySession, "my_rows", id="subclass-async-generator"),
        pytest.param(AsyncSession, "stream", id="stream"),
    ]


async def call(session: Any, method: str, sql: str) -> Any:
    if method == "exec":
        return (await session.exec(text(sql))).one()
    if method == "my_rows":
        return [row async for row in session.my_rows(sql)][0]  # noqa: RUF015
    if method == "stream":
        return await (await session.stream(text(sql))).one()
    return await getattr(session, method)(sql)


@pytest.mark.parametrize(("class_", "method"), session_classes())
async def test_a_subclass_method_is_guarded(
    make_named_db: DbMaker, application_name: str, class_: type[AsyncSession], method: str
) -> None:
    db = await make_named_db(class_=class_)
    sql = slow_sql(db)
    for block in (in_session, in_begin):
        finished: list[Any] = []

        async def slow(session: Any) -> None:
            finished.append(await call(session, method, sql))  # noqa: B023

        async def work(session: Any) -> None:
            first = asyncio.create_task(slow(session))
            await asyncio.sleep(0.02)
            try:
                with pytest.raises(ConcurrentSessionUseError, match=rf"session\.{method}\(\)"):
                    await asyncio.create_task(call(session, method, "SELECT 2, 2"))
            finally:
                await first
            if method == "stream":
                # Rows of a stream() are fetched by its AsyncResult, outside the session's
                # methods and so outside the guard: an exit waits for stream() itself only.
                return
            await asyncio.gather(slow(session), call(session, method, "SELECT 2, 2"))

        if method == "stream":
            await block(db, work)
            assert [row[1] for row in finished] == [1]
        else:
            with pytest.raises(ConcurrentSessionUseError):
                await block(db, work)
            assert [row[1] for row in finished] == [1, 1]
        await assert_nothing_left(db, application_name)


# 3. class patching reaches sessions of an existing factory --------------------------


async def test_patching_async_session_reaches_an_existing_factory(
    db: SessionFactory[Any],
) -> None:
    marker = object()
    with mock.patch("sqlalchemy.ext.asyncio.AsyncSession.scalar", return_value=marker):
        async with db() as session:
            assert await session.scalar(select(literal(1))) is marker
    async with db() as session:  # and the patch is undone
        assert await session.scalar(select(literal(1))) == 1


async def test_patching_session_reaches_the_sync_twin(db: SessionFactory[Any]) -> None:
    marker = object()
    with mock.patch("sqlalchemy.orm.Session.scalar", return_value=marker):
        with db.sync() as session:
            assert session.scalar(select(literal(1))) is marker
    with db.sync() as session:
        assert session.scalar(select(literal(1))) == 1


class OverridingSession(AsyncSession):
    async def scalar(self, *args: Any, **kwargs: Any) -> Any:
        return "mine"


async def test_a_subclass_override_wins_over_a_patched_base(make_db: DbMaker) -> None:
    db = await make_db(class_=OverridingSession)
    with mock.patch("sqlalchemy.ext.asyncio.AsyncSession.scalar", return_value="patched"):
        async with db() as session:
            assert await session.scalar(select(literal(1))) == "mine"
    with mock.patch.object(OverridingSession, "scalar", return_value="patched subclass"):
        async with db() as session:
            assert await session.scalar(select(literal(1))) == "patched subclass"


@pytest.mark.parametrize("backend", ["sqlite-file"])  # a statement nothing interrupts
async def test_a_session_given_up_on_is_neither_open_nor_a_leak(make_factory: Any) -> None:
    """Past pool_timeout twice the exit gives the session up (its connection invalidated):
    the counters say so, and collecting it later reports no leak."""
    db = make_factory(pool_timeout=0.1)
    long_sql = (
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 6000000) "
        "SELECT count(*) FROM n"
    )
    holder: asyncio.Task[Any] | None = None
    with pytest.raises(ConcurrentSessionUseError):
        async with db() as session:
            holder = asyncio.create_task(session.execute(text(long_sql)))
            await asyncio.sleep(0.02)
            await session.execute(text("SELECT 2"))
    assert holder is not None
    assert db.status().sessions_open == 0
    assert db.status().checked_out == 0
    with contextlib.suppress(Exception):
        await holder  # its connection was invalidated under it
    del session, holder
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gc.collect()
    assert [str(w.message) for w in caught if "garbage-collected" in str(w.message)] == []
    assert db.status().sessions_open == 0
