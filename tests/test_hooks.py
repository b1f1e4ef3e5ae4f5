"""On-commit and after-rollback hooks (``sessionforge.on_commit`` and friends).

Every scenario that touches the database runs on each backend and, unless it is about
one twin only, through the async factory and through its sync twin. What a hook saw is
recorded in a plain list; committed rows are checked from an independent connection.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session

import sessionforge
from sessionforge import ConfigurationError, HookError, SessionFactory

from .conftest import count_rows
from .models import Models

TWINS = [pytest.param("async", id="async"), pytest.param("sync", id="sync")]


class Boom(Exception):
    """An application error raised inside a block."""


class Flaky(Exception):
    """A transient error that ``run_transaction`` is told to retry."""


def item_names(engine: Engine, table: str) -> list[str]:
    """The names in the item table, as an independent connection sees them."""
    with engine.connect() as connection:
        return sorted(connection.execute(text(f"SELECT name FROM {table}")).scalars())


def sync_twin(db: SessionFactory[Any]) -> Any:
    """``db.sync``, loosely typed: its sessions have ``on_commit()``/``after_rollback()``
    methods, which the declared ``Session`` type does not show."""
    return db.sync


def hook_logs(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == "sessionforge.hooks"]


# --- on_commit: when hooks run ----------------------------------------------------------


@pytest.mark.parametrize("twin", TWINS)
async def test_on_commit_hooks_run_after_commit_in_order_before_begin_returns(
    twin: str, db: SessionFactory[Any], models: Models, outside: Engine
) -> None:
    events: list[str] = []

    def first() -> None:
        # An independent connection: it only sees the row once COMMIT has happened.
        events.append(f"first sees {count_rows(outside, models.item)} row(s)")

    def second() -> None:
        events.append("second")

    def third() -> None:
        events.append("third")

    if twin == "async":
        async with db.begin() as session:
            session.add(models.Item(name="committed"))
            sessionforge.on_commit(session, first)
            session.on_commit(second)
            await session.flush()
            sessionforge.on_commit(session, third)
            assert events == []
    else:
        with sync_twin(db).begin() as sync_session:
            sync_session.add(models.Item(name="committed"))
            sessionforge.on_commit(sync_session, first)
            sync_session.on_commit(second)
            sync_session.flush()
            sessionforge.on_commit(sync_session, third)
            assert events == []
    events.append("block returned")

    assert events == ["first sees 1 row(s)", "second", "third", "block returned"]
    assert item_names(outside, models.item) == ["committed"]


@pytest.mark.parametrize("twin", TWINS)
async def test_on_commit_hooks_never_run_when_the_block_rolls_back(
    twin: str, db: SessionFactory[Any], models: Models, outside: Engine
) -> None:
    events: list[str] = []
    with pytest.raises(Boom):
        if twin == "async":
            async with db.begin() as session:
                session.add(models.Item(name="rolled back"))
                session.on_commit(lambda: events.append("ran"))
                await session.flush()
                sessionforge.on_commit(session, lambda: events.append("ran too"))
                raise Boom
        else:
            with sync_twin(db).begin() as sync_session:
                sync_session.add(models.Item(name="rolled back"))
                sync_session.on_commit(lambda: events.append("ran"))
                sync_session.flush()
                sessionforge.on_commit(sync_session, lambda: events.append("ran too"))
                raise Boom

    assert events == []
    assert count_rows(outside, models.item) == 0
    assert db.status().checked_out == 0
    assert db.sync.status().checked_out == 0


@pytest.mark.parametrize("twin", TWINS)
async def test_on_commit_hooks_never_run_when_the_session_closes_without_commit(
    twin: str, db: SessionFactory[Any], models: Models, outside: Engine
) -> None:
    events: list[str] = []
    if twin == "async":
        async with db() as session:
            session.add(models.Item(name="never committed"))
            session.on_commit(lambda: events.append("after add"))
            await session.flush()
            session.on_commit(lambda: events.append("after flush"))
            session.after_rollback(lambda: events.append("discarded"))
        events.append("closed")
        # The session may be used again after close(): the old hooks stay gone.
        async with session.begin():
            session.add(models.Item(name="later"))
        await session.close()
    else:
        with sync_twin(db)() as sync_session:
            sync_session.add(models.Item(name="never committed"))
            sync_session.on_commit(lambda: events.append("after add"))
            sync_session.flush()
            sync_session.on_commit(lambda: events.append("after flush"))
            sync_session.after_rollback(lambda: events.append("discarded"))
        events.append("closed")
        with sync_session.begin():
            sync_session.add(models.Item(name="later"))
        sync_session.close()

    # Closing without committing discards the transaction: after_rollback hooks run.
    assert events == ["discarded", "closed"]
    assert item_names(outside, models.item) == ["later"]


async def test_async_hooks_are_awaited_in_registration_order_before_begin_returns(
    db: SessionFactory[Any], models: Models, outside: Engine
) -> None:
    events: list[str] = []

    async def first() -> None:
        await asyncio.sleep(0)
        events.append("async first")

    def second() -> None:
        events.append("sync second")

    async def third() -> None:
        await asyncio.sleep(0.01)  # a real wait: later hooks must not overtake it
        events.append(f"async third sees {count_rows(outside, models.item)} row(s)")

    def fourth() -> None:
        events.append("sync fourth")

    async with db.begin() as session:
        session.add(models.Item(name="committed"))
        session.on_commit(first)
        sessionforge.on_commit(session, second)
        await session.flush()
        sessionforge.on_commit(session, third)
        session.on_commit(fourth)
    events.append("block returned")

    assert events == [
        "async first",
        "sync second",
        "async third sees 1 row(s)",
        "sync fourth",
        "block returned",
    ]
    assert sessionforge.hook_errors(session) == []


async def test_async_hook_that_raises_is_recorded_and_the_rest_still_run(
    db: SessionFactory[Any], models: Models, outside: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    events: list[str] = []
    failure = Boom("async hook failed")

    async def broken() -> None:
        await asyncio.sleep(0)
        raise failure

    async def after() -> None:
        await asyncio.sleep(0)
        events.append("after")

    with caplog.at_level(logging.ERROR, logger="sessionforge.hooks"):
        async with db.begin() as session:
            session.add(models.Item(name="kept"))
            session.on_commit(broken)
            session.on_commit(after)

    assert events == ["after"]
    assert item_names(outside, models.item) == ["kept"]
    assert sessionforge.hook_errors(session) == [HookError(broken, "on_commit", failure)]
    assert [record.levelno for record in hook_logs(caplog)] == [logging.ERROR]


async def test_sync_twin_refuses_async_hooks_at_registration(
    db: SessionFactory[Any], models: Models, outside: Engine
) -> None:
    events: list[str] = []

    async def notify() -> None:
        events.append("ran")

    with sync_twin(db).begin() as session:
        session.add(models.Item(name="committed"))
        with pytest.raises(ConfigurationError, match="cannot await it") as raised:
            session.on_commit(notify)
        assert "notify" in str(raised.value)
        with pytest.raises(ConfigurationError, match="cannot await it"):
            sessionforge.on_commit(session, notify)
        with pytest.raises(ConfigurationError, match="cannot await it"):
            session.after_rollback(notify)
        with pytest.raises(ConfigurationError, match="cannot await it"):
            sessionforge.after_rollback(session, notify)

    # Refusing the hook leaves the transaction alone; nothing was registered.
    assert events == []
    assert item_names(outside, models.item) == ["committed"]
    assert sessionforge.hook_errors(session) == []


async def test_sync_hook_returning_an_awaitable_on_the_sync_twin_is_a_hook_error(
    db: SessionFactory[Any], models: Models, outside: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    async def notify() -> None:
        raise AssertionError("never awaited")

    def sneaky() -> Any:
        return notify()  # a sync function the registration check cannot see through

    with caplog.at_level(logging.ERROR, logger="sessionforge.hooks"):
        with sync_twin(db).begin() as session:
            session.add(models.Item(name="committed"))
            session.on_commit(sneaky)

    assert item_names(outside, models.item) == ["committed"]
    [error] = sessionforge.hook_errors(session)
    assert error.hook is sneaky
    assert error.kind == "on_commit"
    assert isinstance(error.error, TypeError)
    assert "outside the async factory" in str(error.error)
    assert len(hook_logs(caplog)) == 1


# --- savepoints -----------------------------------------------------------------------


@pytest.mark.parametrize("twin", TWINS)
async def test_savepoint_hooks_are_dropped_on_rollback_and_deferred_on_release(
    twin: str, db: SessionFactory[Any], models: Models, outside: Engine
) -> None:
    events: list[str] = []
    at_release: list[str] = []

    if twin == "async":
        async with db.begin() as session:
            session.add(models.Item(name="outer"))
            session.on_commit(lambda: events.append("outer, first"))
            with pytest.raises(Boom):
                async with session.begin_nested():
                    session.add(models.Item(name="rolled back"))
                    await session.flush()
                    session.on_commit(lambda: events.append("rolled-back savepoint"))
                    raise Boom
            async with session.begin_nested():
                session.add(models.Item(name="released"))
                await session.flush()
                session.on_commit(lambda: events.append("released savepoint"))
            at_release.extend(events)
            session.on_commit(lambda: events.append("outer, last"))
    else:
        with sync_twin(db).begin() as sync_session:
            sync_session.add(models.Item(name="outer"))
            sync_session.on_commit(lambda: events.append("outer, first"))
            with pytest.raises(Boom):
                with sync_session.begin_nested():
                    sync_session.add(models.Item(name="rolled back"))
                    sync_session.flush()
                    sync_session.on_commit(lambda: events.append("rolled-back savepoint"))
                    raise Boom
            with sync_session.begin_nested():
                sync_session.add(models.Item(name="released"))
                sync_session.flush()
                sync_session.on_commit(lambda: events.append("released savepoint"))
            at_release.extend(events)
            sync_session.on_commit(lambda: events.append("outer, last"))

    assert at_release == []  # releasing a SAVEPOINT is not a commit
    assert events == ["outer, first", "released savepoint", "outer, last"]
    assert item_names(outside, models.item) == ["outer", "released"]


@pytest.mark.parametrize("twin", TWINS)
async def test_released_savepoint_hook_is_dropped_when_the_enclosing_savepoint_rolls_back(
    twin: str, db: SessionFactory[Any], models: Models, outside: Engine
) -> None:
    events: list[str] = []

    if twin == "async":
        async with db.begin() as session:
            session.add(models.Item(name="outer"))
            with pytest.raises(Boom):
                async with session.begin_nested():
                    async with session.begin_nested():
                        session.add(models.Item(name="inner"))
                        session.on_commit(lambda: events.append("inner released"))
                    raise Boom
            session.on_commit(lambda: events.append("outer"))
    else:
        with sync_twin(db).begin() as sync_session:
            sync_session.add(models.Item(name="outer"))
            with pytest.raises(Boom):
                with sync_session.begin_nested():
                    with sync_session.begin_nested():
                        sync_session.add(models.Item(name="inner"))
                        sync_session.on_commit(lambda: events.append("inner released"))
                    raise Boom
            sync_session.on_commit(lambda: events.append("outer"))

    assert events == ["outer"]
    assert item_names(outside, models.item) == ["outer"]


# --- a hook that raises -----------------------------------------------------------------


@pytest.mark.parametrize("twin", TWINS)
async def test_hook_that_raises_keeps_the_commit_and_the_remaining_hooks(
    twin: str,
    db: SessionFactory[Any],
    models: Models,
    outside: Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    events: list[str] = []
    failure = ValueError("the queue is down")

    def broken() -> None:
        raise failure

    def after() -> None:
        events.append(f"after sees {count_rows(outside, models.item)} row(s)")

    with caplog.at_level(logging.ERROR, logger="sessionforge.hooks"):
        if twin == "async":
            async with db.begin() as session:
                session.add(models.Item(name="kept"))
                session.on_commit(lambda: events.append("before"))
                session.on_commit(broken)
                session.on_commit(after)
            errors = sessionforge.hook_errors(session)
        else:
            with sync_twin(db).begin() as sync_session:
                sync_session.add(models.Item(name="kept"))
                sync_session.on_commit(lambda: events.append("before"))
                sync_session.on_commit(broken)
                sync_session.on_commit(after)
            errors = sessionforge.hook_errors(sync_session)

    assert events == ["before", "after sees 1 row(s)"]
    assert item_names(outside, models.item) == ["kept"]
    assert errors == [HookError(broken, "on_commit", failure)]
    assert errors[0].error is failure
    [record] = hook_logs(caplog)
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None
    assert record.exc_info[1] is failure
    assert "on_commit" in record.getMessage()
    assert db.status().checked_out == 0
    assert db.sync.status().checked_out == 0


@pytest.mark.parametrize("twin", TWINS)
async def test_hook_errors_is_empty_for_sessions_without_failed_hooks(
    twin: str, db: SessionFactory[Any], models: Models
) -> None:
    if twin == "async":
        fresh: AsyncSession | Session = db()
        async with db.begin() as session:
            session.add(models.Item(name="x"))
            session.on_commit(lambda: None)
        used: AsyncSession | Session = session
    else:
        fresh = sync_twin(db)()
        with sync_twin(db).begin() as sync_session:
            sync_session.add(models.Item(name="x"))
            sync_session.on_commit(lambda: None)
        used = sync_session
    assert sessionforge.hook_errors(fresh) == []
    assert sessionforge.hook_errors(used) == []


# --- registration outside a transaction -------------------------------------------------


@pytest.mark.parametrize("twin", TWINS)
async def test_hook_registered_before_autobegin_runs_once_after_the_next_commit(
    twin: str, db: SessionFactory[Any], models: Models, outside: Engine
) -> None:
    events: list[int] = []

    def hook() -> None:
        events.append(count_rows(outside, models.item))

    if twin == "async":
        session = db()
        assert not session.in_transaction()
        session.on_commit(hook)
        session.add(models.Item(name="first"))
        await session.commit()
        assert events == [1]
        session.add(models.Item(name="second"))
        await session.commit()
        await session.close()
    else:
        sync_session = sync_twin(db)()
        assert not sync_session.in_transaction()
        sync_session.on_commit(hook)
        sync_session.add(models.Item(name="first"))
        sync_session.commit()
        assert events == [1]
        sync_session.add(models.Item(name="second"))
        sync_session.commit()
        sync_session.close()

    assert events == [1]
    assert item_names(outside, models.item) == ["first", "second"]


async def test_async_hook_registered_before_autobegin_is_awaited_by_commit(
    db: SessionFactory[Any], models: Models, outside: Engine
) -> None:
    events: list[str] = []

    async def hook() -> None:
        await asyncio.sleep(0)
        events.append(f"sees {count_rows(outside, models.item)} row(s)")

    session = db()
    session.on_commit(hook)
    session.add(models.Item(name="first"))
    await session.commit()
    events.append("commit returned")
    await session.close()

    assert events == ["sees 1 row(s)", "commit returned"]


@pytest.mark.parametrize("twin", TWINS)
async def test_commit_with_a_savepoint_still_open_runs_its_hooks(
    twin: str, db: SessionFactory[Any], models: Models, outside: Engine
) -> None:
    # session.commit() releases open SAVEPOINTs and commits the outermost transaction.
    events: list[str] = []
    if twin == "async":
        session = db()
        session.add(models.Item(name="outer"))
        session.on_commit(lambda: events.append("outer"))
        await session.begin_nested()
        session.add(models.Item(name="in savepoint"))
        session.on_commit(lambda: events.append("in savepoint"))
        await session.commit()
        await session.close()
    else:
        sync_session = sync_twin(db)()
        sync_session.add(models.Item(name="outer"))
        sync_session.on_commit(lambda: events.append("outer"))
        sync_session.begin_nested()
        sync_session.add(models.Item(name="in savepoint"))
        sync_session.on_commit(lambda: events.append("in savepoint"))
        sync_session.commit()
        sync_session.close()

    assert events == ["outer", "in savepoint"]
    assert item_names(outside, models.item) == ["in savepoint", "outer"]


@pytest.mark.parametrize("twin", TWINS)
async def test_on_commit_hook_registered_by_a_hook_is_not_lost(
    twin: str, db: SessionFactory[Any], models: Models
) -> None:
    # With no transaction in progress a hook attaches to the next one the session
    # begins; the hooks run after COMMIT, when the session has no transaction.
    events: list[str] = []
    if twin == "async":
        async with db.begin() as session:
            session.add(models.Item(name="first"))
            session.on_commit(
                lambda: session.on_commit(lambda: events.append("registered by a hook"))
            )
        async with session.begin():
            session.add(models.Item(name="second"))
        await session.close()
    else:
        with sync_twin(db).begin() as sync_session:
            sync_session.add(models.Item(name="first"))
            sync_session.on_commit(
                lambda: sync_session.on_commit(lambda: events.append("registered by a hook"))
            )
        with sync_session.begin():
            sync_session.add(models.Item(name="second"))
        sync_session.close()

    # Whether it runs at once or after the next commit, it runs exactly once.
    assert events == ["registered by a hook"]


@pytest.mark.parametrize("twin", TWINS)
async def test_after_rollback_hook_registered_by_an_on_commit_hook_does_not_run_on_commit(
    twin: str, db: SessionFactory[Any], models: Models, outside: Engine
) -> None:
    events: list[str] = []
    if twin == "async":
        async with db.begin() as session:
            session.add(models.Item(name="committed"))
            session.on_commit(lambda: session.after_rollback(lambda: events.append("rolled back")))
        await session.close()
    else:
        with sync_twin(db).begin() as sync_session:
            sync_session.add(models.Item(name="committed"))
            sync_session.on_commit(
                lambda: sync_session.after_rollback(lambda: events.append("rolled back"))
            )
        sync_session.close()

    assert item_names(outside, models.item) == ["committed"]
    assert events == []  # nothing rolled back


# --- after_rollback -------------------------------------------------------------------


@pytest.mark.parametrize("twin", TWINS)
async def test_after_rollback_hooks_run_on_rollback_only(
    twin: str, db: SessionFactory[Any], models: Models, outside: Engine
) -> None:
    events: list[str] = []
    with pytest.raises(Boom):
        if twin == "async":
            async with db.begin() as session:
                session.add(models.Item(name="rolled back"))
                session.after_rollback(lambda: events.append("rolled back, first"))
                await session.flush()
                sessionforge.after_rollback(session, lambda: events.append("rolled back, second"))
                session.on_commit(lambda: events.append("committed"))
                raise Boom
        else:
            with sync_twin(db).begin() as sync_session:
                sync_session.add(models.Item(name="rolled back"))
                sync_session.after_rollback(lambda: events.append("rolled back, first"))
                sync_session.flush()
                sessionforge.after_rollback(
                    sync_session, lambda: events.append("rolled back, second")
                )
                sync_session.on_commit(lambda: events.append("committed"))
                raise Boom
    assert events == ["rolled back, first", "rolled back, second"]

    events.clear()
    if twin == "async":
        async with db.begin() as session:
            session.add(models.Item(name="committed"))
            session.after_rollback(lambda: events.append("rolled back"))
    else:
        with sync_twin(db).begin() as sync_session:
            sync_session.add(models.Item(name="committed"))
            sync_session.after_rollback(lambda: events.append("rolled back"))
    assert events == []
    assert item_names(outside, models.item) == ["committed"]


@pytest.mark.parametrize("twin", TWINS)
async def test_after_rollback_hook_that_raises_is_recorded_and_the_error_still_propagates(
    twin: str, db: SessionFactory[Any], models: Models, caplog: pytest.LogCaptureFixture
) -> None:
    failure = ValueError("metrics are down")
    events: list[str] = []

    def broken() -> None:
        raise failure

    with caplog.at_level(logging.ERROR, logger="sessionforge.hooks"), pytest.raises(Boom):
        if twin == "async":
            async with db.begin() as session:
                session.add(models.Item(name="rolled back"))
                session.after_rollback(broken)
                session.after_rollback(lambda: events.append("after"))
                raise Boom
        else:
            with sync_twin(db).begin() as session:
                session.add(models.Item(name="rolled back"))
                session.after_rollback(broken)
                session.after_rollback(lambda: events.append("after"))
                raise Boom

    assert events == ["after"]
    assert sessionforge.hook_errors(session) == [HookError(broken, "after_rollback", failure)]
    [record] = hook_logs(caplog)
    assert record.levelno == logging.ERROR
    assert "after_rollback" in record.getMessage()


async def test_async_after_rollback_hooks_are_awaited(
    db: SessionFactory[Any], models: Models, outside: Engine
) -> None:
    events: list[str] = []

    async def undo() -> None:
        await asyncio.sleep(0)
        events.append("undone")

    with pytest.raises(Boom):
        async with db.begin() as session:
            session.add(models.Item(name="rolled back"))
            session.after_rollback(undo)
            raise Boom
    events.append("block raised")

    assert events == ["undone", "block raised"]
    assert count_rows(outside, models.item) == 0


@pytest.mark.parametrize("twin", TWINS)
async def test_after_rollback_in_a_savepoint_runs_when_the_savepoint_rolls_back(
    twin: str, db: SessionFactory[Any], models: Models, outside: Engine
) -> None:
    events: list[str] = []
    at_savepoint_rollback: list[str] = []

    if twin == "async":
        async with db.begin() as session:
            session.add(models.Item(name="outer"))
            session.after_rollback(lambda: events.append("outer rolled back"))
            with pytest.raises(Boom):
                async with session.begin_nested():
                    session.add(models.Item(name="inner"))
                    session.after_rollback(lambda: events.append("savepoint rolled back"))
                    raise Boom
            at_savepoint_rollback.extend(events)
    else:
        with sync_twin(db).begin() as sync_session:
            sync_session.add(models.Item(name="outer"))
            sync_session.after_rollback(lambda: events.append("outer rolled back"))
            with pytest.raises(Boom):
                with sync_session.begin_nested():
                    sync_session.add(models.Item(name="inner"))
                    sync_session.after_rollback(lambda: events.append("savepoint rolled back"))
                    raise Boom
            at_savepoint_rollback.extend(events)

    assert at_savepoint_rollback == ["savepoint rolled back"]
    assert events == ["savepoint rolled back"]  # the outer transaction committed
    assert item_names(outside, models.item) == ["outer"]


@pytest.mark.parametrize("twin", TWINS)
async def test_after_rollback_of_a_released_savepoint_runs_when_the_outer_rolls_back(
    twin: str, db: SessionFactory[Any], models: Models, outside: Engine
) -> None:
    events: list[str] = []
    with pytest.raises(Boom):
        if twin == "async":
            async with db.begin() as session:
                async with session.begin_nested():
                    session.add(models.Item(name="released"))
                    session.after_rollback(lambda: events.append("released savepoint"))
                assert events == []
                raise Boom
        else:
            with sync_twin(db).begin() as sync_session:
                with sync_session.begin_nested():
                    sync_session.add(models.Item(name="released"))
                    sync_session.after_rollback(lambda: events.append("released savepoint"))
                assert events == []
                raise Boom
    assert events == ["released savepoint"]
    assert count_rows(outside, models.item) == 0


# --- registration errors --------------------------------------------------------------


@pytest.mark.parametrize(
    "register",
    [
        pytest.param(sessionforge.on_commit, id="on_commit"),
        pytest.param(sessionforge.after_rollback, id="after_rollback"),
    ],
)
async def test_registering_on_a_foreign_session_is_refused(
    register: Any, db: SessionFactory[Any]
) -> None:
    plain = Session()
    with pytest.raises(ConfigurationError, match="needs a session made by a sessionforge"):
        register(plain, lambda: None)
    foreign = async_sessionmaker(db.engine)()
    with pytest.raises(ConfigurationError, match="AsyncSession was made elsewhere"):
        register(foreign, lambda: None)
    await foreign.close()
    plain.close()


@pytest.mark.parametrize("twin", TWINS)
async def test_registering_a_non_callable_is_refused(twin: str, db: SessionFactory[Any]) -> None:
    not_callable = cast(Any, 42)
    session: Any = db() if twin == "async" else sync_twin(db)()
    registrations = [
        session.on_commit,
        session.after_rollback,
        lambda fn: sessionforge.on_commit(session, fn),
        lambda fn: sessionforge.after_rollback(session, fn),
    ]
    for register in registrations:
        with pytest.raises(ConfigurationError, match="takes a callable, got int"):
            register(not_callable)
    if isinstance(session, AsyncSession):
        await session.close()
    else:
        session.close()


# --- run_transaction ------------------------------------------------------------------


@pytest.mark.parametrize("twin", TWINS)
async def test_run_transaction_runs_only_the_hooks_of_the_attempt_that_committed(
    twin: str, db: SessionFactory[Any], models: Models, outside: Engine
) -> None:
    attempts: list[int] = []
    committed: list[int] = []
    rolled_back: list[int] = []

    def record(session: AsyncSession | Session) -> int:
        attempts.append(len(attempts) + 1)
        attempt = attempts[-1]
        session.add(models.Item(name=f"attempt {attempt}"))
        sessionforge.on_commit(session, lambda: committed.append(attempt))
        sessionforge.after_rollback(session, lambda: rolled_back.append(attempt))
        return attempt

    async def work(session: AsyncSession) -> int:
        attempt = record(session)
        await session.flush()
        if attempt == 1:
            raise Flaky("try again")
        return attempt

    def sync_work(session: Session) -> int:
        attempt = record(session)
        session.flush()
        if attempt == 1:
            raise Flaky("try again")
        return attempt

    def retry_if(exc: BaseException) -> bool | None:
        return isinstance(exc, Flaky) or None

    if twin == "async":
        result = await db.run_transaction(work, retry_if=retry_if, backoff=0)
    else:
        result = db.sync.run_transaction(sync_work, retry_if=retry_if, backoff=0)

    assert result == 2
    assert attempts == [1, 2]
    assert committed == [2]
    assert rolled_back == [1]
    assert item_names(outside, models.item) == ["attempt 2"]
    assert db.status().checked_out == 0
    assert db.sync.status().checked_out == 0


@pytest.mark.parametrize("twin", TWINS)
async def test_closing_a_session_discards_hooks_waiting_for_a_transaction(
    twin: str, db: SessionFactory[Any], models: Models
) -> None:
    ran: list[str] = []
    if twin == "async":
        session = db()
        session.on_commit(lambda: ran.append("stale"))
        await session.close()
        async with session.begin():
            session.add(models.Item(name="later"))
    else:
        sync_session = sync_twin(db)()
        sync_session.on_commit(lambda: ran.append("stale"))
        sync_session.close()
        with sync_session.begin():
            sync_session.add(models.Item(name="later"))
    assert ran == []
