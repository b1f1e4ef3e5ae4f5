"""``SessionFactory``: the async session factory, sessionmaker's async-first twin."""

from __future__ import annotations

import asyncio
import time
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, Self, TypeVar, overload

from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, AsyncSessionTransaction

from .config import FactoryConfig, FactoryOptions
from .core import FactoryCore, FactoryStatus, resolve_target, unavailable
from .engines import check_driver

if TYPE_CHECKING:
    from typing import Unpack

    from sqlalchemy.orm import Session

    from .sync import SyncSessionFactory

__all__ = ["SessionFactory"]

_AS = TypeVar("_AS", bound=AsyncSession)


class SessionFactory(Generic[_AS]):
    """A configurable factory of ``AsyncSession`` objects, like ``async_sessionmaker``.

    Calling it makes a session; nothing is checked out of the pool until the session
    is first used. ``async with db()`` closes the session at exit and never commits;
    ``async with db.begin()`` commits on success, rolls back on error and always
    closes — also when the COMMIT itself fails. ``db.sync`` is the sync twin over the
    same configuration.

    Example::

        db = SessionFactory("sqlite:///app.db")

        async with db.begin() as session:
            session.add(User(name="ada"))

        async with db() as session:
            users = (await session.scalars(select(User))).all()

        await db.dispose()
    """

    @overload
    def __init__(
        self: SessionFactory[AsyncSession],
        target: str | URL | AsyncEngine | FactoryConfig,
        /,
        **options: Unpack[FactoryOptions],
    ) -> None: ...

    @overload
    def __init__(
        self,
        target: str | URL | AsyncEngine | FactoryConfig,
        /,
        *,
        class_: type[_AS],
        **options: Unpack[FactoryOptions],
    ) -> None: ...

    def __init__(
        self,
        target: str | URL | AsyncEngine | FactoryConfig,
        /,
        *,
        class_: type[_AS] | None = None,
        **options: Any,
    ) -> None:
        if class_ is not None:
            options["class_"] = class_
        config, engine = resolve_target(
            target, options, engine_type=AsyncEngine, factory="SessionFactory"
        )
        check_driver(config.async_url, is_async=True)
        self._core: FactoryCore[_AS] = FactoryCore(config, async_engine=engine)
        self._sync: SyncSessionFactory[Session] | None = None

    # making sessions ---------------------------------------------------------------

    def __call__(self, **overrides: Any) -> _AS:
        """Return a new session; ``overrides`` win over the factory's session options."""
        core = self._core
        session: _AS = core.async_class(bind=core.async_engine(), **core.session_kwargs(overrides))
        return session

    def begin(self, **overrides: Any) -> AsyncBeginContext[_AS]:
        """Return ``async with`` context: a session in a transaction, committed at exit.

        On an exception the transaction is rolled back and the same exception
        propagates. The session is closed in every case, including a failed COMMIT
        (``async_sessionmaker.begin()`` leaves it open then).
        """
        return AsyncBeginContext(self(**overrides))

    def configure(self, **options: Any) -> None:
        """Change session options for later sessions of this factory and its twin."""
        self._core.configure(options)

    # the database ------------------------------------------------------------------

    async def ping(self, *, timeout: float = 10.0) -> float:  # noqa: ASYNC109
        """Check out a connection and make one round trip; return the seconds taken.

        Raises ``DatabaseUnavailableError`` when the database cannot be reached or
        does not answer within ``timeout`` seconds.
        """
        engine = self._core.async_engine()
        started = time.perf_counter()
        try:
            async with asyncio.timeout(timeout), engine.connect() as connection:
                # AUTOCOMMIT: one round trip, no BEGIN/ROLLBACK around the SELECT.
                await connection.execution_options(isolation_level="AUTOCOMMIT")
                await connection.exec_driver_sql("SELECT 1")
        except (DBAPIError, OSError, TimeoutError) as exc:
            raise unavailable(engine.url, exc, timeout) from exc
        return time.perf_counter() - started

    def status(self) -> FactoryStatus:
        """Pool figures; ``checked_out`` is the async engine's."""
        return self._core.status(role="async")

    async def dispose(self) -> None:
        """Close the pooled connections of every engine this factory built.

        An engine passed in by the user is left alone. The factory stays usable: the
        next session builds a fresh engine.
        """
        async_engine, sync_engine = self._core.forget_engines()
        if async_engine is not None:
            await async_engine.dispose()
        if sync_engine is not None:
            await asyncio.to_thread(sync_engine.dispose)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.dispose()

    # introspection -----------------------------------------------------------------

    @property
    def sync(self) -> SyncSessionFactory[Session]:
        """The sync twin: same configuration, same session options, a sync engine."""
        if self._sync is None:
            from .sync import SyncSessionFactory

            self._sync = SyncSessionFactory._from_core(self._core)
        return self._sync

    @property
    def config(self) -> FactoryConfig:
        """The current configuration (``configure()`` replaces it)."""
        return self._core.config

    @property
    def class_(self) -> type[_AS]:
        """This factory's own subclass of the session class it was given."""
        return self._core.async_class

    @property
    def engine(self) -> AsyncEngine:
        """The async engine sessions are bound to, built on first use."""
        return self._core.async_engine()

    @property
    def url(self) -> URL:
        return self._core.config.async_url

    @property
    def _sessionforge_event_target(self) -> type[Session]:
        # Lets event.listen(db, ...) reach this factory's sessions (see _sqla.py).
        return self._core.sync_class

    def __repr__(self) -> str:
        return self._core.describe("SessionFactory", self._core.config.class_, self.url)


class AsyncBeginContext(Generic[_AS]):
    """What ``SessionFactory.begin()`` returns: ``async with`` yields the session."""

    __slots__ = ("_session", "_transaction")

    def __init__(self, session: _AS) -> None:
        self._session = session
        self._transaction: AsyncSessionTransaction | None = None

    async def __aenter__(self) -> _AS:
        try:
            self._transaction = await self._session.begin()
        except BaseException:
            await self._session.close()
            raise
        return self._session

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._transaction is not None, "__aexit__ without __aenter__"
        try:
            await self._transaction.__aexit__(exc_type, exc, tb)
        finally:
            await self._session.close()
