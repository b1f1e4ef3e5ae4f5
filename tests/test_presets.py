"""Dialect presets (DESIGN.md §5): SQLite pragmas and BEGIN policy, PostgreSQL settings."""

from __future__ import annotations

import asyncio
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, select, text
from sqlalchemy.pool import NullPool

from sessionforge import DatabaseUnavailableError, SessionFactory

from .conftest import count_rows
from .models import Models, make_models

TWINS = [pytest.param("async", id="async"), pytest.param("sync", id="sync")]


async def pragma(db: SessionFactory[Any], twin: str, name: str) -> Any:
    if twin == "async":
        async with db() as session:
            return (await session.execute(text(f"PRAGMA {name}"))).scalar()
    with db.sync() as sync_session:
        return sync_session.execute(text(f"PRAGMA {name}")).scalar()


# --- SQLite pragmas -------------------------------------------------------------------


@pytest.mark.parametrize("twin", TWINS)
async def test_sqlite_file_defaults(twin: str, tmp_path: Path) -> None:
    db = SessionFactory(f"sqlite:///{tmp_path / 'app.db'}")
    try:
        assert await pragma(db, twin, "journal_mode") == "wal"
        assert await pragma(db, twin, "synchronous") == 1  # NORMAL
        assert await pragma(db, twin, "foreign_keys") == 1
        assert await pragma(db, twin, "busy_timeout") == 5000
    finally:
        await db.dispose()


@pytest.mark.parametrize("twin", TWINS)
async def test_sqlite_presets_are_overridable(twin: str, tmp_path: Path) -> None:
    db = SessionFactory(
        f"sqlite:///{tmp_path / 'app.db'}",
        sqlite_journal_mode="delete",
        sqlite_synchronous="FULL",
        sqlite_foreign_keys=False,
        sqlite_busy_timeout=0.25,
    )
    try:
        assert await pragma(db, twin, "journal_mode") == "delete"
        assert await pragma(db, twin, "synchronous") == 2
        assert await pragma(db, twin, "foreign_keys") == 0
        assert await pragma(db, twin, "busy_timeout") == 250
    finally:
        await db.dispose()


async def test_sqlite_memory_is_one_database_for_both_twins() -> None:
    db = SessionFactory("sqlite://")
    models = make_models("mem")
    try:
        async with db.engine.begin() as connection:
            await connection.run_sync(models.metadata.create_all)
        assert await pragma(db, "async", "journal_mode") == "memory"
        async with db.begin() as session:
            session.add(models.Item(name="written async"))
        with db.sync() as sync_session:
            names = sync_session.scalars(select(models.Item.name)).all()
        assert names == ["written async"]
        assert db.status().engines[0].size == 1
    finally:
        await db.dispose()


async def test_sqlite_memory_serialises_concurrent_transactions() -> None:
    db = SessionFactory("sqlite://")
    models = make_models("serial")
    order: list[str] = []
    try:
        async with db.engine.begin() as connection:
            await connection.run_sync(models.metadata.create_all)

        async def first() -> None:
            async with db.begin() as session:
                session.add(models.Item(name="first"))
                await session.flush()
                order.append("first wrote")
                await asyncio.sleep(0.2)  # holds the one connection
                order.append("first commits")

        async def second() -> None:
            await asyncio.sleep(0.05)
            async with db.begin() as session:
                seen = await session.scalar(select(models.Item.name))
                order.append(f"second saw {seen}")

        await asyncio.gather(first(), second())
        assert order == ["first wrote", "first commits", "second saw first"]
    finally:
        await db.dispose()


# --- SQLite BEGIN policy --------------------------------------------------------------


def outside_write_lock_free(path: Path) -> bool:
    """Try to take SQLite's write lock from another connection, without waiting."""
    connection = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        connection.execute("BEGIN IMMEDIATE")
        connection.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError as exc:
        if "locked" not in str(exc):
            raise
        return False
    finally:
        connection.close()


