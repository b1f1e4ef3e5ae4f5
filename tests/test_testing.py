"""``sessionforge.testing.isolated``: every session of a factory on one rolled-back connection.

Each scenario runs on every backend, through the async factory and through its sync
twin (the sync scenario runs in a worker thread). Isolation is checked from outside: an
independent connection sees none of the rows a test committed, and no connection is
left checked out.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.engine import Engine

import sessionforge
from sessionforge import ConfigurationError, SessionFactory
from sessionforge.testing import AsyncIsolation, SyncIsolation, isolated

from .conftest import count_rows
from .models import Models

TWINS = [pytest.param("async", id="async"), pytest.param("sync", id="sync")]


def names(db: SessionFactory[Any], models: Models) -> list[str]:
    """Item names as the (isolated) sync twin sees them."""
    with db.sync() as session:
        return sorted(session.scalars(select(models.Item.name)))


async def async_names(db: SessionFactory[Any], models: Models) -> list[str]:
    async with db() as session:
        return sorted((await session.scalars(select(models.Item.name))).all())


def assert_clean(db: SessionFactory[Any], models: Models, outside: Engine) -> None:
    """Nothing the test committed is in the database; no connection is checked out."""
    assert count_rows(outside, models.item) == 0
    assert count_rows(outside, models.counter) == 0
    assert db.status().checked_out == 0
    assert db.sync.status().checked_out == 0


# --- commits go to a savepoint, the end rolls everything back ------------------------


async def test_async_commits_are_seen_inside_and_rolled_back_at_exit(
    db: SessionFactory[Any], models: Models, outside: Engine
) -> None:
    async with isolated(db) as iso:
        assert isinstance(iso, AsyncIsolation)
        async with db.begin() as session:
            session.add(models.Item(name="a"))
        async with db() as session:
            session.add(models.Item(name="b"))
            await session.commit()
        await db.run_transaction(lambda s: _add(s, models, "c"))
        async with db.scope(), db.atomic() as session:
            session.add(models.Item(name="d"))
        assert await async_names(db, models) == ["a", "b", "c", "d"]
    assert_clean(db, models, outside)
    # Afterwards the factory is itself again: a commit is a commit.
    async with db.begin() as session:
        session.add(models.Item(name="real"))
    assert count_rows(outside, models.item) == 1


async def _add(session: Any, models: Models, name: str) -> None:
    session.add(models.Item(name=name))


async def test_sync_twin_commits_are_seen_inside_and_rolled_back_at_exit(
    db: SessionFactory[Any], models: Models, outside: Engine
) -> None:
    sdb = db.sync

    def scenario() -> list[str]:
        with isolated(sdb) as iso:
            assert isinstance(iso, SyncIsolation)
            with sdb.begin() as session:
                session.add(models.Item(name="a"))
            with sdb() as session:
                session.add(models.Item(name="b"))
                session.commit()
            sdb.run_transaction(lambda s: s.add(models.Item(name="c")))
            with sdb.scope(), sdb.atomic() as session:
                session.add(models.Item(name="d"))
            with sdb() as session:
                return sorted(session.scalars(select(models.Item.name)))

    assert await asyncio.to_thread(scenario) == ["a", "b", "c", "d"]
    assert_clean(db, models, outside)


async def test_async_factory_isolated_from_sync_code(
    db: SessionFactory[Any], models: Models, outside: Engine
) -> None:
    # A sync test (Starlette's TestClient) enters with a plain `with`; the app's
    # sessions run in event loops of their own, here one per asyncio.run().
    async def app_code(name: str) -> None:
        async with db.begin() as session:
            session.add(models.Item(name=name))

    def sync_test() -> list[str]:
        with isolated(db):
            asyncio.run(app_code("a"))
            asyncio.run(app_code("b"))
            return asyncio.run(async_names(db, models))

    assert await asyncio.to_thread(sync_test) == ["a", "b"]
    assert_clean(db, models, outside)


async def test_sessions_in_other_threads_and_loops_share_the_isolation(
    db: SessionFactory[Any], models: Models, outside: Engine
) -> None:
    async with isolated(db):
        async with db.begin() as session:
            session.add(models.Item(name="test-loop"))

        def other_thread() -> list[str]:
            async def app() -> list[str]:
                async with db.begin() as session:
                    session.add(models.Item(name="other-loop"))
                return await async_names(db, models)

            return asyncio.run(app())

        assert await asyncio.to_thread(other_thread) == ["other-loop", "test-loop"]
    assert_clean(db, models, outside)


# --- savepoints and rollbacks inside app code ------------------------------------------


@pytest.mark.parametrize("twin", TWINS)
async def test_nested_atomic_and_rollback_behave_as_outside(
    twin: str, db: SessionFactory[Any], models: Models, outside: Engine
) -> None:
    class Boom(Exception):
        pass

    if twin == "async":
        async with isolated(db):
            async with db.scope(), db.atomic() as session:
                session.add(models.Item(name="kept"))
                with pytest.raises(Boom):
                    async with db.atomic():
                        session.add(models.Item(name="inner-dropped"))
                        await session.flush()
                        raise Boom
                async with db.atomic():
                    session.add(models.Item(name="inner-kept"))
            async with db() as session:
                session.add(models.Item(name="rolled-back"))
                await session.flush()
                await session.rollback()
            with pytest.raises(Boom):
                async with db.begin() as session:
                    session.add(models.Item(name="raised"))
                    raise Boom
            seen = await async_names(db, models)
    else:
        sdb = db.sync

        def scenario() -> list[str]:
            with isolated(sdb):
                with sdb.scope(), sdb.atomic() as session:
                    session.add(models.Item(name="kept"))
                    with pytest.raises(Boom), sdb.atomic():
                        session.add(models.Item(name="inner-dropped"))
                        session.flush()
                        raise Boom
                    with sdb.atomic():
                        session.add(models.Item(name="inner-kept"))
                with sdb() as session:
                    session.add(models.Item(name="rolled-back"))
                    session.flush()
                    session.rollback()
                with pytest.raises(Boom), sdb.begin() as session:
                    session.add(models.Item(name="raised"))
                    raise Boom
                return names(db, models)

        seen = await asyncio.to_thread(scenario)
    assert seen == ["inner-kept", "kept"]
    assert_clean(db, models, outside)


async def test_a_failed_statement_leaves_the_isolation_usable(
    db: SessionFactory[Any], models: Models, outside: Engine
) -> None:
    # On PostgreSQL an error aborts the transaction; here only the session's SAVEPOINT.
    async with isolated(db):
        async with db.begin() as session:
            session.add(models.Item(name="dup"))
        with pytest.raises(Exception, match=r"(?i)unique"):
            async with db.begin() as session:
                session.add(models.Item(name="dup"))
        async with db.begin() as session:
            session.add(models.Item(name="after"))
        assert await async_names(db, models) == ["after", "dup"]
    assert_clean(db, models, outside)


# --- concurrent users are serialised ---------------------------------------------------


async def test_concurrent_tasks_are_serialised_not_failed(
    db: SessionFactory[Any], models: Models, outside: Engine
) -> None:
    async def increment(session: Any) -> None:
        counter = await session.get(models.Counter, 1)
        await asyncio.sleep(0)  # let the other tasks try to get in between
        counter.value += 1

    async with isolated(db):
        async with db.begin() as session:
            session.add(models.Counter(id=1, value=0))
        async with asyncio.TaskGroup() as group:
            for _ in range(10):
                group.create_task(db.run_transaction(increment, retries=0))
        async with db() as session:
            counter = await session.get(models.Counter, 1)
            assert counter is not None
            assert counter.value == 10
    assert_clean(db, models, outside)


async def test_concurrent_threads_are_serialised_not_failed(
    db: SessionFactory[Any], models: Models, outside: Engine
) -> None:
    sdb = db.sync

    def increment(session: Any) -> None:
        counter = session.get(models.Counter, 1)
        counter.value += 1

    def scenario() -> int:
        with isolated(sdb):
            with sdb.begin() as session:
                session.add(models.Counter(id=1, value=0))
            threads = [
                threading.Thread(target=sdb.run_transaction, args=(increment,)) for _ in range(8)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            with sdb() as session:
                value: int = session.scalars(select(models.Counter.value)).one()
                return value

    assert await asyncio.to_thread(scenario) == 8
    assert_clean(db, models, outside)


async def test_a_session_opened_inside_another_by_the_same_task_nests(
    db: SessionFactory[Any], models: Models, outside: Engine
) -> None:
    # Outside a test the inner session has a connection of its own; here it stacks a
    # SAVEPOINT on the outer one instead of waiting for it (which would never happen).
    async with isolated(db):
        async with db.begin() as outer:
            outer.add(models.Item(name="outer"))
            await outer.flush()
            async with db.begin() as inner:
                inner.add(models.Item(name="inner"))
            child = asyncio.create_task(db.run_transaction(lambda s: _add(s, models, "child")))
            await child
        assert await async_names(db, models) == ["child", "inner", "outer"]
    assert_clean(db, models, outside)


async def test_a_session_left_open_makes_the_next_one_fail_clearly(
    db: SessionFactory[Any], models: Models, outside: Engine
) -> None:
    async with isolated(db, lock_timeout=0.2):
        forgotten = db()
        await forgotten.execute(text("SELECT 1"))  # begins a transaction, never ended

        async def elsewhere() -> None:
            async with db.begin() as session:
                session.add(models.Item(name="x"))

        # A task of its own (not started by the test task, whose tasks would nest).
        with pytest.raises(TimeoutError, match="left open"):
            await asyncio.create_task(elsewhere(), context=contextvars.Context())
        await forgotten.close()
        await elsewhere()  # the connection is free again
    assert_clean(db, models, outside)


# --- on-commit hooks ---------------------------------------------------------------------


async def test_async_hooks_are_captured_and_run_on_demand(
    db: SessionFactory[Any], models: Models, outside: Engine
) -> None:
    ran: list[str] = []

    async def notify() -> None:
        ran.append("async")

    async with isolated(db) as iso:
        async with db.begin() as session:
            session.add(models.Item(name="a"))
            session.on_commit(lambda: ran.append("sync"))
            session.on_commit(notify)
            session.after_rollback(lambda: ran.append("never"))
        with pytest.raises(KeyError):
            async with db.begin() as session:
                session.on_commit(lambda: ran.append("rolled back: dropped"))
                session.after_rollback(lambda: ran.append("after_rollback"))
                raise KeyError
        assert ran == ["after_rollback"]  # a real rollback (of a SAVEPOINT) runs these
        assert len(iso.hooks) == 2
        assert await iso.run_hooks() == 2
        assert ran == ["after_rollback", "sync", "async"]
        assert iso.hooks == []
    assert_clean(db, models, outside)


async def test_sync_hooks_are_captured_and_run_on_demand(
    db: SessionFactory[Any], models: Models, outside: Engine
) -> None:
    ran: list[str] = []
    sdb = db.sync

    def scenario() -> None:
        with isolated(sdb) as iso:
            with sdb.begin() as session:
                session.add(models.Item(name="a"))
                sessionforge.on_commit(session, lambda: ran.append("first"))
                sessionforge.on_commit(session, lambda: ran.append("second"))
            assert ran == []
            assert iso.run_hooks() == 2
            assert ran == ["first", "second"]

    await asyncio.to_thread(scenario)
    assert_clean(db, models, outside)


async def test_run_hooks_true_runs_them_at_commit(
    db: SessionFactory[Any], models: Models, outside: Engine
) -> None:
    ran: list[str] = []
    async with isolated(db, run_hooks=True) as iso:
        async with db.begin() as session:
            session.add(models.Item(name="a"))
            session.on_commit(lambda: ran.append("ran"))
            assert ran == []
        assert ran == ["ran"]
        assert iso.hooks == []
    assert_clean(db, models, outside)


# --- per-transaction options, misuse ----------------------------------------------------


async def test_transaction_options_under_isolation(
    db: SessionFactory[Any], models: Models, backend: str, outside: Engine
) -> None:
    # The isolation level and read-only mode need a real BEGIN: a SAVEPOINT runs at
    # the test transaction's. Settings apply (PostgreSQL); a timeout still bounds the
    # block; invalid options are refused as outside.
    async with isolated(db):
        async with db.begin(isolation_level="SERIALIZABLE", readonly=True, timeout=30) as s:
            s.add(models.Item(name="a"))
        if backend == "postgres":
            async with db.begin(settings={"application_name": "iso-test"}) as s:
                name = await s.scalar(text("SELECT current_setting('application_name')"))
            assert name == "iso-test"
        with pytest.raises(ConfigurationError):
            db.begin(isolation_level="NOT A LEVEL")
        assert await async_names(db, models) == ["a"]
    assert_clean(db, models, outside)


async def test_the_other_twin_is_refused_while_one_is_isolated(
    db: SessionFactory[Any], models: Models, outside: Engine
) -> None:
    async with isolated(db):
        with pytest.raises(ConfigurationError, match="isolated"):
            db.sync()
        with pytest.raises(ConfigurationError, match="cannot nest"):
            async with isolated(db):
                pass
    with pytest.raises(ConfigurationError, match="SessionFactory"):
        isolated(object())  # type: ignore[call-overload]
    with pytest.raises(ConfigurationError, match="lock_timeout"):
        isolated(db, lock_timeout=0)
    assert_clean(db, models, outside)


# --- found in review: concurrency shapes that must wait, not fail -----------------------


async def test_session_add_while_another_session_holds_the_connection_waits(
    db: SessionFactory[Any], models: Models, outside: Engine
) -> None:
    # session.add() autobegins outside SQLAlchemy's greenlet, where nothing can wait;
    # the turn is taken at the first flush instead.
    async with isolated(db, lock_timeout=10):
        holding = asyncio.Event()

        async def first() -> None:
            async with db.begin() as session:
                session.add(models.Item(name="first"))
                await session.flush()
                holding.set()
                await asyncio.sleep(0.2)

        async def second() -> None:
            await holding.wait()
            async with db() as session:
                session.add(models.Item(name="second"))
                await session.commit()

        await asyncio.gather(first(), second())
        assert await async_names(db, models) == ["first", "second"]
    assert_clean(db, models, outside)


async def test_task_started_inside_a_transaction_may_outlive_its_commit(
    db: SessionFactory[Any], models: Models, outside: Engine
) -> None:
    # The child's SAVEPOINT sits on the parent's; the parent's commit waits for it.
    async with isolated(db, lock_timeout=10):

        async def child() -> None:
            async with db.begin() as session:
                session.add(models.Item(name="child"))
                await session.flush()
                await asyncio.sleep(0.2)

        async with db.begin() as session:
            session.add(models.Item(name="parent"))
            await session.flush()
            task = asyncio.create_task(child())
            await asyncio.sleep(0.05)
        await task
        assert await async_names(db, models) == ["child", "parent"]
    assert_clean(db, models, outside)


async def test_timeout_expiring_mid_statement_leaves_the_test_usable(
    db: SessionFactory[Any], models: Models, outside: Engine
) -> None:
    slow = (
        "SELECT pg_sleep(2)"
        if db.url.get_backend_name() == "postgresql"
        else "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 3000000) "
        "SELECT count(*) FROM c"
    )
    async with isolated(db):
        async with db.begin() as session:
            session.add(models.Item(name="before"))
        with pytest.raises(sessionforge.TransactionTimeoutError):
            async with db.begin(timeout=0.1) as session:
                session.add(models.Item(name="timed out"))
                await session.execute(text(slow))
        async with db.begin() as session:
            session.add(models.Item(name="after"))
        assert await async_names(db, models) == ["after", "before"]
    assert_clean(db, models, outside)
