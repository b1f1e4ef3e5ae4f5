"""The current session: ``scope()``, ``current()`` and ``atomic()`` on both twins.

The current session lives in a context variable per twin: it follows ``await`` within a
task, is copied into tasks started inside a scope (never shared back), and is separate
per thread for the sync twin. Outcomes are checked the way a user would: identity of
the session, rows seen from an independent connection, connections checked out.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.pool import NullPool

from sessionforge import NestedTransactionError, NoCurrentSessionError, SessionFactory
from sessionforge.dialects import is_memory_sqlite

from .conftest import count_rows
from .models import Models

TWINS = [pytest.param("async", id="async"), pytest.param("sync", id="sync")]

#: Options a nested atomic() cannot honour (it is a SAVEPOINT of the outer transaction).
OUTER_ONLY_OPTIONS = [
    pytest.param({"isolation_level": "SERIALIZABLE"}, id="isolation_level"),
    pytest.param({"readonly": True}, id="readonly"),
    pytest.param({"timeout": 5.0}, id="timeout"),
    pytest.param({"settings": {"application_name": "nested"}}, id="settings"),
]

#: How long a thread or task of a test may take before the test fails instead of hanging.
WAIT = 10.0


class Boom(Exception):
    """An application error raised inside a block."""


def item_names(engine: Engine, table: str) -> list[str]:
    """The names in the item table, as an independent connection sees them."""
    with engine.connect() as connection:
        return sorted(connection.execute(text(f"SELECT name FROM {table}")).scalars())


def has_no_current(factory: Any) -> bool:
    """Whether ``factory.current()`` raises ``NoCurrentSessionError`` here."""
    try:
        factory.current()
    except NoCurrentSessionError:
        return True
    return False


# --- scope() and current() ------------------------------------------------------------


@pytest.mark.parametrize("twin", TWINS)
async def test_current_outside_any_scope_raises_and_suggests_scope(
    twin: str, db: SessionFactory[Any]
) -> None:
    factory: Any = db if twin == "async" else db.sync
    with pytest.raises(NoCurrentSessionError, match=r"db\.scope\(\)") as raised:
        factory.current()
    assert isinstance(raised.value, LookupError)
    with pytest.raises(LookupError):
        factory.current()


@pytest.mark.parametrize("twin", TWINS)
async def test_scope_makes_the_session_current_and_never_commits(
    twin: str, db: SessionFactory[Any], models: Models, outside: Engine
) -> None:
    if twin == "async":
        async with db.scope() as session:
            assert db.current() is session
            session.add(models.Item(name="flushed only"))
            await session.flush()
            assert await session.scalar(select(func.count()).select_from(models.Item)) == 1
            assert db.status().checked_out == 1
    else:
        with db.sync.scope() as sync_session:
            assert db.sync.current() is sync_session
            sync_session.add(models.Item(name="flushed only"))
            sync_session.flush()
            assert sync_session.scalar(select(func.count()).select_from(models.Item)) == 1
            assert db.sync.status().checked_out == 1

    assert has_no_current(db if twin == "async" else db.sync)
    assert count_rows(outside, models.item) == 0
    assert db.status().checked_out == 0
    assert db.sync.status().checked_out == 0


@pytest.mark.parametrize("twin", TWINS)
async def test_scopes_nest_and_restore_the_previous_session(
    twin: str, db: SessionFactory[Any]
) -> None:
    if twin == "async":
        async with db.scope() as outer:
            async with db.scope() as inner:
                assert inner is not outer
                assert db.current() is inner
                await inner.execute(select(1))
            assert db.current() is outer
            assert db.status().checked_out == 0  # the inner session was closed
            with pytest.raises(Boom):
                async with db.scope() as failing:
                    assert db.current() is failing
                    await failing.execute(select(1))
                    raise Boom
            assert db.current() is outer
            assert db.status().checked_out == 0
    else:
        with db.sync.scope() as sync_outer:
            with db.sync.scope() as sync_inner:
                assert sync_inner is not sync_outer
                assert db.sync.current() is sync_inner
                sync_inner.execute(select(1))
            assert db.sync.current() is sync_outer
            assert db.sync.status().checked_out == 0
            with pytest.raises(Boom):
                with db.sync.scope() as sync_failing:
                    assert db.sync.current() is sync_failing
                    sync_failing.execute(select(1))
                    raise Boom
            assert db.sync.current() is sync_outer
            assert db.sync.status().checked_out == 0
    assert has_no_current(db if twin == "async" else db.sync)


async def test_scope_restores_the_current_session_when_the_task_is_cancelled(
    db: SessionFactory[Any],
) -> None:
    async def cancelled_in_scope(entered: asyncio.Event, seen_after: list[object]) -> None:
        try:
            async with db.scope() as session:
                assert db.current() is session
                await session.execute(select(1))  # holds a pooled connection
                entered.set()
                await asyncio.Event().wait()
        except asyncio.CancelledError:
            # Inside the cancelled task: the scope's exit restored what was there.
            seen_after.append("no current" if has_no_current(db) else db.current())
            raise

    # Outside any scope.
    entered, seen_after = asyncio.Event(), list[object]()
    task = asyncio.create_task(cancelled_in_scope(entered, seen_after))
    await asyncio.wait_for(entered.wait(), WAIT)
    assert db.status().checked_out == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()
    assert seen_after == ["no current"]
    assert has_no_current(db)
    assert db.status().checked_out == 0

    # Inside a scope of the parent: the task starts with the parent's session current.
    async with db.scope() as parent:
        entered, seen_after = asyncio.Event(), list[object]()
        task = asyncio.create_task(cancelled_in_scope(entered, seen_after))
        await asyncio.wait_for(entered.wait(), WAIT)
        assert db.current() is parent
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert seen_after == [parent]
        assert db.current() is parent
        assert db.status().checked_out == 0
    assert has_no_current(db)


async def test_current_session_does_not_leak_into_unrelated_tasks(
    db: SessionFactory[Any],
) -> None:
    in_scope, looked = asyncio.Event(), asyncio.Event()
    unrelated_saw: list[str] = []

    async def unrelated() -> None:
        # Started before the scope, running while the parent is inside it.
        await in_scope.wait()
        unrelated_saw.append("no current" if has_no_current(db) else "leaked")
        looked.set()

    unrelated_task = asyncio.create_task(unrelated())
    await asyncio.sleep(0)  # let it start and wait
    async with db.scope() as session:
        in_scope.set()
        await asyncio.wait_for(looked.wait(), WAIT)
        assert db.current() is session
    await asyncio.wait_for(unrelated_task, WAIT)
    assert unrelated_saw == ["no current"]


async def test_task_started_inside_a_scope_sees_it_but_its_own_scope_stays_its_own(
    db: SessionFactory[Any],
) -> None:
    child_in_own_scope, parent_looked = asyncio.Event(), asyncio.Event()
    child_saw: dict[str, object] = {}

    async with db.scope() as session:

        async def child() -> None:
            child_saw["inherited"] = db.current()
            async with db.scope() as own:
                child_saw["own"] = own
                child_saw["current in own scope"] = db.current()
                child_in_own_scope.set()
                await asyncio.wait_for(parent_looked.wait(), WAIT)
            child_saw["after own scope"] = db.current()

        child_task = asyncio.create_task(child())
        await asyncio.wait_for(child_in_own_scope.wait(), WAIT)
        # The child is inside its own scope right now; ours is unchanged.
        assert db.current() is session
        parent_looked.set()
        await asyncio.wait_for(child_task, WAIT)
        assert db.current() is session

    assert child_saw["inherited"] is session
    assert child_saw["own"] is not session
    assert child_saw["current in own scope"] is child_saw["own"]
    assert child_saw["after own scope"] is session
    assert has_no_current(db)


async def test_sync_scope_is_not_seen_by_other_threads(db: SessionFactory[Any]) -> None:
    thread_in_scope, main_looked = threading.Event(), threading.Event()
    thread_saw: dict[str, object] = {}

    def other_thread() -> None:
        thread_saw["before"] = "no current" if has_no_current(db.sync) else db.sync.current()
        with db.sync.scope() as own:
            thread_saw["own"] = own
            thread_saw["current in own scope"] = db.sync.current()
            thread_in_scope.set()
            main_looked.wait(WAIT)
        thread_saw["after"] = "no current" if has_no_current(db.sync) else db.sync.current()

    with db.sync.scope() as session:
        assert db.sync.current() is session
        thread = threading.Thread(target=other_thread)
        thread.start()
        assert thread_in_scope.wait(WAIT)
        assert db.sync.current() is session  # the thread's scope is its own
        main_looked.set()
        thread.join(WAIT)
        assert not thread.is_alive()
        assert db.sync.current() is session

    assert thread_saw["before"] == "no current"
    assert thread_saw["own"] is not session
    assert thread_saw["current in own scope"] is thread_saw["own"]
    assert thread_saw["after"] == "no current"
    assert has_no_current(db.sync)


async def test_async_and_sync_twins_have_separate_current_sessions(
    db: SessionFactory[Any],
) -> None:
    with db.sync.scope() as sync_session:
        assert db.sync.current() is sync_session
        with pytest.raises(NoCurrentSessionError):
            db.current()
    async with db.scope() as session:
        assert db.current() is session
        with pytest.raises(NoCurrentSessionError):
            db.sync.current()
        with db.sync.scope() as sync_session:
            assert db.sync.current() is sync_session
            assert db.current() is session
        assert has_no_current(db.sync)
        assert db.current() is session


@pytest.mark.parametrize("twin", TWINS)
async def test_plain_sessions_and_begin_do_not_set_the_current_session(
    twin: str, db: SessionFactory[Any], models: Models
) -> None:
    if twin == "async":
        created = db()
        assert has_no_current(db)
        await created.close()
        async with db() as session:
            await session.execute(select(1))
            assert has_no_current(db)
        async with db.begin() as session:
            session.add(models.Item(name="begin"))
            assert has_no_current(db)
        async with db.scope() as scoped:
            async with db() as session:
                assert db.current() is scoped
            async with db.begin() as session:
                assert db.current() is scoped
        assert has_no_current(db)
    else:
        sync_created = db.sync()
        assert has_no_current(db.sync)
        sync_created.close()
        with db.sync() as sync_session:
            sync_session.execute(select(1))
            assert has_no_current(db.sync)
        with db.sync.begin() as sync_session:
            sync_session.add(models.Item(name="begin"))
            assert has_no_current(db.sync)
        with db.sync.scope() as sync_scoped:
            with db.sync() as sync_session:
                assert db.sync.current() is sync_scoped
            with db.sync.begin() as sync_session:
                assert db.sync.current() is sync_scoped
        assert has_no_current(db.sync)


# --- atomic() -------------------------------------------------------------------------


@pytest.mark.parametrize("twin", TWINS)
async def test_outermost_atomic_is_a_new_current_session_committed_at_exit(
    twin: str, db: SessionFactory[Any], models: Models, outside: Engine
) -> None:
    if twin == "async":
        async with db.atomic() as session:
            assert db.current() is session
            assert session.in_transaction()
            assert not session.in_nested_transaction()
            session.add(models.Item(name="atomic"))
    else:
        with db.sync.atomic() as sync_session:
            assert db.sync.current() is sync_session
            assert sync_session.in_transaction()
            assert not sync_session.in_nested_transaction()
            sync_session.add(models.Item(name="atomic"))

    assert has_no_current(db if twin == "async" else db.sync)
    assert item_names(outside, models.item) == ["atomic"]
    assert db.status().checked_out == 0
    assert db.sync.status().checked_out == 0


@pytest.mark.parametrize("twin", TWINS)
async def test_outermost_atomic_rolls_back_on_error_and_restores_the_current_session(
    twin: str, db: SessionFactory[Any], models: Models, outside: Engine
) -> None:
    with pytest.raises(Boom):
        if twin == "async":
            async with db.atomic() as session:
                session.add(models.Item(name="rolled back"))
                await session.flush()
                raise Boom
        else:
            with db.sync.atomic() as sync_session:
                sync_session.add(models.Item(name="rolled back"))
                sync_session.flush()
                raise Boom

    assert has_no_current(db if twin == "async" else db.sync)
    assert count_rows(outside, models.item) == 0
    assert db.status().checked_out == 0
    assert db.sync.status().checked_out == 0


@pytest.mark.parametrize("twin", TWINS)
async def test_nested_atomic_is_a_savepoint_of_the_same_session(
    twin: str, db: SessionFactory[Any], models: Models, outside: Engine
) -> None:
    if twin == "async":
        async with db.atomic() as outer:
            outer.add(models.Item(name="outer before"))
            await outer.flush()
            with pytest.raises(Boom):
                async with db.atomic() as inner:
                    assert inner is outer
                    assert db.current() is outer
                    assert inner.in_nested_transaction()
                    inner.add(models.Item(name="inner rolled back"))
                    await inner.flush()
                    raise Boom
            assert db.current() is outer
            assert outer.in_transaction()
            assert not outer.in_nested_transaction()
            async with db.atomic() as kept:
                assert kept is outer
                kept.add(models.Item(name="inner released"))
            outer.add(models.Item(name="outer after"))
    else:
        with db.sync.atomic() as sync_outer:
            sync_outer.add(models.Item(name="outer before"))
            sync_outer.flush()
            with pytest.raises(Boom):
                with db.sync.atomic() as sync_inner:
                    assert sync_inner is sync_outer
                    assert db.sync.current() is sync_outer
                    assert sync_inner.in_nested_transaction()
                    sync_inner.add(models.Item(name="inner rolled back"))
                    sync_inner.flush()
                    raise Boom
            assert db.sync.current() is sync_outer
            assert sync_outer.in_transaction()
            assert not sync_outer.in_nested_transaction()
            with db.sync.atomic() as sync_kept:
                assert sync_kept is sync_outer
                sync_kept.add(models.Item(name="inner released"))
            sync_outer.add(models.Item(name="outer after"))

    assert item_names(outside, models.item) == ["inner released", "outer after", "outer before"]
    assert has_no_current(db if twin == "async" else db.sync)
    assert db.status().checked_out == 0
    assert db.sync.status().checked_out == 0


@pytest.mark.parametrize("twin", TWINS)
async def test_durable_atomic_works_outermost_and_refuses_to_nest(
    twin: str, db: SessionFactory[Any], models: Models, outside: Engine
) -> None:
    if twin == "async":
        async with db.atomic(durable=True) as outer:
            outer.add(models.Item(name="durable"))
            with pytest.raises(NestedTransactionError, match="durable=True") as raised:
                async with db.atomic(durable=True):
                    outer.add(models.Item(name="never added"))
            assert db.current() is outer
            assert outer.in_transaction()
    else:
        with db.sync.atomic(durable=True) as sync_outer:
            sync_outer.add(models.Item(name="durable"))
            with pytest.raises(NestedTransactionError, match="durable=True") as raised:
                with db.sync.atomic(durable=True):
                    sync_outer.add(models.Item(name="never added"))
            assert db.sync.current() is sync_outer
            assert sync_outer.in_transaction()

    assert isinstance(raised.value, RuntimeError)
    assert "outermost" in str(raised.value)
    assert item_names(outside, models.item) == ["durable"]


@pytest.mark.parametrize("options", OUTER_ONLY_OPTIONS)
@pytest.mark.parametrize("twin", TWINS)
async def test_nested_atomic_refuses_transaction_options(
    twin: str, options: dict[str, Any], db: SessionFactory[Any], models: Models, outside: Engine
) -> None:
    if twin == "async":
        async with db.atomic() as outer:
            outer.add(models.Item(name="outer"))
            with pytest.raises(NestedTransactionError, match="SAVEPOINT") as raised:
                async with db.atomic(**options):
                    outer.add(models.Item(name="never added"))
            assert db.current() is outer
    else:
        with db.sync.atomic() as sync_outer:
            sync_outer.add(models.Item(name="outer"))
            with pytest.raises(NestedTransactionError, match="SAVEPOINT") as raised:
                with db.sync.atomic(**options):
                    sync_outer.add(models.Item(name="never added"))
            assert db.sync.current() is sync_outer

    assert isinstance(raised.value, RuntimeError)
    assert "outermost atomic() or begin()" in str(raised.value)
    assert item_names(outside, models.item) == ["outer"]


# --- atomic() inside begin(): PostgreSQL only -------------------------------------------
# db.begin() does not set the current session, so an atomic() inside it is a second
# session and transaction. On SQLite that second writer waits for the first one's lock
# (documented); PostgreSQL row locks let both proceed.


@pytest.fixture
async def pg_db(pg_url: str, models: Models) -> AsyncIterator[SessionFactory[Any]]:
    factory: SessionFactory[Any] = SessionFactory(pg_url)
    async with factory.engine.begin() as connection:
        await connection.run_sync(models.metadata.create_all)
    yield factory
    async with factory.engine.begin() as connection:
        await connection.run_sync(models.metadata.drop_all)
    await factory.dispose()


@pytest.fixture
def pg_outside(pg_db: SessionFactory[Any]) -> Iterator[Engine]:
    engine = create_engine(pg_db.config.sync_url, poolclass=NullPool)
    yield engine
    engine.dispose()


@pytest.mark.postgres
@pytest.mark.parametrize("twin", TWINS)
async def test_atomic_inside_begin_is_a_separate_transaction(
    twin: str, pg_db: SessionFactory[Any], models: Models, pg_outside: Engine
) -> None:
    db = pg_db
    with pytest.raises(Boom):
        if twin == "async":
            async with db.begin() as outer:
                outer.add(models.Item(name="outer"))
                await outer.flush()
                async with db.atomic() as inner:
                    assert inner is not outer
                    assert db.current() is inner
                    assert not inner.in_nested_transaction()
                    inner.add(models.Item(name="inner"))
                assert has_no_current(db)
                assert db.status().checked_out == 1  # the outer session's connection
                assert item_names(pg_outside, models.item) == ["inner"]
                raise Boom
        else:
            with db.sync.begin() as sync_outer:
                sync_outer.add(models.Item(name="outer"))
                sync_outer.flush()
                with db.sync.atomic() as sync_inner:
                    assert sync_inner is not sync_outer
                    assert db.sync.current() is sync_inner
                    assert not sync_inner.in_nested_transaction()
                    sync_inner.add(models.Item(name="inner"))
                assert has_no_current(db.sync)
                assert db.sync.status().checked_out == 1
                assert item_names(pg_outside, models.item) == ["inner"]
                raise Boom

    assert item_names(pg_outside, models.item) == ["inner"]
    assert db.status().checked_out == 0
    assert db.sync.status().checked_out == 0


@pytest.mark.parametrize("twin", TWINS)
async def test_atomic_on_a_scope_session_with_an_autobegun_transaction_commits_at_exit(
    twin: str, db: SessionFactory[Any], models: Models, outside: Engine
) -> None:
    # A read in scope() autobegins a transaction that scope() never commits. An atomic()
    # block there runs in a SAVEPOINT of it; being the outermost atomic block, leaving
    # it commits, as in Django (the block's work is not left to the scope's mercy).
    if twin == "async":
        async with db.scope() as session:
            await session.execute(text("SELECT 1"))
            assert session.in_transaction()
            async with db.atomic(durable=True) as atomic_session:
                assert atomic_session is session
                session.add(models.Item(name="outer"))
                async with db.atomic():  # nested: a savepoint, no commit at its exit
                    session.add(models.Item(name="inner"))
                with pytest.raises(Boom):
                    async with db.atomic():
                        session.add(models.Item(name="rolled back"))
                        await session.flush()
                        raise Boom
                if not is_memory_sqlite(db.url):  # shared cache: table locked meanwhile
                    assert item_names(outside, models.item) == []
            assert item_names(outside, models.item) == ["inner", "outer"]
            assert not session.in_transaction()
    else:
        with db.sync.scope() as sync_session:
            sync_session.execute(text("SELECT 1"))
            with db.sync.atomic(durable=True) as atomic_sync:
                assert atomic_sync is sync_session
                sync_session.add(models.Item(name="outer"))
                with db.sync.atomic():
                    sync_session.add(models.Item(name="inner"))
                with pytest.raises(Boom), db.sync.atomic():
                    sync_session.add(models.Item(name="rolled back"))
                    sync_session.flush()
                    raise Boom
                if not is_memory_sqlite(db.url):
                    assert item_names(outside, models.item) == []
            assert item_names(outside, models.item) == ["inner", "outer"]
    assert db.status().checked_out == 0


@pytest.mark.parametrize("twin", TWINS)
async def test_atomic_on_an_open_transaction_refuses_options(
    twin: str, db: SessionFactory[Any]
) -> None:
    with pytest.raises(NestedTransactionError, match="current session's open transaction"):
        if twin == "async":
            async with db.scope() as session:
                await session.execute(text("SELECT 1"))
                async with db.atomic(isolation_level="SERIALIZABLE"):
                    pass
        else:
            with db.sync.scope() as sync_session:
                sync_session.execute(text("SELECT 1"))
                with db.sync.atomic(readonly=True):
                    pass