@pytest.mark.parametrize("twin", TWINS)
@pytest.mark.parametrize(
    ("mode", "lock_taken"),
    [
        pytest.param("immediate", True, id="immediate"),
        pytest.param("deferred", False, id="deferred"),
    ],
)
async def test_sqlite_begin_takes_the_write_lock_up_front(
    twin: str, mode: Any, lock_taken: bool, tmp_path: Path
) -> None:
    path = tmp_path / "lock.db"
    db = SessionFactory(f"sqlite:///{path}", sqlite_begin=mode)
    try:
        if twin == "async":
            async with db.begin() as session:
                await session.execute(text("SELECT 1"))  # a read only
                assert outside_write_lock_free(path) is not lock_taken
        else:
            with db.sync.begin() as sync_session:
                sync_session.execute(text("SELECT 1"))
                assert outside_write_lock_free(path) is not lock_taken
        assert outside_write_lock_free(path)
    finally:
        await db.dispose()


async def test_sqlite_autocommit_engine_emits_no_begin(tmp_path: Path) -> None:
    path = tmp_path / "auto.db"
    db = SessionFactory(f"sqlite:///{path}", isolation_level="AUTOCOMMIT")
    try:
        async with db.begin() as session:
            await session.execute(text("SELECT 1"))
            assert outside_write_lock_free(path)
    finally:
        await db.dispose()


async def test_sqlite_increments_are_exact_under_concurrency(tmp_path: Path) -> None:
    """10 tasks x 50 read-modify-write increments through db.begin(): exactly 500."""
    db = SessionFactory(f"sqlite:///{tmp_path / 'counter.db'}")
    models = make_models("inc")
    try:
        async with db.engine.begin() as connection:
            await connection.run_sync(models.metadata.create_all)
        async with db.begin() as session:
            session.add(models.Counter(id=1, value=0))

        async def worker() -> None:
            for _ in range(50):
                async with db.begin() as session:
                    counter = await session.get(models.Counter, 1)
                    assert counter is not None
                    counter.value += 1

        await asyncio.gather(*(worker() for _ in range(10)))  # any error fails the test
        async with db() as session:
            assert await session.scalar(select(models.Counter.value)) == 500
        assert db.status().checked_out == 0
    finally:
        await db.dispose()


async def test_sqlite_increments_are_exact_with_sync_twin_threads(tmp_path: Path) -> None:
    """The same through db.sync.begin() from 10 threads."""
    db = SessionFactory(f"sqlite:///{tmp_path / 'counter.db'}")
    models = make_models("incs")
    sdb = db.sync
    try:
        models.metadata.create_all(sdb.engine)
        with sdb.begin() as session:
            session.add(models.Counter(id=1, value=0))

        def worker() -> None:
            for _ in range(50):
                with sdb.begin() as session:
                    counter = session.get(models.Counter, 1)
                    assert counter is not None
                    counter.value += 1

        with ThreadPoolExecutor(max_workers=10) as pool:
            for future in [pool.submit(worker) for _ in range(10)]:
                future.result()
        with sdb() as session:
            assert session.scalar(select(models.Counter.value)) == 500
        assert sdb.status().checked_out == 0
    finally:
        await db.dispose()


# --- SAVEPOINTs, all backends ---------------------------------------------------------


@pytest.mark.parametrize("twin", TWINS)
async def test_savepoint_rollback_keeps_the_outer_transaction(
    twin: str, db: SessionFactory[Any], models: Models, outside: Any
) -> None:
    # Plain aiosqlite/pysqlite gets this wrong (no real BEGIN, so no real SAVEPOINT).
    if twin == "async":
        async with db.begin() as session:
            session.add(models.Item(name="outer"))
            nested = await session.begin_nested()
            session.add(models.Item(name="inner"))
            await session.flush()
            await nested.rollback()
    else:
        with db.sync.begin() as sync_session:
            sync_session.add(models.Item(name="outer"))
            sync_nested = sync_session.begin_nested()
            sync_session.add(models.Item(name="inner"))
            sync_session.flush()
            sync_nested.rollback()
    with outside.connect() as connection:
        names = connection.execute(text(f"SELECT name FROM {models.item}")).scalars().all()
    assert names == ["outer"]


