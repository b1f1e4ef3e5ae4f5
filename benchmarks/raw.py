"""The raw-driver contenders' connection pools: asyncpg's own, and a queue of aiosqlite.

Both expose ``acquire()`` (an async context manager yielding a connection) and
``checked_out()`` (connections currently lent out), so a scenario can write one raw
contender per backend and check for leaks after a measurement.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import aiosqlite
from sqlalchemy.engine import make_url

__all__ = ["AsyncpgPool", "SqlitePool", "open_pool", "raw_name"]


def raw_name(url: str) -> str | None:
    """``"raw asyncpg"`` / ``"raw aiosqlite"`` for a URL with a raw contender, else None."""
    backend = make_url(url).get_backend_name()
    return {"postgresql": "raw asyncpg", "sqlite": "raw aiosqlite"}.get(backend)


class AsyncpgPool:
    """An ``asyncpg`` pool of fixed size; placeholders are ``$1``, ``$2``, ..."""

    placeholder = "$1"

    def __init__(self, pool: Any, size: int) -> None:
        self.pool = pool
        self.size = size

    def acquire(self) -> Any:
        return self.pool.acquire()

    def checked_out(self) -> int:
        return int(self.pool.get_size() - self.pool.get_idle_size())


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
    """A raw pool of ``size`` connections to ``url``, closed when ``stack`` unwinds."""
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
