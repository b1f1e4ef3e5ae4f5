"""``pgbouncer=True`` against a real PgBouncer in transaction mode (issue 13, item 4).

A private PgBouncer (``tests/poolers.py``) sits in front of the shared test database with
fewer server connections than the clients have, so consecutive transactions of one
client land on different server connections. Each scenario runs many concurrent
transactions or reads and counts the errors: 0 with the preset — ``begin()``,
``begin(readonly=True)``, ``reader()`` and ``run_transaction`` with conflicts, on
asyncpg and on async psycopg, and the sync twin (psycopg) in threads; without it,
SQLAlchemy's defaults fail on both drivers (their prepared statements stay on one server
connection), so the 0 means something.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import create_engine, insert, select, text, update
from sqlalchemy.exc import DBAPIError, ResourceClosedError
from sqlalchemy.pool import NullPool

from sessionforge import SessionFactory

from .conftest import PG_URL
from .models import Models, make_models
from .poolers import PgBouncer, pgbouncer

pytestmark = pytest.mark.postgres

TASKS = 10
ROUNDS = 30

#: What a client without the preset sees: the driver's errors ("prepared statement ... does
#: not exist" on asyncpg; "... already exists" and "... does not exist" on psycopg) and,
#: on psycopg, ResourceClosedError: a name its connection prepared for a SELECT named
#: another client's UPDATE on the server connection PgBouncer gave it, and that ran.
UNPREPARED = (DBAPIError, ResourceClosedError)

#: The async drivers, each with the preset's own connect arguments (dialects/postgresql.py).
DRIVERS = [pytest.param("asyncpg", id="asyncpg"), pytest.param("psycopg", id="psycopg")]


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


@pytest.fixture(params=DRIVERS)
def driver(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
async def through(bouncer: PgBouncer) -> AsyncIterator[Any]:
    """Factories on the database through PgBouncer (asyncpg unless ``driver=``); disposed
    after the test, both twins."""
    made: list[SessionFactory[Any]] = []

    def make(driver: str = "asyncpg", **options: Any) -> SessionFactory[Any]:
        factory: SessionFactory[Any] = SessionFactory(
            bouncer.url(driver), pool_size=TASKS, max_overflow=0, **options
        )
        made.append(factory)
        return factory

    yield make
    for factory in made:
        await factory.dispose()
        factory.sync.dispose()


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


async def test_begin_transactions_have_no_errors(
    through: Any, tables: Models, driver: str
) -> None:
    db = through(driver, pgbouncer=True)
    counter = tables.Counter

    async def increment() -> None:
        async with db.begin() as session:
            await session.scalar(select(counter.value).where(counter.id == 1))
            await session.execute(update(counter).values(value=counter.value + 1))

    errors = await gather_errors(increment)
    assert errors == []
    assert counter_value(tables) == TASKS * ROUNDS


async def test_reader_reads_have_no_errors(through: Any, tables: Models, driver: str) -> None:
    db = through(driver, pgbouncer=True)
    names: list[list[str]] = []

    async def read() -> None:
        async with db.reader() as session:
            query = select(tables.Item.name).where(tables.Item.name != "").order_by("name")
            names.append(list((await session.scalars(query)).all()))

    errors = await gather_errors(read)
    assert errors == []
    assert names == [["item-0", "item-1", "item-2"]] * (TASKS * ROUNDS)
    assert db.status().checked_out == 0


async def test_asyncpg_readers_run_in_a_read_only_transaction(through: Any) -> None:
    # How asyncpg's readers pass (SQLAlchemy #12836): a short READ ONLY transaction per
    # reader behind the pooler, left at return; psycopg needs none (one round trip).
    db = through("asyncpg", pgbouncer=True)
    async with db.reader() as session:
        assert await session.scalar(text("SHOW transaction_read_only")) == "on"
    async with db.begin() as session:
        assert await session.scalar(text("SHOW transaction_read_only")) == "off"
    assert db.status().checked_out == 0


async def test_readonly_transactions_have_no_errors(
    through: Any, tables: Models, driver: str
) -> None:
    db = through(driver, pgbouncer=True)
    counts: list[int] = []

    async def read() -> None:
        async with db.begin(readonly=True) as session:
            counts.append(len((await session.scalars(select(tables.Item.name))).all()))
            assert await session.scalar(text("SHOW transaction_read_only")) == "on"

    errors = await gather_errors(read)
    assert errors == []
    assert counts == [3] * (TASKS * ROUNDS)
    # Really read-only through the pooler: the server refuses a write (25006).
    with pytest.raises(DBAPIError, match="read-only transaction"):
        async with db.begin(readonly=True) as session:
            await session.execute(insert(tables.Item).values(name="refused"))
    assert db.status().checked_out == 0


async def test_run_transaction_retries_conflicts(
    through: Any, tables: Models, driver: str
) -> None:
    db = through(driver, pgbouncer=True)
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
    assert db.status().transactions_retried > 0  # the conflicts happened, and were retried


async def test_sync_twin_begin_reader_and_readonly_have_no_errors(
    through: Any, tables: Models
) -> None:
    db = through(pgbouncer=True)
    sync, counter = db.sync, tables.Counter
    assert sync.engine.dialect.driver == "psycopg"

    def work() -> list[BaseException]:
        errors: list[BaseException] = []
        for _ in range(ROUNDS):
            try:
                with sync.begin() as session:
                    session.execute(update(counter).values(value=counter.value + 1))
                with sync.reader() as session:
                    assert session.scalar(select(counter.value).where(counter.id == 1)) >= 1
                with sync.begin(readonly=True) as session:
                    assert session.scalar(text("SHOW transaction_read_only")) == "on"
            except Exception as exc:
                errors.append(exc)
        return errors

    with ThreadPoolExecutor(TASKS) as pool:
        errors = [error for done in pool.map(lambda _: work(), range(TASKS)) for error in done]
    assert errors == []
    assert counter_value(tables) == TASKS * ROUNDS


async def test_sqlalchemy_defaults_fail_without_the_preset(
    through: Any, tables: Models, driver: str
) -> None:
    # pgbouncer=False: asyncpg's and SQLAlchemy's statement caches are on; psycopg
    # prepares a statement it has run prepare_threshold (5) times on a connection.
    db = through(driver)
    counter = tables.Counter

    async def increment() -> None:
        async with db.begin() as session:
            await session.scalar(select(counter.value).where(counter.id == 1))
            await session.execute(update(counter).values(value=counter.value + 1))

    errors = await gather_errors(increment)
    assert errors, "expected prepared-statement errors behind PgBouncer without the preset"
    assert all(isinstance(error, UNPREPARED) for error in errors)
    assert any("prepared statement" in str(error) for error in errors)


async def test_sync_twin_defaults_fail_without_the_preset(through: Any, tables: Models) -> None:
    db = through()  # pgbouncer=False; the sync twin is psycopg, which prepares by default
    sync, counter = db.sync, tables.Counter

    def work() -> list[BaseException]:
        errors: list[BaseException] = []
        for _ in range(ROUNDS):
            try:
                with sync.begin() as session:
                    session.scalar(select(counter.value).where(counter.id == 1))
                    session.execute(update(counter).values(value=counter.value + 1))
            except Exception as exc:
                errors.append(exc)
        return errors

    with ThreadPoolExecutor(TASKS) as pool:
        errors = [error for done in pool.map(lambda _: work(), range(TASKS)) for error in done]
    assert errors, "expected prepared-statement errors behind PgBouncer without the preset"
    assert all(isinstance(error, UNPREPARED) for error in errors)
    assert any("prepared statement" in str(error) for error in errors)
