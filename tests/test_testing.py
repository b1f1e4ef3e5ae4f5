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
import time
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
        with pytest.raises(Exception, match=r"(?i)unique|duplicate entry"):
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
    slow = {
        "postgresql": "SELECT pg_sleep(2)",
        "mysql": "SELECT SLEEP(2)",
    }.get(
        db.url.get_backend_name(),
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 3000000) "
        "SELECT count(*) FROM c",
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


# --- sessions that outlive the block ----------------------------------------------------

ENDED = r"isolated\(\) block ended while this session was still open"
WAITING = r"isolated\(\) block ended while this session was waiting for its turn"


@pytest.mark.parametrize("twin", TWINS)
async def test_a_session_left_open_at_exit_is_reported_and_refused_afterwards(
    twin: str, db: SessionFactory[Any], models: Models, outside: Engine
) -> None:
    # The exit rolls everything back at once and warns; the forgotten session, used
    # again, says why it cannot work instead of a SQLAlchemy error about SAVEPOINTs.
    if twin == "async":
        with pytest.warns(RuntimeWarning, match=r"1 session was still open"):
            async with isolated(db):
                left = db()
                left.add(models.Item(name="left"))
                await left.flush()
        assert_clean(db, models, outside)
        with pytest.raises(sessionforge.SessionClosedError, match=ENDED):
            await left.execute(select(models.Item.name))
        with pytest.raises(sessionforge.SessionClosedError, match=ENDED):
            await left.commit()
        await left.rollback()  # quiet, as is close()
        await left.close()
    else:
        sdb = db.sync

        def scenario() -> None:
            with pytest.warns(RuntimeWarning, match=r"1 session was still open"):
                with isolated(sdb):
                    left = sdb()
                    left.add(models.Item(name="left"))
                    left.flush()
            with pytest.raises(sessionforge.SessionClosedError, match=ENDED):
                left.execute(select(models.Item.name))
            with pytest.raises(sessionforge.SessionClosedError, match=ENDED):
                left.commit()
            left.rollback()
            left.close()

        await asyncio.to_thread(scenario)
    assert_clean(db, models, outside)
    assert db.status().sessions_open == 0


@pytest.mark.parametrize("twin", TWINS)
async def test_a_closed_session_used_after_the_block_is_refused(
    twin: str, db: SessionFactory[Any], models: Models, outside: Engine
) -> None:
    # Nothing was open at exit, so no warning; the session is still bound to the
    # connection of the block, which is gone.
    if twin == "async":
        async with isolated(db):
            async with db.begin() as session:
                session.add(models.Item(name="a"))
        with pytest.raises(sessionforge.SessionClosedError, match="isolated"):
            await session.execute(select(models.Item.name))
        await session.close()
    else:
        sdb = db.sync

        def scenario() -> None:
            with isolated(sdb):
                with sdb.begin() as session:
                    session.add(models.Item(name="a"))
            with pytest.raises(sessionforge.SessionClosedError, match="isolated"):
                session.execute(select(models.Item.name))
            session.close()

        await asyncio.to_thread(scenario)
    assert_clean(db, models, outside)


@pytest.mark.parametrize(
    "ending",
    [
        pytest.param("commits", id="commits-later"),
        pytest.param("raises", id="raises-later"),
        pytest.param("cancelled", id="cancelled-later"),
    ],
)
async def test_a_task_still_in_a_transaction_at_exit_fails_clearly_later(
    ending: str, db: SessionFactory[Any], models: Models, outside: Engine
) -> None:
    flushed, go_on = asyncio.Event(), asyncio.Event()

    async def app_task() -> None:
        async with db.begin() as session, session.begin_nested():  # a SAVEPOINT of its own
            session.add(models.Item(name="late"))
            await session.flush()
            flushed.set()
            await go_on.wait()
            if ending == "raises":
                raise KeyError("app error")
            session.add(models.Item(name="later"))

    with pytest.warns(RuntimeWarning, match=r"1 session was still open"):
        async with isolated(db):
            task = asyncio.create_task(app_task())
            await flushed.wait()
    assert_clean(db, models, outside)
    if ending == "cancelled":
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    else:
        go_on.set()
        expected = sessionforge.SessionClosedError if ending == "commits" else KeyError
        with pytest.raises(expected, match=ENDED if ending == "commits" else "app error"):
            await task
    # The session was closed on the way out, quietly (warnings are errors here).
    assert db.status().sessions_open == 0
    assert_clean(db, models, outside)


