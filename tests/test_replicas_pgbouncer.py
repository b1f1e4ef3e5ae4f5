"""Replicas behind PgBouncer: one pooler per server, transaction mode (issue 13, item 4).

A primary and two streaming replicas (``tests/pgcluster.py``), each behind a private
PgBouncer 1.18 of its own (``tests/poolers.py``; 1.18's host list does not skip dead
hosts, so one pool per server). With ``pgbouncer=True`` every path — writes, readers,
read-only transactions, the position checks of read-your-writes, on both twins — runs
under concurrent load with 0 errors, and every task reads its own writes.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import text

from sessionforge import SessionFactory

from .pgcluster import Replicated, replicated_postgres
from .poolers import PgBouncer, pgbouncer

pytestmark = pytest.mark.postgres

TASKS = 8
ROUNDS = 15


@pytest.fixture(scope="module")
def cluster() -> Iterator[Replicated]:
    with replicated_postgres(replicas=2) as built:
        yield built


@pytest.fixture(scope="module")
def bouncers(cluster: Replicated) -> Iterator[list[PgBouncer]]:
    with (
        pgbouncer(cluster.primary.url) as primary,
        pgbouncer(cluster.replicas[0].url) as first,
        pgbouncer(cluster.replicas[1].url) as second,
    ):
        yield [primary, first, second]


@pytest.fixture
def table(cluster: Replicated) -> Iterator[str]:
    name = f"t_{uuid.uuid4().hex[:8]}"
    cluster.primary.sql(f"CREATE TABLE {name} (id int PRIMARY KEY, task int)")
    cluster.wait_caught_up()
    yield name
    cluster.primary.sql(f"DROP TABLE {name}")


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_readers_and_writers_through_poolers_read_their_writes(
    bouncers: list[PgBouncer], cluster: Replicated, table: str, driver: str
) -> None:
    primary, *replicas = bouncers
    db = SessionFactory(
        primary.url(driver), replicas=[b.url(driver) for b in replicas], pgbouncer=True
    )
    errors: list[BaseException] = []
    stale = 0
    on_replica = 0

    async def work(task: int) -> None:
        nonlocal stale, on_replica
        for round_ in range(ROUNDS):
            row = task * 1000 + round_
            try:
                async with db.begin() as session:
                    await session.execute(text(f"INSERT INTO {table} VALUES ({row}, {task})"))
                reader = db.reader() if round_ % 2 else db.begin(readonly=True)
                async with reader as session:
                    found = await session.execute(
                        text(f"SELECT count(*), pg_is_in_recovery() FROM {table} WHERE id = {row}")
                    )
                    seen, in_recovery = found.one()
                stale += seen != 1
                on_replica += bool(in_recovery)
            except Exception as error:
                errors.append(error)

    try:
        await asyncio.gather(*(work(task) for task in range(TASKS)))
    finally:
        await db.dispose()
    assert errors == []
    assert stale == 0
    assert on_replica > 0  # the replicas served reads (the rest waited for the primary)
    assert cluster.primary.scalar(f"SELECT count(*) FROM {table}") == str(TASKS * ROUNDS)


def test_the_sync_twin_through_poolers_reads_its_writes(
    bouncers: list[PgBouncer], cluster: Replicated, table: str
) -> None:
    primary, *replicas = bouncers
    db = SessionFactory(
        primary.url("asyncpg"), replicas=[b.url("asyncpg") for b in replicas], pgbouncer=True
    )
    sync = db.sync

    def work(task: int) -> tuple[int, int]:
        stale = on_replica = 0
        for round_ in range(ROUNDS):
            row = task * 1000 + round_
            with sync.begin() as session:
                session.execute(text(f"INSERT INTO {table} VALUES ({row}, {task})"))
            with sync.reader() as session:
                seen, in_recovery = session.execute(
                    text(f"SELECT count(*), pg_is_in_recovery() FROM {table} WHERE id = {row}")
                ).one()
            stale += seen != 1
            on_replica += bool(in_recovery)
        return stale, on_replica

    try:
        with ThreadPoolExecutor(TASKS) as pool:
            results = list(pool.map(work, range(TASKS)))
    finally:
        sync.dispose()
    assert sum(stale for stale, _ in results) == 0
    assert sum(served for _, served in results) > 0
    assert cluster.primary.scalar(f"SELECT count(*) FROM {table}") == str(TASKS * ROUNDS)