async def test_foreign_keys_are_enforced_on_every_backend(
    db: SessionFactory[Any], models: Models, outside: Any
) -> None:
    from sqlalchemy.exc import IntegrityError

    with pytest.raises(IntegrityError):
        async with db.begin() as session:
            session.add(models.Child(id=1, parent_id=404))
    assert count_rows(outside, models.child) == 0


# --- PostgreSQL -----------------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.parametrize("twin", TWINS)
async def test_postgres_application_name(twin: str, pg_url: str, prefix: str) -> None:
    db = SessionFactory(pg_url, application_name=f"{prefix}-app")
    query = text("SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()")
    try:
        if twin == "async":
            async with db() as session:
                name = await session.scalar(query)
        else:
            with db.sync() as sync_session:
                name = sync_session.scalar(query)
        assert name == f"{prefix}-app"
    finally:
        await db.dispose()


@pytest.mark.postgres
async def test_postgres_pgbouncer_mode_keeps_no_named_statements(pg_url: str) -> None:
    names_query = text("SELECT name FROM pg_prepared_statements")

    async def statements_after_three_transactions(db: SessionFactory[Any]) -> list[str]:
        for value in range(3):
            async with db.begin() as session:
                await session.execute(text("SELECT 1 + :x"), {"x": value})
        async with db.begin() as session:
            return list((await session.execute(names_query)).scalars().all())

    plain = SessionFactory(pg_url, pool_size=1, max_overflow=0)
    bouncer = SessionFactory(pg_url, pool_size=1, max_overflow=0, pgbouncer=True)
    try:
        cached = await statements_after_three_transactions(plain)
        assert any(name.startswith("__asyncpg_stmt_") for name in cached)  # the contrast
        # Only the statement running right now, under a name used once.
        names = await statements_after_three_transactions(bouncer)
        assert len(names) == 1
        assert names[0].startswith("__sessionforge_")
    finally:
        await plain.dispose()
        await bouncer.dispose()


