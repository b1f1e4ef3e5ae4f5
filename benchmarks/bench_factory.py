"""Scenario "factory": one short read transaction, through each way of opening it.

Each operation opens a transaction, reads one row by primary key from a 1,000-row
table and commits. The contenders differ only in how the transaction is opened:

* ``sessionforge``: ``SessionFactory(url).begin()`` + ``session.get(Item, id)``;
* ``bare async_sessionmaker`` (the baseline): the same through plain SQLAlchemy,
  ``async_sessionmaker(create_async_engine(url), expire_on_commit=False).begin()``;
* ``async_sessionmaker + pre_ping``: the baseline on an engine with
  ``pool_pre_ping=True``, the usual alternative to sessionforge's ``ping_after``;
* ``raw asyncpg`` (PostgreSQL), ``raw aiosqlite`` (SQLite) or ``raw aiomysql``
  (``mysql+aiomysql``): the driver alone, ``BEGIN``, ``SELECT ... WHERE id = $1``,
  ``COMMIT`` on a pooled connection, to show the floor the ORM paths sit above
  (aiomysql begins implicitly at the SELECT, as under SQLAlchemy).

Every contender gets a pool of ``--pool-size`` connections (no overflow). The table
``sf_bench_item`` is dropped and created at start and dropped at the end.

Run: ``python -m benchmarks.bench_factory --rounds 5 --seconds 1.5``
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from sqlalchemy import String, insert
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sessionforge import SessionFactory

from . import harness
from .harness import Contender, Params
from .raw import AiomysqlPool, AsyncpgPool, SqlitePool, open_mysql_pool, open_pool, raw_name

SCENARIO = "factory"
BASELINE = "bare async_sessionmaker"
ROWS = 1_000
#: The backends whose raw pool ``raw_transaction`` drives.
RAW_BACKENDS = ("postgresql", "sqlite", "mysql")


class Base(DeclarativeBase):
    """This scenario's own metadata, so create/drop touch ``sf_bench_item`` only."""


class Item(Base):
    """The row read by every operation."""

    __tablename__ = "sf_bench_item"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(64))  # MySQL's VARCHAR needs a length
    quantity: Mapped[int]


TABLE = Item.__tablename__
SELECT_SQL = f"SELECT id, name, quantity FROM {TABLE} WHERE id = "


def random_id() -> int:
    """A primary key present in the table; the same generator serves every contender."""
    return random.randint(1, ROWS)


def sqlalchemy_contender(name: str, engine: AsyncEngine) -> Contender:
    """``async_sessionmaker(engine).begin()`` + one ``session.get``."""
    maker = async_sessionmaker(engine, expire_on_commit=False)

    async def op() -> None:
        async with maker.begin() as session:
            await session.get(Item, random_id())

    return Contender(name, op)


def sessionforge_contender(db: SessionFactory[AsyncSession]) -> Contender:
    """``db.begin()`` + one ``session.get``: the code under test."""

    async def op() -> None:
        async with db.begin() as session:
            await session.get(Item, random_id())

    return Contender("sessionforge", op)


def raw_transaction(
    pool: AsyncpgPool | SqlitePool | AiomysqlPool,
) -> Callable[[], Awaitable[None]]:
    """BEGIN, one primary-key SELECT, COMMIT on a raw pooled connection."""
    sql = SELECT_SQL + pool.placeholder
    if isinstance(pool, AsyncpgPool):

        async def pg_work() -> None:
            async with pool.acquire() as conn, conn.transaction():
                await conn.fetchrow(sql, random_id())

        return pg_work
    if isinstance(pool, AiomysqlPool):
        mysql_pool = pool

        async def mysql_work() -> None:
            async with mysql_pool.acquire() as conn:
                async with conn.cursor() as cursor:
                    await cursor.execute(sql, (random_id(),))
                    await cursor.fetchone()
                await conn.commit()

        return mysql_work
    sqlite_pool = pool

    async def lite_work() -> None:
        async with sqlite_pool.acquire() as conn:
            await conn.execute("BEGIN")
            await conn.execute_fetchall(sql, (random_id(),))
            await conn.commit()

    return lite_work


async def create_table(engine: AsyncEngine) -> None:
    """Drop and create ``sf_bench_item`` and fill it with ``ROWS`` rows."""
    rows = [{"id": i, "name": f"item {i}", "quantity": i % 97} for i in range(1, ROWS + 1)]
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
        await conn.run_sync(Base.metadata.create_all)
        await conn.execute(insert(Item), rows)


async def drop_table(engine: AsyncEngine) -> None:
    """Drop ``sf_bench_item`` (and nothing else)."""
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)


def pooled_engine(params: Params, stack: AsyncExitStack, **options: Any) -> AsyncEngine:
    """``create_async_engine`` with the scenario's pool, disposed when ``stack`` unwinds."""
    engine = create_async_engine(params.url, pool_size=params.pool_size, max_overflow=0, **options)
    stack.push_async_callback(engine.dispose)
    return engine


def pooled_factory(
    params: Params, stack: AsyncExitStack, **options: Any
) -> SessionFactory[AsyncSession]:
    """``SessionFactory`` with the scenario's pool, disposed when ``stack`` unwinds."""
    db = SessionFactory(
        params.sessionforge_url(), pool_size=params.pool_size, max_overflow=0, **options
    )
    stack.push_async_callback(db.dispose)
    return db


async def item_table(params: Params, stack: AsyncExitStack, **options: Any) -> AsyncEngine:
    """A pooled engine on a freshly filled ``sf_bench_item``, dropped when ``stack`` unwinds."""
    engine = pooled_engine(params, stack, **options)
    await create_table(engine)
    stack.push_async_callback(drop_table, engine)
    return engine


@asynccontextmanager
async def contenders(params: Params) -> AsyncIterator[Sequence[Contender]]:
    """Create the table, yield the contenders, then dispose of them and drop the table."""
    async with AsyncExitStack() as stack:
        bare = await item_table(params, stack)
        pinged = pooled_engine(params, stack, pool_pre_ping=True)
        db = pooled_factory(params, stack)
        chosen = [sessionforge_contender(db), sqlalchemy_contender(BASELINE, bare)]
        name = raw_name(params.url, RAW_BACKENDS)
        if name is not None:
            opener = open_mysql_pool if name == "raw aiomysql" else open_pool
            pool = await opener(params.url, params.pool_size, stack)
            chosen.append(Contender(name, raw_transaction(pool)))
        chosen.append(sqlalchemy_contender("async_sessionmaker + pre_ping", pinged))
        yield chosen


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point; see ``--help`` and benchmarks/README.md."""
    harness.main(SCENARIO, __doc__ or SCENARIO, contenders, BASELINE, argv)


if __name__ == "__main__":
    main()
