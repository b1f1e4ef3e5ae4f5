"""Scenario "write": one short write transaction, through each way of opening it.

Each operation opens a transaction, adds one row to ``sf_bench_write`` (an ORM
``INSERT ... RETURNING id`` at flush) and commits. The contenders:

* ``sessionforge``: ``SessionFactory(url).begin()`` + ``session.add(Entry(...))``;
* ``bare async_sessionmaker`` (the baseline): the same through
  ``async_sessionmaker(create_async_engine(url), expire_on_commit=False).begin()``;
* ``advanced-alchemy repository``: advanced-alchemy's repository layer, the way its
  docs write a row: a session from ``SQLAlchemyAsyncConfig``'s session maker and
  ``await repository.add(Entry(...), auto_commit=True)`` (flush, refresh, commit);
* ``raw asyncpg`` / ``raw aiosqlite``: the driver alone, BEGIN (``BEGIN IMMEDIATE`` on
  SQLite), ``INSERT ... RETURNING id``, COMMIT.

On SQLite sessionforge's preset opens write transactions with ``BEGIN IMMEDIATE``
while the baseline's aiosqlite lets the driver begin implicitly at the INSERT; both
hold the write lock for the same statements, so the comparison is fair here.

The table is dropped and created at start and dropped at the end (it grows by every
row written in between).

Run: ``python -m benchmarks.bench_write --rounds 5 --seconds 1.5``
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager

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
from .raw import AsyncpgPool, SqlitePool, open_pool, raw_name

SCENARIO = "write"
BASELINE = "bare async_sessionmaker"
SESSIONFORGE = "sessionforge"
ADVANCED_ALCHEMY = "advanced-alchemy repository"


class Base(DeclarativeBase):
    """This scenario's own metadata, so create/drop touch ``sf_bench_write`` only."""


class Entry(Base):
    """The row every operation inserts."""

    __tablename__ = "sf_bench_write"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    quantity: Mapped[int]


INSERT_SQL = f"INSERT INTO {Entry.__tablename__} (name, quantity) VALUES "


def new_entry() -> Entry:
    return Entry(name="entry", quantity=random.randint(1, 99))


def maker_contender(name: str, maker: async_sessionmaker[AsyncSession]) -> Contender:
    async def op() -> None:
        async with maker.begin() as session:
            session.add(new_entry())

    return Contender(name, op)


def sessionforge_contender(db: SessionFactory[AsyncSession]) -> Contender:
    async def op() -> None:
        async with db.begin() as session:
            session.add(new_entry())

    return Contender(SESSIONFORGE, op)


def advanced_alchemy_contender(engine: AsyncEngine) -> Contender:
    from advanced_alchemy.config import SQLAlchemyAsyncConfig
    from advanced_alchemy.repository import SQLAlchemyAsyncRepository

    class EntryRepository(SQLAlchemyAsyncRepository[Entry]):
        model_type = Entry

    config = SQLAlchemyAsyncConfig(engine_instance=engine, create_all=False)
    maker = config.create_session_maker()

    async def op() -> None:
        async with maker() as session:
            await EntryRepository(session=session).add(new_entry(), auto_commit=True)

    return Contender(ADVANCED_ALCHEMY, op)


def raw_contender(url: str, pool: AsyncpgPool | SqlitePool) -> Contender:
    name = raw_name(url) or "raw"
    if isinstance(pool, AsyncpgPool):
        pg_sql = INSERT_SQL + "($1, $2) RETURNING id"

        async def pg_op() -> None:
            async with pool.acquire() as conn, conn.transaction():
                await conn.fetchval(pg_sql, "entry", random.randint(1, 99))

        return Contender(name, pg_op)

    sqlite_pool = pool
    lite_sql = INSERT_SQL + "(?, ?) RETURNING id"

    async def lite_op() -> None:
        async with sqlite_pool.acquire() as conn:
            await conn.execute("BEGIN IMMEDIATE")
            await conn.execute_fetchall(lite_sql, ("entry", random.randint(1, 99)))
            await conn.commit()

    return Contender(name, lite_op)


async def recreate(engine: AsyncEngine, *, create: bool = True) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
        if create:
            await conn.run_sync(Base.metadata.create_all)


async def drop(engine: AsyncEngine) -> None:
    await recreate(engine, create=False)


@asynccontextmanager
async def contenders(params: Params) -> AsyncIterator[Sequence[Contender]]:
    """Create the table, yield the contenders, then dispose of them and drop the table."""
    url, size = params.url, params.pool_size
    async with AsyncExitStack() as stack:
        bare = create_async_engine(url, pool_size=size, max_overflow=0)
        stack.push_async_callback(bare.dispose)
        await recreate(bare)
        stack.push_async_callback(drop, bare)
        db = SessionFactory(params.sessionforge_url(), pool_size=size, max_overflow=0)
        stack.push_async_callback(db.dispose)
        chosen = [
            sessionforge_contender(db),
            maker_contender(BASELINE, async_sessionmaker(bare, expire_on_commit=False)),
        ]
        if harness.installed("advanced_alchemy"):
            aa_engine = create_async_engine(url, pool_size=size, max_overflow=0)
            stack.push_async_callback(aa_engine.dispose)
            chosen.append(advanced_alchemy_contender(aa_engine))
        if raw_name(url) is not None:
            chosen.append(raw_contender(url, await open_pool(url, size, stack)))
        yield chosen


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point; see ``--help`` and benchmarks/README.md."""
    harness.main(SCENARIO, __doc__ or SCENARIO, contenders, BASELINE, argv)


if __name__ == "__main__":
    main()