def terminate(pg_url: str, pid: int) -> None:
    engine = create_engine(SessionFactory(pg_url).config.sync_url, poolclass=NullPool)
    with engine.connect() as connection:
        assert connection.scalar(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    engine.dispose()


PID = text("SELECT pg_backend_pid()")


@pytest.mark.postgres
@pytest.mark.parametrize("twin", TWINS)
async def test_postgres_ping_after_zero_hides_a_killed_connection(twin: str, pg_url: str) -> None:
    db = SessionFactory(pg_url, ping_after=0, pool_size=1, max_overflow=0)
    try:
        if twin == "async":
            async with db() as session:
                killed = await session.scalar(PID)
            terminate(pg_url, killed)
            async with db() as session:  # no caller sees the kill
                replacement = await session.scalar(PID)
        else:
            with db.sync() as sync_session:
                killed = sync_session.scalar(PID)
            terminate(pg_url, killed)
            with db.sync() as sync_session:
                replacement = sync_session.scalar(PID)
        assert replacement != killed
    finally:
        await db.dispose()


@pytest.mark.postgres
@pytest.mark.parametrize("twin", TWINS)
async def test_postgres_default_policy_lets_at_most_one_caller_see_a_kill(
    twin: str, pg_url: str
) -> None:
    # The default pings only connections idle for over a second: this one was used
    # moments ago, so the first caller meets the dead connection, and the pool
    # replaces it for the next.
    db = SessionFactory(pg_url, pool_size=1, max_overflow=0)
    try:
        if twin == "async":
            async with db() as session:
                killed = await session.scalar(PID)
            terminate(pg_url, killed)
            with pytest.raises(DatabaseUnavailableError) as raised:
                async with db() as session:
                    await session.scalar(PID)
            async with db() as session:
                replacement = await session.scalar(PID)
        else:
            with db.sync() as sync_session:
                killed = sync_session.scalar(PID)
            terminate(pg_url, killed)
            with pytest.raises(DatabaseUnavailableError) as raised, db.sync() as sync_session:
                sync_session.scalar(PID)
            with db.sync() as sync_session:
                replacement = sync_session.scalar(PID)
        # The driver's error is chained (DESIGN §9); the connection was replaced.
        assert "terminating connection" in str(raised.value.__cause__)
        assert replacement != killed
        assert db.status().checked_out == 0
    finally:
        await db.dispose()


@pytest.mark.postgres
async def test_postgres_idle_connection_is_pinged_after_threshold(pg_url: str) -> None:
    db = SessionFactory(pg_url, ping_after=0.2, pool_size=1, max_overflow=0)
    try:
        async with db() as session:
            killed = await session.scalar(PID)
        terminate(pg_url, killed)
        await asyncio.sleep(0.3)  # idle past the threshold: pinged, replaced
        async with db() as session:
            assert await session.scalar(PID) != killed
    finally:
        await db.dispose()


@pytest.mark.postgres
async def test_postgres_server_killing_idle_connections_is_hidden_like_pre_ping(
    pg_url: str, prefix: str
) -> None:
    # The server (an idle timeout, a failover, an admin) kills every pooled connection
    # while the pool sits idle past ping_after. Like pool_pre_ping=True, the policy
    # replaces them at checkout: no caller sees an error.
    from sqlalchemy.ext.asyncio import create_async_engine

    name = f"{prefix}-idle"
    db = SessionFactory(pg_url, application_name=name, ping_after=0.2, pool_size=3)
    pinged = create_async_engine(
        db.url,
        pool_pre_ping=True,
        pool_size=3,
        connect_args={"server_settings": {"application_name": f"{name}-pp"}},
    )
    killer = create_engine(SessionFactory(pg_url).config.sync_url, poolclass=NullPool)

    async def pids_of_three(connect: Any) -> set[int]:
        async def one() -> int:
            async with connect() as connection:
                await asyncio.sleep(0.05)  # three at once: three connections
                return int(await connection.scalar(PID))

        return set(await asyncio.gather(one(), one(), one()))

    try:
        outcomes = []
        for connect, app_name in ((db.engine.connect, name), (pinged.connect, f"{name}-pp")):
            before = await pids_of_three(connect)
            await asyncio.sleep(0.3)  # idle past ping_after
            with killer.connect() as connection:
                killed = connection.scalar(
                    text(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE application_name = :name"
                    ),
                    {"name": app_name},
                )
            assert killed == len(before) == 3
            after = await pids_of_three(connect)  # would raise if a caller met a dead one
            outcomes.append((len(after), before.isdisjoint(after)))
        assert outcomes == [(3, True), (3, True)]
    finally:
        killer.dispose()
        await pinged.dispose()
        await db.dispose()


@pytest.mark.postgres
async def test_postgres_liveness_ping_is_one_round_trip(pg_url: str) -> None:
    # asyncpg's own ping is BEGIN + SELECT + ROLLBACK; ours is one simple query.
    db = SessionFactory(pg_url, ping_after=0, pool_size=1, max_overflow=0)
    try:
        async with db() as session:
            raw = (await session.connection()).sync_connection
            assert raw is not None
            driver = raw.connection.driver_connection
            assert driver is not None
        sent: list[str] = []
        driver.add_query_logger(lambda record: sent.append(record.query))
        async with db() as session:  # checkout: pinged, as it is idle past ping_after=0
            assert await session.scalar(text("SELECT 42")) == 42
        assert sent[0] == ";"
        assert not any(query.upper().startswith(("BEGIN", "ROLLBACK")) for query in sent[:2])
    finally:
        await db.dispose()
