"""``pgbouncer=True`` against a real PgBouncer in transaction mode (issue 13, item 4).

A private PgBouncer (``tests/poolers.py``) sits in front of the shared test database with
fewer server connections than the clients have, so consecutive transactions of one
client land on different server connections. Each scenario runs many concurrent
transactions or reads and counts the errors: 0 with the preset, in both twins; without
it, SQLAlchemy's defaults fail (their prepared statements stay on one server
connection).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import create_engine, select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from sessionforge import SessionFactory

from .conftest import PG_URL
from .models import Models, make_models
from .poolers import PgBouncer, pgbouncer

pytestmark = pytest.mark.postgres

TASKS = 10
ROUNDS = 30


@pytest.fixture(scope="module")
def bouncer() -> Iterator[PgBouncer]:
    with pgbouncer() as running:
        yield running


@pytest.fixture
def tables(prefix: str) -> Iterator[Models]:
    """This test's tables, made and dropped on the server itself (not through PgBouncer)."""
    models = make_models(prefix)
    engine = create_engine(PG_URL.replace("+asyncpg", "+psycopg"), poolclass=NullPool)
    models.metadata.create_all(engine)
    with engine.begin() as connection:
        connection.execute(models.Counter.__table__.insert(), [{"id": 1, "value": 0}])
        connection.execute(
            models.Item.__table__.insert(), [{"name": f"item-{i}"} for i in range(3)]
        )
    yield models
    models.metadata.drop_all(engine)
    engine.dispose()


@pytest.fixture
async def through(bouncer: PgBouncer) -> AsyncIterator[Any]:
    """Factories on the database through PgBouncer; disposed after the test."""
    made: list[SessionFactory[Any]] = []

    def make(**options: Any) -> SessionFactory[Any]:
        factory: SessionFactory[Any] = SessionFactory(
            bouncer.url(), pool_size=TASKS, max_overflow=0, **options
        )
        made.append(factory)
        return factory

    yield make
    for factory in made:
        await factory.dispose()


async def gather_errors(work: Any) -> list[BaseException]:
    """Run ``work()`` ROUNDS times in each of TASKS tasks; the errors it raised."""
    errors: list[BaseException] = []

    async def task() -> None:
        for _ in range(ROUNDS):
            try:
                await work()
            except Exception as exc:
                errors.append(exc)

    await asyncio.gather(*(task() for _ in range(TASKS)))
    return errors


def counter_value(models: Models) -> int:
    engine = create_engine(PG_URL.replace("+asyncpg", "+psycopg"), poolclass=NullPool)
    try:
        with engine.connect() as connection:
            query = select(models.Counter.value).where(models.Counter.id == 1)
            return int(connection.execute(query).scalar_one())
    finally:
        engine.dispose()


async def test_begin_transactions_have_no_errors(through: Any, tables: Models) -> None:
    db = through(pgbouncer=True)
    counter = tables.Counter

    async def increment() -> None:
        async with db.begin() as session:
            await session.scalar(select(counter.value).where(counter.id == 1))
            await session.execute(update(counter).values(value=counter.value + 1))

    errors = await gather_errors(increment)
    assert errors == []
    assert counter_value(tables) == TASKS * ROUNDS


async def test_reader_reads_have_no_errors(through: Any, tables: Models) -> None:
    db = through(pgbouncer=True)
    names: list[list[str]] = []

    async def read() -> None:
        async with db.reader() as session:
            query = select(tables.Item.name).where(tables.Item.name != "").order_by("name")
            names.append(list((await session.scalars(query)).all()))

    errors = await gather_errors(read)
    assert errors == []
    assert names == [["item-0", "item-1", "item-2"]] * (TASKS * ROUNDS)
    # How: a short READ ONLY transaction per reader behind the pooler, left at return.
    async with db.reader() as session:
        assert await session.scalar(text("SHOW transaction_read_only")) == "on"
    async with db.begin() as session:
        assert await session.scalar(text("SHOW transaction_read_only")) == "off"
    assert db.status().checked_out == 0


async def test_run_transaction_retries_conflicts(through: Any, tables: Models) -> None:
    db = through(pgbouncer=True)
    counter = tables.Counter

    async def increment(session: Any) -> None:
        value = await session.scalar(select(counter.value).where(counter.id == 1))
        await session.execute(update(counter).values(value=value + 1))

    async def read(session: Any) -> int:
        return int(await session.scalar(select(counter.value).where(counter.id == 1)))

    async def work() -> None:
        await db.run_transaction(increment, isolation_level="SERIALIZABLE", retries=100)
        assert await db.run_transaction(read, readonly=True) >= 1

    errors = await gather_errors(work)
    assert errors == []
    assert counter_value(tables) == TASKS * ROUNDS


async def test_sync_twin_begin_and_reader_have_no_errors(through: Any, tables: Models) -> None:
    db = through(pgbouncer=True)
    sync, counter = db.sync, tables.Counter

    def work() -> list[BaseException]:
        errors: list[BaseException] = []
        for _ in range(ROUNDS):
            try:
                with sync.begin() as session:
                    session.execute(update(counter).values(value=counter.value + 1))
                with sync.reader() as session:
                    assert session.scalar(select(counter.value).where(counter.id == 1)) >= 1
            except Exception as exc:
                errors.append(exc)
        return errors

    with ThreadPoolExecutor(TASKS) as pool:
        errors = [error for done in pool.map(lambda _: work(), range(TASKS)) for error in done]
    assert errors == []
    assert counter_value(tables) == TASKS * ROUNDS


async def test_sqlalchemy_defaults_fail_without_the_preset(through: Any, tables: Models) -> None:
    db = through()  # pgbouncer=False: asyncpg's and SQLAlchemy's statement caches are on
    counter = tables.Counter

    async def increment() -> None:
        async with db.begin() as session:
            await session.scalar(select(counter.value).where(counter.id == 1))
            await session.execute(update(counter).values(value=counter.value + 1))

    errors = await gather_errors(increment)
    assert errors, "expected prepared-statement errors behind PgBouncer without the preset"
    assert all(isinstance(error, DBAPIError) for error in errors)
    assert any("prepared statement" in str(error) for error in errors)
