"""The two handles ``isolated()`` gives: ``AsyncIsolation`` and ``SyncIsolation``.

Each opens the test's connection, begins the outer transaction, routes the factory's
sessions to it (``BaseIsolation``), and at the end rolls it back and closes it. The
async twin's connection lives in an event loop of its own (``_bridge``).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import Session, SessionTransaction
from sqlalchemy.util import await_

from sessionforge._internal.sqla import in_greenlet
from sessionforge._internal.twin import core_of
from sessionforge.errors import ConfigurationError, IsolationNotEnteredError
from sessionforge.factory import SessionFactory
from sessionforge.sync import SyncSessionFactory

from ._bridge import HomeLoop, bridge_driver, unbridge_driver
from ._isolation import BaseIsolation, warn_left_open

__all__ = ["AsyncIsolation", "SyncIsolation"]

_AS = TypeVar("_AS", bound=AsyncSession)
_S = TypeVar("_S", bound=Session)


class AsyncIsolation(BaseIsolation, Generic[_AS]):
    """The handle ``isolated(db)`` gives for a ``SessionFactory``."""

    def __init__(self, db: SessionFactory[_AS], *, run_hooks: bool, lock_timeout: float) -> None:
        super().__init__(core_of(db), run_hooks=run_hooks, lock_timeout=lock_timeout)
        #: The isolated factory (the one given: it is routed, not copied).
        self.factory = db
        self._home: HomeLoop | None = None
        self._connection: AsyncConnection | None = None

    @property
    def connection(self) -> AsyncConnection:
        """The connection every session of the factory uses while isolated."""
        if self._connection is None:
            raise IsolationNotEnteredError("the isolated() block has not been entered")
        return self._connection

    async def run_hooks(self) -> int:
        """Run (await, if async) the captured on-commit hooks in order; return how many.

        Hooks registered by a running hook, through sessions that commit, run too. A
        hook's exception propagates; the hooks after it stay in ``hooks``.
        """
        count = 0
        while self.hooks:
            result = self.hooks.pop(0)()
            if inspect.isawaitable(result):
                await result
            count += 1
        return count

    # entering and leaving ------------------------------------------------------------

    def _open(self) -> Coroutine[Any, Any, AsyncConnection]:
        core = self._core
        home = self._home
        assert home is not None

        async def open_() -> AsyncConnection:
            connection = await core.async_engine().connect()
            try:
                await connection.begin()
                raw = await connection.get_raw_connection()
                bridge_driver(raw.dbapi_connection, home)
            except BaseException:
                await connection.close()
                raise
            return connection

        return open_()

    def _close(self, connection: AsyncConnection) -> Coroutine[Any, Any, None]:
        async def close() -> None:
            try:
                if connection.invalidated:  # e.g. a statement cancelled mid-flight
                    return
                raw = await connection.get_raw_connection()
                unbridge_driver(raw.dbapi_connection)
                await connection.rollback()
            finally:
                await connection.close()

        return close()

    def _started(self, connection: AsyncConnection) -> None:
        self._connection = connection
        try:
            self._route(connection, connection.sync_connection)  # type: ignore[arg-type]
        except BaseException:
            assert self._home is not None
            self._home.run(self._close(connection))
            self._home.stop()
            self._home = self._connection = None
            raise

    async def __aenter__(self) -> Self:
        # The same steps as ``with``: they wait on the connection's own loop, so they
        # run in a worker thread rather than block this one.
        return await asyncio.to_thread(self.__enter__)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        warn_left_open(await asyncio.to_thread(self._leave), exc)

    def __enter__(self) -> Self:
        """Enter from sync code (a sync test, a pytest fixture); the app may be async."""
        self._check_free()
        home = self._home = HomeLoop()
        home.start()
        try:
            connection = home.run(self._open())
        except BaseException:
            home.stop()
            self._home = None
            raise
        self._started(connection)
        self._isolate_targets()
        return self

    def _leave(self) -> int:
        home, connection = self._home, self._connection
        if home is None or connection is None:
            return 0
        left_open = self._leave_targets()
        left_open += self._stop()
        try:
            self._unroute()
        finally:
            try:
                home.run(self._close(connection))
            finally:
                home.stop()
            self._home = self._connection = None
            self._retire_sessions()
        return left_open

    def _check_free(self) -> None:
        if self._home is not None:
            raise ConfigurationError("this isolated() handle is in use; make one per block")
        self._check_not_isolated()

    def _acquire(self, transaction: SessionTransaction) -> None:
        if in_greenlet():
            await_(self._lock.acquire_async(transaction))
        elif not self._lock.acquire_now(transaction):
            # Autobegun outside SQLAlchemy's greenlet (session.add() does that), where
            # nothing can wait: wait at the first flush or statement instead, which run
            # in the greenlet before the connection is touched.
            self._pending.add(transaction)

    def _wait_on_top(self, transaction: SessionTransaction) -> None:
        if in_greenlet():
            await_(self._lock.wait_on_top_async(transaction))
        else:
            self._lock.wait_on_top(transaction)

    def _isolation_for(
        self, name: str, factory: SessionFactory[Any] | SyncSessionFactory[Any]
    ) -> AsyncIsolation[Any]:
        if not isinstance(factory, SessionFactory):
            raise ConfigurationError(
                f"binds[{name}] is a SyncSessionFactory, which async sessions cannot use in "
                "isolated(); bind its SessionFactory instead"
            )
        return AsyncIsolation(factory, run_hooks=self._run_hooks, lock_timeout=self._lock_timeout)


class SyncIsolation(BaseIsolation, Generic[_S]):
    """The handle ``isolated(db.sync)`` gives for a ``SyncSessionFactory``."""

    def __init__(
        self, db: SyncSessionFactory[_S], *, run_hooks: bool, lock_timeout: float
    ) -> None:
        super().__init__(core_of(db), run_hooks=run_hooks, lock_timeout=lock_timeout)
        #: The isolated factory (the one given: it is routed, not copied).
        self.factory = db
        self._connection: Connection | None = None

    @property
    def connection(self) -> Connection:
        """The connection every session of the factory uses while isolated."""
        if self._connection is None:
            raise IsolationNotEnteredError("the isolated() block has not been entered")
        return self._connection

    def run_hooks(self) -> int:
        """Run the captured on-commit hooks in order; return how many (see the async one)."""
        count = 0
        while self.hooks:
            result = self.hooks.pop(0)()
            if inspect.isawaitable(result):
                if inspect.iscoroutine(result):
                    result.close()
                raise TypeError("an on-commit hook returned an awaitable on the sync twin")
            count += 1
        return count

    def __enter__(self) -> Self:
        if self._connection is not None:
            raise ConfigurationError("this isolated() handle is in use; make one per block")
        self._check_not_isolated()
        connection = self._core.sync_engine().connect()
        try:
            connection.begin()
            self._route(connection, connection)
        except BaseException:
            connection.close()
            raise
        self._connection = connection
        self._isolate_targets()
        return self

    def _leave(self) -> int:
        connection = self._connection
        if connection is None:
            return 0
        left_open = self._leave_targets()
        self._connection = None
        left_open += self._stop()
        try:
            self._unroute()
        finally:
            try:
                if not connection.invalidated:
                    connection.rollback()
            finally:
                connection.close()
                self._retire_sessions()
        return left_open

    def _acquire(self, transaction: SessionTransaction) -> None:
        self._lock.acquire(transaction)

    def _wait_on_top(self, transaction: SessionTransaction) -> None:
        self._lock.wait_on_top(transaction)

    def _isolation_for(
        self, name: str, factory: SessionFactory[Any] | SyncSessionFactory[Any]
    ) -> SyncIsolation[Any]:
        sync = factory.sync if isinstance(factory, SessionFactory) else factory
        return SyncIsolation(sync, run_hooks=self._run_hooks, lock_timeout=self._lock_timeout)
