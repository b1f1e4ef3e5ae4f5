"""Scenario "factory": one short read transaction, through each way of opening it.

Each operation opens a transaction, reads one row by primary key from a 1,000-row
table and commits. The contenders differ only in how the transaction is opened:

* ``sessionforge``: ``SessionFactory(url).begin()`` + ``session.get(Item, id)``;
* ``bare async_sessionmaker`` (the baseline): the same through plain SQLAlchemy,
  ``async_sessionmaker(create_async_engine(url), expire_on_commit=False).begin()``;
* ``async_sessionmaker + pre_ping``: the baseline on an engine with
  ``pool_pre_ping=True``, the usual alternative to sessionforge's ``ping_after``;
* ``raw asyncpg`` (PostgreSQL) or ``raw aiosqlite`` (SQLite): the driver alone,
  ``BEGIN``, ``SELECT ... WHERE id = $1``, ``COMMIT`` on a pooled connection, to show
  the floor the ORM paths sit above.

Every contender gets a pool of ``--pool-size`` connections (no overflow). The table
``sf_bench_item`` is dropped and created at start and dropped at the end.

Run: ``python -m benchmarks.bench_factory --rounds 5 --seconds 1.5``
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager

import aiosqlite
from sqlalchemy import insert
from sqlalchemy.engine import make_url
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

SCENARIO = "factory"
BASELINE = "bare async_sessionmaker"
ROWS = 1_000


class Base(DeclarativeBase):
    """This scenario's own metadata, so create/drop touch ``sf_bench_item`` only."""


class Item(Base):
    """The row read by every operation."""

    __tablename__ = "sf_bench_item"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str]
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


async def asyncpg_contender(url: str, pool_size: int, stack: AsyncExitStack) -> Contender:
    """A raw ``asyncpg`` pool; ``conn.transaction()`` sends BEGIN and COMMIT as SQLA does."""
    import asyncpg

    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    pool = await asyncpg.create_pool(dsn, min_size=pool_size, max_size=pool_size)
    stack.push_async_callback(pool.close)
    sql = SELECT_SQL + "$1"

    async def op() -> None:
        async with pool.acquire() as conn, conn.transaction():
            await conn.fetchrow(sql, random_id())

    return Contender("raw asyncpg", op)


async def aiosqlite_contender(url: str, pool_size: int, stack: AsyncExitStack) -> Contender:
    """Raw ``aiosqlite`` connections in a queue: BEGIN, one fetch, COMMIT."""
    path = make_url(url).database or ""
    idle: asyncio.Queue[aiosqlite.Connection] = asyncio.Queue()
    for _ in range(pool_size):
        conn = await aiosqlite.connect(path, isolation_level=None)
        stack.push_async_callback(conn.close)
        idle.put_nowait(conn)
    sql = SELECT_SQL + "?"

    async def op() -> None:
        conn = await idle.get()
        try:
            await conn.execute("BEGIN")
            await conn.execute_fetchall(sql, (random_id(),))
            await conn.execute("COMMIT")
        finally:
            idle.put_nowait(conn)

    return Contender("raw aiosqlite", op)


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


@asynccontextmanager
async def contenders(params: Params) -> AsyncIterator[Sequence[Contender]]:
    """Create the table, yield the contenders, then dispose of them and drop the table."""
    url, size = params.url, params.pool_size
    async with AsyncExitStack() as stack:
        bare = create_async_engine(url, pool_size=size, max_overflow=0)
        stack.push_async_callback(bare.dispose)
        await create_table(bare)
        stack.push_async_callback(drop_table, bare)
        pinged = create_async_engine(url, pool_size=size, max_overflow=0, pool_pre_ping=True)
        stack.push_async_callback(pinged.dispose)
        db = SessionFactory(url, pool_size=size, max_overflow=0)
        stack.push_async_callback(db.dispose)

        backend = make_url(url).get_backend_name()
        chosen = [sessionforge_contender(db), sqlalchemy_contender(BASELINE, bare)]
        if backend == "postgresql":
            chosen.append(await asyncpg_contender(url, size, stack))
        elif backend == "sqlite":
            chosen.append(await aiosqlite_contender(url, size, stack))
        chosen.append(sqlalchemy_contender("async_sessionmaker + pre_ping", pinged))
        yield chosen


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point; see ``--help`` and benchmarks/README.md."""
    harness.main(SCENARIO, __doc__ or SCENARIO, contenders, BASELINE, argv)


if __name__ == "__main__":
    main()
