"""Scenario "read": a read-only request, one primary-key read, through each read path.

Each operation reads one row of the 1,000-row ``sf_bench_item`` table by primary key
(``await session.get(Item, id)``). The contenders differ in how the session is opened:

* ``sessionforge reader()``: ``async with db.reader() as session`` -- a session on a
  connection of the factory's pool in autocommit mode, so no BEGIN and no COMMIT
  round trips;
* ``sessionforge begin(readonly=True)``: a real read-only transaction
  (``BEGIN READ ONLY`` ... ``COMMIT`` on PostgreSQL);
* ``bare async_sessionmaker`` (the baseline): ``async_sessionmaker(...).begin()``, what
  most code does for a read;
* ``async_sessionmaker, AUTOCOMMIT engine``: the plain-SQLAlchemy way to skip the
  transaction, ``async_sessionmaker(create_async_engine(url, isolation_level=
  "AUTOCOMMIT"))()`` -- a second engine and pool just for reads;
* ``raw asyncpg`` / ``raw aiosqlite``: the driver's pool, one ``SELECT`` outside any
  explicit transaction.

Run: ``python -m benchmarks.bench_read --rounds 5 --seconds 1.5``
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from sessionforge import SessionFactory

from . import harness
from .bench_factory import (
    SELECT_SQL,
    Item,
    item_table,
    pooled_engine,
    pooled_factory,
    random_id,
)
from .harness import Contender, Params
from .raw import AsyncpgPool, SqlitePool, open_pool, raw_name

SCENARIO = "read"
BASELINE = "bare async_sessionmaker begin()"
READER = "sessionforge reader()"
READONLY = "sessionforge begin(readonly=True)"
AUTOCOMMIT = "async_sessionmaker, AUTOCOMMIT engine"


def reader_contender(db: SessionFactory[AsyncSession]) -> Contender:
    async def op() -> None:
        async with db.reader() as session:
            await session.get(Item, random_id())

    return Contender(READER, op)


def readonly_contender(db: SessionFactory[AsyncSession]) -> Contender:
    async def op() -> None:
        async with db.begin(readonly=True) as session:
            await session.get(Item, random_id())

    return Contender(READONLY, op)


def begin_contender(name: str, maker: async_sessionmaker[AsyncSession]) -> Contender:
    async def op() -> None:
        async with maker.begin() as session:
            await session.get(Item, random_id())

    return Contender(name, op)


def session_contender(name: str, maker: async_sessionmaker[AsyncSession]) -> Contender:
    async def op() -> None:
        async with maker() as session:
            await session.get(Item, random_id())

    return Contender(name, op)


def raw_contender(url: str, pool: AsyncpgPool | SqlitePool) -> Contender:
    """One SELECT on a pooled connection, no explicit transaction."""
    name = raw_name(url) or "raw"
    sql = SELECT_SQL + pool.placeholder
    if isinstance(pool, AsyncpgPool):

        async def pg_op() -> None:
            async with pool.acquire() as conn:
                await conn.fetchrow(sql, random_id())

        return Contender(name, pg_op)
    sqlite_pool = pool

    async def lite_op() -> None:
        async with sqlite_pool.acquire() as conn:
            await conn.execute_fetchall(sql, (random_id(),))

    return Contender(name, lite_op)


@asynccontextmanager
async def contenders(params: Params) -> AsyncIterator[Sequence[Contender]]:
    """Create the table, yield the contenders, then dispose of them and drop the table."""
    url, size = params.url, params.pool_size
    async with AsyncExitStack() as stack:
        bare = await item_table(params, stack)
        autocommit = pooled_engine(params, stack, isolation_level="AUTOCOMMIT")
        db = pooled_factory(params, stack)
        chosen = [
            reader_contender(db),
            readonly_contender(db),
            begin_contender(BASELINE, async_sessionmaker(bare, expire_on_commit=False)),
            session_contender(AUTOCOMMIT, async_sessionmaker(autocommit, expire_on_commit=False)),
        ]
        if raw_name(url) is not None:
            chosen.append(raw_contender(url, await open_pool(url, size, stack)))
        yield chosen


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point; see ``--help`` and benchmarks/README.md."""
    harness.main(SCENARIO, __doc__ or SCENARIO, contenders, BASELINE, argv)


if __name__ == "__main__":
    main()