async def test_a_thread_still_in_a_transaction_at_exit_fails_clearly_later(
    db: SessionFactory[Any], models: Models, outside: Engine
) -> None:
    sdb = db.sync
    flushed, go_on = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def app_thread() -> None:
        try:
            with sdb.begin() as session:
                session.add(models.Item(name="late"))
                session.flush()
                flushed.set()
                go_on.wait(10)
                session.add(models.Item(name="later"))
        except BaseException as error:
            errors.append(error)

    def scenario() -> None:
        thread = threading.Thread(target=app_thread)
        with pytest.warns(RuntimeWarning, match=r"1 session was still open"):
            with isolated(sdb):
                thread.start()
                flushed.wait(10)
        go_on.set()
        thread.join()

    await asyncio.to_thread(scenario)
    assert len(errors) == 1
    assert isinstance(errors[0], sessionforge.SessionClosedError)
    assert "await the tasks" in str(errors[0])
    assert db.status().sessions_open == 0
    assert_clean(db, models, outside)


@pytest.mark.parametrize("twin", TWINS)
async def test_sessions_waiting_for_the_connection_at_exit_are_woken_at_once(
    twin: str, db: SessionFactory[Any], models: Models, outside: Engine
) -> None:
    # The waiter would otherwise sit out its whole lock_timeout (30 s).
    waited: list[float] = []

    async def async_waiter() -> None:
        started = time.monotonic()
        try:
            async with db.begin() as session:
                session.add(models.Item(name="waiter"))
        finally:
            waited.append(time.monotonic() - started)

    def sync_waiter() -> None:
        started = time.monotonic()
        try:
            with db.sync.begin() as session:
                session.add(models.Item(name="waiter"))
                session.flush()
        finally:
            waited.append(time.monotonic() - started)

    if twin == "async":
        with pytest.warns(RuntimeWarning, match=r"2 sessions were still open"):
            async with isolated(db, lock_timeout=30):
                holder = db()
                await holder.execute(text("SELECT 1"))
                task = asyncio.create_task(async_waiter(), context=contextvars.Context())
                await asyncio.sleep(0.2)
                assert not task.done()
        with pytest.raises(sessionforge.SessionClosedError, match=WAITING):
            await task
        await holder.close()
    else:
        sdb = db.sync

        def scenario() -> None:
            outcome: list[BaseException] = []

            def run() -> None:
                try:
                    sync_waiter()
                except BaseException as error:
                    outcome.append(error)

            thread = threading.Thread(target=run)
            with pytest.warns(RuntimeWarning, match=r"2 sessions were still open"):
                with isolated(sdb, lock_timeout=30):
                    holder = sdb()
                    holder.execute(text("SELECT 1"))
                    thread.start()
                    time.sleep(0.2)
                    assert thread.is_alive()
            thread.join(10)
            assert len(outcome) == 1
            assert isinstance(outcome[0], sessionforge.SessionClosedError)
            assert "waiting for its turn" in str(outcome[0])
            holder.close()

        await asyncio.to_thread(scenario)
    assert len(waited) == 1
    assert waited[0] < 5
    assert db.status().sessions_open == 0
    assert_clean(db, models, outside)


async def test_no_leftover_warning_when_the_block_raises(
    db: SessionFactory[Any], models: Models, outside: Engine
) -> None:
    # The test's own failure is what matters; a session it left open is most likely a
    # consequence (warnings are errors here, so a warning would fail this test).
    with pytest.raises(KeyError):
        async with isolated(db):
            left = db()
            await left.execute(text("SELECT 1"))
            raise KeyError
    await left.close()
    assert_clean(db, models, outside)


