"""ping(), status(), dispose() and ``async with db`` on every backend, through both twins."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import create_async_engine

from sessionforge import DatabaseUnavailableError, SessionFactory, SyncSessionFactory

from .conftest import DbMaker, FactoryMaker
from .models import Models

TWINS = [pytest.param("async", id="async"), pytest.param("sync", id="sync")]


async def test_nothing_is_checked_out_until_first_use(make_factory: FactoryMaker) -> None:
    db = make_factory()
    session = db()
    assert db.status().checked_out == 0
    async with db.begin() as in_transaction:
        assert db.status().checked_out == 0  # BEGIN is lazy
        await in_transaction.execute(text("SELECT 1"))
        assert db.status().checked_out == 1
    await session.close()
    assert db.status().checked_out == 0


@pytest.mark.parametrize("twin", TWINS)
async def test_ping_returns_round_trip_seconds(twin: str, make_factory: FactoryMaker) -> None:
    db = make_factory()
    seconds = await db.ping() if twin == "async" else db.sync.ping()
    assert 0 < seconds < 5
    assert db.status().checked_out == 0
    assert db.sync.status().checked_out == 0


async def test_ping_leaves_the_pooled_connection_transactional(
    make_db: DbMaker, models: Models
) -> None:
    # ping() runs its SELECT in AUTOCOMMIT; the one pooled connection must come back
    # to the next user in its normal transactional mode.
    db = await make_db(pool_size=1, max_overflow=0)
    await db.ping()
    with pytest.raises(RuntimeError, match="undo"):
        async with db.begin() as session:
            session.add(models.Item(name="rolled back"))
            await session.flush()
            raise RuntimeError("undo")
    async with db() as session:
        assert await session.scalar(select(func.count()).select_from(models.Item)) == 0


@pytest.mark.parametrize("twin", TWINS)
async def test_ping_unreachable_server_raises_without_password(
    twin: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    url = "postgresql://app:hunter2@127.0.0.1:1/shop"
    db = SessionFactory(url)
    try:
        with pytest.raises(DatabaseUnavailableError) as raised:
            if twin == "async":
                await db.ping(timeout=5)
            else:
                db.sync.ping()
        message = str(raised.value)
        assert message.startswith("cannot reach the database at postgresql+")
        assert "app:***@127.0.0.1:1/shop" in message
        assert "check that the server is up" in message
        assert isinstance(raised.value, ConnectionError)
        assert "hunter2" not in message
        assert "hunter2" not in caplog.text
    finally:
        await db.dispose()


@pytest.mark.postgres
async def test_ping_timeout_is_a_database_unavailable_error(pg_url: str) -> None:
    db = SessionFactory(pg_url)
    try:
        with pytest.raises(DatabaseUnavailableError, match=r"no answer within 1e-06s"):
            await db.ping(timeout=0.000001)
        assert db.status().checked_out == 0
    finally:
        await db.dispose()


@pytest.mark.parametrize("twin", TWINS)
async def test_status_reports_the_pool(twin: str, make_factory: FactoryMaker) -> None:
    db = make_factory()
    if twin == "async":
        async with db() as session:
            await session.execute(text("SELECT 1"))
            status = db.status()
    else:
        with db.sync() as sync_session:
            sync_session.execute(text("SELECT 1"))
            status = db.sync.status()
    assert status.checked_out == 1
    (engine,) = status.engines
    assert engine.role == twin
    assert engine.checked_out == 1
    assert engine.pool in ("AsyncAdaptedQueuePool", "QueuePool")
    assert engine.size is not None
    assert engine.size >= 1
    after = db.status() if twin == "async" else db.sync.status()
    assert after.checked_out == 0
    assert after.engines[0].checked_in == 1


async def test_status_lists_both_engines_once_built(make_factory: FactoryMaker) -> None:
    db = make_factory()
    assert db.status().engines == ()
    await db.ping()
    db.sync.ping()
    assert [engine.role for engine in db.status().engines] == ["async", "sync"]


def test_status_masks_the_password() -> None:
    db = SessionFactory("postgresql://app:hunter2@127.0.0.1:1/shop")
    _ = db.engine, db.sync.engine  # built, never connected
    for engine in db.status().engines:
        assert engine.url.endswith("app:***@127.0.0.1:1/shop")
    assert "hunter2" not in repr(db.status())


async def test_dispose_closes_pooled_connections_and_factory_stays_usable(
    make_factory: FactoryMaker,
) -> None:
    db = make_factory()
    await db.ping()
    db.sync.ping()
    first_engine = db.engine
    # Capture the pools: dispose() gives an engine a new, empty pool.
    async_pool: Any = first_engine.pool
    sync_pool: Any = db.sync.engine.pool
    assert (async_pool.checkedin(), sync_pool.checkedin()) == (1, 1)
    await db.dispose()
    assert db.status().engines == ()
    assert (async_pool.checkedin(), sync_pool.checkedin()) == (0, 0)
    await db.ping()  # a fresh engine
    assert db.engine is not first_engine


async def test_async_with_disposes_at_exit(make_factory: FactoryMaker) -> None:
    db = make_factory()
    async with db as same:
        assert same is db
        await db.ping()
        pool: Any = db.engine.pool
        assert pool.checkedin() == 1
    assert pool.checkedin() == 0
    assert db.status().engines == ()


def test_sync_with_disposes_the_sync_engine(tmp_path: Any) -> None:
    with SyncSessionFactory(f"sqlite:///{tmp_path / 'x.db'}") as sdb:
        sdb.ping()
        engine = sdb.engine
        pool: Any = engine.pool
        assert pool.checkedin() == 1
    assert pool.checkedin() == 0


async def test_user_engine_is_not_disposed(tmp_path: Any) -> None:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}")
    db = SessionFactory(engine)
    await db.ping()
    await db.dispose()
    pool: Any = engine.pool
    assert pool.checkedin() == 1
    assert db.engine is engine
    await engine.dispose()


@pytest.mark.parametrize("twin", TWINS)
async def test_status_counts_sessions_and_transactions(
    twin: str, make_factory: FactoryMaker
) -> None:
    db = make_factory()
    factory: Any = db if twin == "async" else db.sync

    async def run(context: Any, sql: str | None = None, fail: bool = False) -> None:
        class Boom(Exception):
            pass

        try:
            if twin == "async":
                async with context as session:
                    if sql:
                        await session.execute(text(sql))
                    if fail:
                        raise Boom
            else:
                with context as session:
                    if sql:
                        session.execute(text(sql))
                    if fail:
                        raise Boom
        except Boom:
            pass

    first, second = factory(), factory()
    assert db.status().sessions_open == 2
    await run(factory.begin(), "SELECT 1")  # committed
    await run(factory.begin(), "SELECT 1", fail=True)  # rolled back
    await run(factory.begin())  # nothing reached the database: not counted
    await run(factory(), "SELECT 1")  # closed without commit: a rollback
    status = db.status()
    assert (status.transactions_committed, status.transactions_rolled_back) == (1, 2)
    assert status.sessions_open == 2
    for session in (first, second):
        if twin == "async":
            await session.close()
        else:
            session.close()
    assert db.status().sessions_open == 0

    attempts: list[int] = []

    def flaky(session: Any) -> int:
        attempts.append(1)
        if len(attempts) < 3:
            raise LookupError("again")
        return len(attempts)

    async def aflaky(session: Any) -> int:
        return flaky(session)

    retry_if = lambda exc: isinstance(exc, LookupError)  # noqa: E731
    if twin == "async":
        assert await db.run_transaction(aflaky, backoff=0, retry_if=retry_if) == 3
    else:
        assert db.sync.run_transaction(flaky, backoff=0, retry_if=retry_if) == 3
    assert db.status().transactions_retried == 2
    assert db.status().sessions_open == 0
