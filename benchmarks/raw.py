"""The raw-driver contenders' connection pools: asyncpg's own, a queue of aiosqlite, and
aiomysql's own (MariaDB/MySQL, the factory scenario only so far).

Each exposes ``acquire()`` (an async context manager yielding a connection) and
``checked_out()`` (connections currently lent out), so a scenario can write one raw
contender per backend and check for leaks after a measurement.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Collection
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import aiosqlite
from sqlalchemy.engine import make_url

__all__ = ["AiomysqlPool", "AsyncpgPool", "SqlitePool", "open_mysql_pool", "open_pool", "raw_name"]

#: The raw contender of each backend, and the driver it needs in the URL (None: any).
_RAW: dict[str, tuple[str, str | None]] = {
    "postgresql": ("raw asyncpg", None),
    "sqlite": ("raw aiosqlite", None),
    "mysql": ("raw aiomysql", "aiomysql"),
}


def raw_name(url: str, backends: Collection[str] = ("postgresql", "sqlite")) -> str | None:
    """``"raw asyncpg"`` / ``"raw aiosqlite"`` / ``"raw aiomysql"`` for a URL with a raw
    contender among ``backends`` (the scenarios that can drive that pool), else None.

    MySQL's raw contender is aiomysql, so it stands beside ``mysql+aiomysql`` only: the
    comparison is with the same driver.
    """
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend not in backends or backend not in _RAW:
        return None
    name, driver = _RAW[backend]
    return name if driver in (None, parsed.get_driver_name()) else None


class _DriverPool:
    """A driver's own pool of fixed size: ``acquire()`` is its async context manager."""

    placeholder: str

    def __init__(self, pool: Any, size: int) -> None:
        self.pool = pool
        self.size = size

    def acquire(self) -> Any:
        return self.pool.acquire()


class AsyncpgPool(_DriverPool):
    """An ``asyncpg`` pool of fixed size; placeholders are ``$1``, ``$2``, ..."""

    placeholder = "$1"

    def checked_out(self) -> int:
        return int(self.pool.get_size() - self.pool.get_idle_size())


class AiomysqlPool(_DriverPool):
    """An ``aiomysql`` pool of fixed size, autocommit off (as SQLAlchemy runs it);
    placeholders are ``%s``. Its release closes a connection left in a transaction."""

    placeholder = "%s"

    def checked_out(self) -> int:
        return int(self.pool.size - self.pool.freesize)


class SqlitePool:
    """``size`` aiosqlite connections (driver autocommit) in a queue; placeholder ``?``.

    A connection handed back by a failed or cancelled holder is rolled back first, as
    a real pool's reset would.
    """

    placeholder = "?"

    def __init__(self, size: int) -> None:
        self.size = size
        self.idle: asyncio.Queue[aiosqlite.Connection] = asyncio.Queue()

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[aiosqlite.Connection]:
        conn = await self.idle.get()
        try:
            yield conn
        except BaseException:
            # Queued behind any statement still running on the connection's thread (a
            # cancelled await does not stop it), so it also ends a BEGIN still in flight.
            await asyncio.shield(conn.rollback())
            raise
        finally:
            self.idle.put_nowait(conn)

    def checked_out(self) -> int:
        return self.size - self.idle.qsize()


async def open_pool(url: str, size: int, stack: AsyncExitStack) -> AsyncpgPool | SqlitePool:
    """A raw pool of ``size`` connections to ``url``, closed when ``stack`` unwinds.

    PostgreSQL or SQLite; ``open_mysql_pool`` for MariaDB/MySQL.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "postgresql":
        import asyncpg

        dsn = parsed.set(drivername="postgresql").render_as_string(hide_password=False)
        pool = await asyncpg.create_pool(dsn, min_size=size, max_size=size)
        stack.push_async_callback(pool.close)
        return AsyncpgPool(pool, size)
    sqlite = SqlitePool(size)
    for _ in range(size):
        conn = await aiosqlite.connect(parsed.database or "", isolation_level=None)
        stack.push_async_callback(conn.close)
        sqlite.idle.put_nowait(conn)
    return sqlite


async def open_mysql_pool(url: str, size: int, stack: AsyncExitStack) -> AiomysqlPool:
    """An aiomysql pool of ``size`` connections to ``url``, closed when ``stack`` unwinds."""
    import aiomysql  # type: ignore[import-untyped]

    parsed = make_url(url)
    pool = await aiomysql.create_pool(
        host=parsed.host or "127.0.0.1",
        port=parsed.port or 3306,
        user=parsed.username or "root",
        password=parsed.password or "",
        db=parsed.database or "",
        minsize=size,
        maxsize=size,
        autocommit=False,
    )

    async def close() -> None:
        pool.close()
        await pool.wait_closed()

    stack.push_async_callback(close)
    return AiomysqlPool(pool, size)