# --- a holder that can never release ---------------------------------------------------


@pytest.mark.parametrize("twin", TWINS)
async def test_a_garbage_collected_holder_fails_the_next_session_at_once(
    twin: str, db: SessionFactory[Any], models: Models, outside: Engine
) -> None:
    # An endpoint that never closed its session: once the session is garbage, nothing
    # can end its transaction, so waiting out lock_timeout (30 s) would only hide it.
    async def leaky_request() -> None:
        session = db()
        await session.execute(text("SELECT 1"))

    def leaky_sync_request() -> None:
        session = db.sync()
        session.execute(text("SELECT 1"))

    started = time.monotonic()
    if twin == "async":
        async with isolated(db, lock_timeout=30):
            await asyncio.create_task(leaky_request(), context=contextvars.Context())
            with pytest.raises(TimeoutError, match="garbage-collected"):
                async with db.begin() as session:
                    session.add(models.Item(name="next"))
    else:
        sdb = db.sync

        def scenario() -> None:
            with isolated(sdb, lock_timeout=30):
                thread = threading.Thread(target=leaky_sync_request)
                thread.start()
                thread.join()
                with pytest.raises(TimeoutError, match="garbage-collected"), sdb.begin() as s:
                    s.add(models.Item(name="next"))
                    s.flush()

        await asyncio.to_thread(scenario)
    assert time.monotonic() - started < 10
    assert_clean(db, models, outside)


@pytest.mark.parametrize("twin", TWINS)
async def test_a_slow_holder_is_still_waited_for(
    twin: str, db: SessionFactory[Any], models: Models, outside: Engine
) -> None:
    # Longer than the interval at which a waiter looks for a garbage-collected holder.
    if twin == "async":
        async with isolated(db, lock_timeout=30):
            holding = asyncio.Event()

            async def slow() -> None:
                async with db.begin() as session:
                    session.add(models.Item(name="slow"))
                    await session.flush()
                    holding.set()
                    await asyncio.sleep(1.5)

            async def waiter() -> None:
                await holding.wait()
                async with db.begin() as session:
                    session.add(models.Item(name="waiter"))

            await asyncio.gather(
                asyncio.create_task(slow(), context=contextvars.Context()),
                asyncio.create_task(waiter(), context=contextvars.Context()),
            )
            assert await async_names(db, models) == ["slow", "waiter"]
    else:
        sdb = db.sync

        def scenario() -> list[str]:
            holding = threading.Event()

            def slow() -> None:
                with sdb.begin() as session:
                    session.add(models.Item(name="slow"))
                    session.flush()
                    holding.set()
                    time.sleep(1.5)

            with isolated(sdb, lock_timeout=30):
                thread = threading.Thread(target=slow)
                thread.start()
                holding.wait(10)
                with sdb.begin() as session:
                    session.add(models.Item(name="waiter"))
                thread.join()
                return names(db, models)

        assert await asyncio.to_thread(scenario) == ["slow", "waiter"]
    assert_clean(db, models, outside)


async def test_a_turn_granted_just_as_the_block_ends_is_refused() -> None:
    """The holder's transaction ends at the moment the block exits: the session waiting
    for its turn must not go on to use the connection being closed."""
    from sessionforge.testing._lock import ConnectionLock as _ConnectionLock  # only reachable here

    class Transaction:  # stands for a SessionTransaction (weakly referenced)
        pass

    lock = _ConnectionLock(5)
    holder, waiter = Transaction(), Transaction()
    held = threading.Thread(target=lock.acquire, args=(holder,))
    held.start()  # a context of its own, as another thread's session would have
    held.join()
    waiting = asyncio.create_task(lock.acquire_async(waiter))
    await asyncio.sleep(0.1)

    def end_of_block() -> None:
        lock.release(holder)  # grants the turn to the waiter...
        lock.close()  # ...as the block ends, before the waiter has resumed

    end_of_block()  # on this loop's thread: the waiter cannot resume in between
    with pytest.raises(
        sessionforge.SessionClosedError, match="ended while this session was waiting"
    ):
        await waiting
