"""Read-your-writes at its edges: savepoints, long readers, cancellations, hooks, threads.

Each test is a case an independent review of the replica routing found reading data
older than the context's own commit (or leaking, or stalling); each failed before its
fix. Same topology as ``tests/test_replicas.py``: a primary and two streaming replicas.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from sessionforge import SessionFactory, on_commit

from .pgcluster import Replicated
from .test_replicas import cluster, count, db, insert, table, where

__all__ = ["cluster", "db", "table"]  # the fixtures, shared with test_replicas

pytestmark = pytest.mark.postgres


def pause_all(cluster: Replicated) -> None:
    for replica in cluster.replicas:
        cluster.pause_replay(replica)


async def test_a_write_in_a_savepoint_gets_the_commits_position(
    db: SessionFactory[AsyncSession], cluster: Replicated, table: str
) -> None:
    pause_all(cluster)
    async with db.begin() as session:
        async with session.begin_nested():
            await session.execute(text(f"INSERT INTO {table} VALUES (1, 'x')"))
        assert db.consistency_token() is None  # a RELEASE is not the COMMIT
        async with db.atomic():  # no current session: a transaction of its own
            pass
    token = db.consistency_token()
    assert token is not None
    async with db.reader() as session:
        assert await count(session, table) == 1
    # and the same through atomic() nested in a scope
    async with db.scope(), db.atomic() as session:
        async with db.atomic():
            await session.execute(text(f"INSERT INTO {table} VALUES (2, 'x')"))
    assert db.consistency_token() != token
    async with db.reader() as session:
        assert await count(session, table) == 2


async def test_a_reader_kept_open_across_the_contexts_commit_sees_it(
    db: SessionFactory[AsyncSession], cluster: Replicated, table: str
) -> None:
    async with db.reader() as reader:
        assert (await where(reader))[0] is True
        assert await count(reader, table) == 0
        pause_all(cluster)
        await insert(db, table, 1)
        assert await count(reader, table) == 1  # its next statement chose again
        assert (await where(reader))[0] is False


async def test_a_foreign_token_does_not_hide_the_contexts_own_commit(
    db: SessionFactory[AsyncSession], cluster: Replicated, table: str
) -> None:
    await insert(db, table, 1)
    own = db.consistency_token()
    assert own is not None
    system = own.split("-")[1]
    foreign = own.replace(system, f"{int(system, 16) ^ 1:x}", 1)
    pause_all(cluster)
    await insert(db, table, 2)
    with db.consistent_with(foreign):
        assert db.consistency_token() != foreign
        async with db.reader() as session:
            assert await count(session, table) == 2


async def test_a_commit_whose_wait_is_cancelled_still_gives_its_token(
    db: SessionFactory[AsyncSession], cluster: Replicated, table: str
) -> None:
    # A deferred trigger makes the COMMIT take 0.3 s; the caller's deadline is 0.1 s.
    cluster.primary.sql(
        "CREATE OR REPLACE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN PERFORM pg_sleep(0.3); RETURN NULL; END $$"
    )
    cluster.primary.sql(
        f"CREATE CONSTRAINT TRIGGER slow AFTER INSERT ON {table} DEFERRABLE INITIALLY "
        "DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit()"
    )
    pause_all(cluster)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.1):
            await insert(db, table, 1)
    assert cluster.primary.scalar(f"SELECT count(*) FROM {table}") == "1"  # it committed
    assert db.consistency_token() is not None
    async with db.reader() as session:
        assert await count(session, table) == 1


async def test_on_commit_hooks_see_the_commits_token(
    db: SessionFactory[AsyncSession], table: str
) -> None:
    seen: list[str | None] = []
    async with db.begin() as session:
        await session.execute(text(f"INSERT INTO {table} VALUES (1, 'x')"))
        on_commit(session, lambda: seen.append(db.consistency_token()))
    assert seen == [db.consistency_token()]
    assert seen[0] is not None


async def test_a_serializable_factory_reads_read_only_transactions_on_the_primary(
    cluster: Replicated, table: str
) -> None:
    db = SessionFactory(
        cluster.primary.url,
        replicas=[r.url for r in cluster.replicas],
        isolation_level="SERIALIZABLE",
    )
    try:
        async with db.begin(readonly=True) as session:
            assert await where(session) == (False, cluster.primary.port)
        async with db.begin(readonly=True, isolation_level="REPEATABLE READ") as session:
            assert (await where(session))[0] is True
        with db.sync.begin(readonly=True) as session:
            assert session.execute(text("SELECT pg_is_in_recovery()")).scalar() is False
        async with db.reader() as session:  # no transaction: fine on a standby
            assert (await where(session))[0] is True
    finally:
        await db.dispose()
        db.sync.dispose()


async def test_a_busy_replica_pool_neither_stalls_reads_nor_marks_the_replica(
    cluster: Replicated, table: str
) -> None:
    db = SessionFactory(
        cluster.primary.url,
        replicas=[r.url for r in cluster.replicas],
        pool_size=1,
        max_overflow=0,
        pool_timeout=3,
    )
    try:
        held = [db.reader(), db.reader()]
        for session in held:  # one reader per replica holds its only connection
            await where(session)
        await insert(db, table, 1)
        started = time.monotonic()
        async with db.reader() as session:
            assert await count(session, table) == 1
            assert await where(session) == (False, cluster.primary.port)
        assert time.monotonic() - started < 1.0
        assert all(r.healthy for r in db.status().replicas)
        for session in held:
            await session.close()
    finally:
        await db.dispose()


def client_backends(server: Any) -> int:
    return int(
        server.scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
            "AND pid <> pg_backend_pid()"
        )
    )


def backends_after_closing(server: Any, within: float = 5.0) -> int:
    """The server's client backends, once they are gone or ``within`` seconds passed."""
    deadline = time.monotonic() + within
    while client_backends(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    return client_backends(server)


async def test_the_sync_twins_dispose_leaves_the_async_replica_engines_alone(
    cluster: Replicated,
) -> None:
    db = SessionFactory(cluster.primary.url, replicas=[r.url for r in cluster.replicas])
    for _ in range(2):
        async with db.reader() as session:
            await where(session)
    db.sync.dispose()
    assert all(r.checked_out == 0 for r in db.status().replicas)
    await db.dispose()
    for replica in cluster.replicas:
        assert await asyncio.to_thread(backends_after_closing, replica) == 0


async def test_a_commit_in_a_thread_reaches_the_task_that_started_it(
    db: SessionFactory[AsyncSession], cluster: Replicated, table: str
) -> None:
    sync = db.sync

    def write() -> None:
        with sync.begin() as session:
            session.execute(text(f"INSERT INTO {table} VALUES (1, 'x')"))

    async with db.reader() as session:  # the task has used the factory
        await count(session, table)
    pause_all(cluster)
    await asyncio.to_thread(write)
    assert db.consistency_token() is not None
    async with db.reader() as session:
        assert await count(session, table) == 1


async def test_a_sync_endpoint_that_writes_answers_with_the_cookie(
    cluster: Replicated, table: str
) -> None:
    import httpx
    from fastapi import FastAPI

    from sessionforge.asgi import SessionMiddleware

    db = SessionFactory(cluster.primary.url, replicas=[r.url for r in cluster.replicas])
    app = FastAPI()
    app.add_middleware(SessionMiddleware, factory=db)

    @app.post("/sync/{row}")
    def add(row: int) -> dict[str, int]:  # a threadpool endpoint, with its own session
        with db.sync.begin() as session:
            session.execute(text(f"INSERT INTO {table} VALUES ({row}, 'x')"))
        return {"added": row}

    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://test"
        ) as client:
            posted = await client.post("/sync/1")
            assert posted.status_code == 200
            assert posted.headers["set-cookie"].startswith("sessionforge_consistency=sf1-")
    finally:
        await db.dispose()
        db.sync.dispose()
