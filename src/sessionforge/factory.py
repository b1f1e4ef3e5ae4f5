"""``SessionFactory``: the async session factory, sessionmaker's async-first twin."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from types import TracebackType
from typing import (
    TYPE_CHECKING,
    Any,
    Generic,
    Literal,
    Self,
    TypeVar,
    TypeVarTuple,
    Unpack,
    overload,
)

from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from ._internal.begin import AsyncBeginContext as AsyncBeginContext
from ._internal.core import FactoryCore
from ._internal.diagnosis import check_ping_timeout, unavailable
from ._internal.ping import round_trip
from ._internal.targets import resolve_target
from ._internal.transactions import (
    RetryPolicy,
    RetryPredicate,
    TransactionOptions,
    atomic_block,
    check_durable,
    check_joinable,
    joins,
)
from ._internal.twin import TwinBase
from .config import FactoryArguments, FactoryConfig

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from .asgi import Lifespan
    from .sync import SyncSessionFactory

__all__ = ["SessionFactory"]

_AS = TypeVar("_AS", bound=AsyncSession)
_T = TypeVar("_T")
_Ts = TypeVarTuple("_Ts")


class SessionFactory(TwinBase, Generic[_AS]):
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
    """

    _twin = "async"

    @overload
    def __init__(
        self: SessionFactory[AsyncSession],
        target: str | URL | AsyncEngine | AsyncConnection | FactoryConfig | None = None,
        /,
        **options: Unpack[FactoryArguments],
    ) -> None: ...

    @overload
    def __init__(
        self,
        target: str | URL | AsyncEngine | AsyncConnection | FactoryConfig | None = None,
        /,
        *,
        class_: type[_AS],
        **options: Unpack[FactoryArguments],
    ) -> None: ...

    def __init__(
        self,
        target: str | URL | AsyncEngine | AsyncConnection | FactoryConfig | None = None,
        /,
        *,
        class_: type[_AS] | None = None,
        **options: Any,
    ) -> None:
        if class_ is not None:
            options["class_"] = class_
        resolved = resolve_target(target, options, "async")
        self._core: FactoryCore[_AS] = FactoryCore(resolved, twin="async")
        self._sync: SyncSessionFactory[Session] | None = None
        self._dependencies: dict[tuple[str, object], Callable[..., Awaitable[_AS]]] = {}

    # making sessions ---------------------------------------------------------------

    def __call__(self, **overrides: Any) -> _AS:
        """Return a new session; ``overrides`` win over the factory's session options.

        ``binds={...}`` in ``overrides`` replaces the factory's binds for this session.
        """
        core = self._core
        return core.new_async_session(core.async_class, None, overrides, require_bind=False)

    def begin(
        self,
        *,
        isolation_level: str | None = None,
        readonly: bool = False,
        timeout: float | None = None,
        settings: Mapping[str, Any] | None = None,
        **overrides: Any,
    ) -> AsyncBeginContext[_AS]:
        """Return ``async with`` context: a session in a transaction, committed at exit.

        On an exception the transaction is rolled back and the same exception
        propagates. The session is closed in every case, including a failed COMMIT
        (``async_sessionmaker.begin()`` leaves it open then).

        ``isolation_level`` and ``readonly`` apply to this transaction only; the pooled
        connection goes back to the next user at the engine's defaults. ``timeout`` is
        a deadline in seconds for the block (on PostgreSQL also a transaction-local
        ``statement_timeout``): past it the work is cancelled, rolled back, and
        ``TransactionTimeoutError`` raised. ``settings`` are transaction-local
        PostgreSQL settings (``set_config(name, value, true)``, values bound).
        """
        options = self._begin_options(isolation_level, readonly, timeout, settings, overrides)
        make, core = functools.partial(self._session, options, overrides), self._core
        # A traced context once sessionforge.telemetry.instrument(db) ran; one check if not.
        return (core.stats.async_context or AsyncBeginContext)(make, options, core.replicas)

    def reader(self, **overrides: Any) -> _AS:
        """A session for reads only, on an AUTOCOMMIT connection from the same pool.

        No BEGIN and no COMMIT: each statement is its own transaction and sees its own
        snapshot, so two reads may see different data (use ``begin(readonly=True)``
        for reads that must agree). ORM changes and ``insert``/``update``/``delete``
        raise ``ReadOnlySessionError``; text SQL is not inspected. The connection goes
        back to the pool in its normal transactional mode. ``async with db.reader() as
        session:`` closes it at exit. With ``replicas=``, a replica that has this
        context's writes serves it (README, "Read replicas").
        """
        core = self._core
        options, reader_class, _ = core.reader()
        return core.new_async_session(reader_class, options, overrides, reader=True)

    def _session(self, options: TransactionOptions | None, overrides: Mapping[str, Any]) -> _AS:
        return self._core.new_async_session(self._core.async_class, options, overrides)

    async def run_transaction(
        self,
        fn: Callable[[_AS, Unpack[_Ts]], Awaitable[_T]],
        /,
        *args: *_Ts,
        retries: int = 5,
        backoff: float = 0.05,
        isolation_level: str | None = None,
        readonly: bool = False,
        timeout: float | None = None,
        settings: Mapping[str, Any] | None = None,
        retry_if: RetryPredicate | None = None,
    ) -> _T:
        """Run ``await fn(session, *args)`` in ``begin(...)``, re-running it on conflicts.

        A retryable error (serialization failure, deadlock, SQLite busy — see
        ``dialects.is_retryable``; ``retry_if(exc)`` may say True/False first) re-runs
        the whole function in a fresh session after a jittered exponential backoff.
        ``retries`` counts re-runs after the first attempt; when they are used up,
        ``RetryExhaustedError`` carries the last error. Any other error propagates
        unchanged after one attempt. Keyword arguments for ``fn``: ``functools.partial``.

        Example::

            async def transfer(session, src, dst, amount): ...

            await db.run_transaction(transfer, 1, 2, 100, isolation_level="SERIALIZABLE")
        """
        policy, options = self._retry_options(
            retries, backoff, retry_if, isolation_level, readonly, timeout, settings
        )
        return await self._run_transaction(fn, args, policy, options)

    async def _run_transaction(
        self,
        fn: Callable[[_AS, Unpack[_Ts]], Awaitable[_T]],
        args: tuple[*_Ts],
        policy: RetryPolicy,
        options: TransactionOptions | None,
    ) -> _T:
        attempt = 0
        while True:
            attempt += 1
            try:
                make = functools.partial(self._session, options, {})
                begin = self._core.stats.async_context or AsyncBeginContext  # as in begin()
                async with begin(make, options, self._core.replicas, attempt) as session:
                    result = await fn(session, *args)
            except Exception as exc:
                if not policy.should_retry(exc, attempt):
                    raise
                self._core.stats.retried()
                await asyncio.sleep(policy.delay(attempt))
            else:
                return result

    def transactional(
        self,
        *,
        retries: int = 5,
        backoff: float = 0.05,
        isolation_level: str | None = None,
        readonly: bool = False,
        timeout: float | None = None,
        settings: Mapping[str, Any] | None = None,
        retry_if: RetryPredicate | None = None,
    ) -> Callable[
        [Callable[[_AS, Unpack[_Ts]], Awaitable[_T]]], Callable[[Unpack[_Ts]], Awaitable[_T]]
    ]:
        """Decorator form of ``run_transaction``: ``fn(session, *args)`` becomes ``fn(*args)``.

        Example::

            @db.transactional(isolation_level="SERIALIZABLE")
            async def transfer(session, src, dst, amount): ...

            await transfer(1, 2, 100)
        """
        options = self._retry_options(
            retries, backoff, retry_if, isolation_level, readonly, timeout, settings
        )

        def decorate(
            fn: Callable[[_AS, Unpack[_Ts]], Awaitable[_T]],
        ) -> Callable[[Unpack[_Ts]], Awaitable[_T]]:
            @functools.wraps(fn)
            async def run(*args: *_Ts) -> _T:
                return await self._run_transaction(fn, args, *options)

            return run

        return decorate

    # the current session -----------------------------------------------------------

    @asynccontextmanager
    async def scope(self, **overrides: Any) -> AsyncIterator[_AS]:
        """Make a new session the task's current one for the block; close it at exit.

        Like ``db()``, it never commits by itself. Scopes nest: leaving one restores
        the previous current session, also on error or cancellation.
        """
        session = self(**overrides)
        token = self._core.current_async.set(session)
        try:
            async with session:
                yield session
        finally:
            self._core.current_async.reset(token)

    def current(self) -> _AS:
        """The task's current session, or ``NoCurrentSessionError``."""
        return self._core.current_async.get(self.__repr__)

    @asynccontextmanager
    async def atomic(
        self,
        *,
        durable: bool = False,
        isolation_level: str | None = None,
        readonly: bool = False,
        timeout: float | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> AsyncIterator[_AS]:
        """A transaction, or a SAVEPOINT inside the current one (Django's ``atomic``).

        With no current session in a transaction, the block gets a new session in a
        new transaction, made current for the block and committed at exit. When the
        task's current session is in a transaction, the block runs in a SAVEPOINT of
        it: an exception leaving the block rolls back only the savepoint; and when no
        other atomic block encloses this one (the transaction was begun by a read in
        ``scope()``, say), leaving it also commits, as leaving an outermost atomic
        block does. ``durable=True`` refuses to be nested in another atomic block.
        """
        check_durable(durable)
        current = self._core.current_async.peek()
        if current is None or not joins(current.sync_session):
            context = self.begin(
                isolation_level=isolation_level,
                readonly=readonly,
                timeout=timeout,
                settings=settings,
            )
            async with context as session:
                token = self._core.current_async.set(session)
                try:
                    with atomic_block(session.sync_session):
                        yield session
                finally:
                    self._core.current_async.reset(token)
            return
        with atomic_block(current.sync_session) as depth:
            check_joinable(depth, durable, isolation_level, readonly, timeout, settings)
            async with current.begin_nested():
                yield current
            if not depth:
                await current.commit()

    # sessionmaker's class methods ----------------------------------------------------

    # As AsyncSession's: the sync Session (async_object_session() gives the AsyncSession)
    object_session = staticmethod(AsyncSession.object_session)
    identity_key = staticmethod(AsyncSession.identity_key)

    async def close_all(self) -> int:
        """Close every open session this factory made in the running event loop.

        For a graceful shutdown (returns how many): transactions are rolled back, their
        connections returned; sessions holding another loop's connection are left alone.
        """
        sessions = self._core.open_sessions("async")
        ended = await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)
        if errors := [outcome for outcome in ended if isinstance(outcome, BaseException)]:
            raise errors[0]  # every session had its close first
        return len(sessions)

    # the database ------------------------------------------------------------------

    async def ping(self, *, timeout: float = 10.0) -> float:
        """Check out a connection and make one round trip; return the seconds taken.

        Raises ``DatabaseUnavailableError`` when the database cannot be reached or
        does not answer within ``timeout`` seconds.
        """
        check_ping_timeout(timeout)
        engine = self._core.async_engine()
        started = time.perf_counter()
        try:
            async with asyncio.timeout(timeout), engine.connect() as connection:
                await connection.run_sync(round_trip)
        except (DBAPIError, OSError, TimeoutError) as exc:
            raise unavailable(engine.url, exc, timeout) from exc
        return time.perf_counter() - started

    async def dispose(self) -> None:
        """Close the pooled connections of every engine this factory built.

        An engine passed in by the user is left alone. The factory stays usable: the
        next session builds a fresh engine.
        """
        for async_engine, sync_engine in self._core.forget_all_engines():
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

    # web apps (sessionforge.asgi) -----------------------------------------------------

    @property
    def lifespan(self) -> Lifespan:
        """``FastAPI(lifespan=db.lifespan)``: disposes the engines when the app stops.

        ``db.lifespan.with_ping(timeout=5)`` also checks at startup that the database
        answers (``DatabaseUnavailableError`` stops the app otherwise).
        """
        from .asgi import Lifespan

        return Lifespan(self)

    def dependency(
        self,
        *,
        commit: Literal["auto", "manual"] = "auto",
        readonly: bool = False,
        isolation_level: str | None = None,
    ) -> Callable[..., Awaitable[_AS]]:
        """A FastAPI dependency giving the request's session, its transaction ended
        before the response is sent (``commit="auto"``: committed, or rolled back when
        the endpoint raises; see ``sessionforge.asgi``)::

            SessionDep = Annotated[AsyncSession, Depends(db.dependency())]
        """
        options = self._core.transaction_options(isolation_level, readonly, None, None)
        key = (commit, None if options is None else options.cache_key)
        dependency = self._dependencies.get(key)
        if dependency is None:
            from .asgi import make_dependency

            make = functools.partial(self._session, options, {})
            dependency = self._dependencies[key] = make_dependency(self, make, key[1], commit)
        return dependency

    # introspection -----------------------------------------------------------------

    @property
    def sync(self) -> SyncSessionFactory[Session]:
        """The sync twin: same configuration, same session options, a sync engine.

        A factory made on an ``AsyncConnection`` has none (``ConfigurationError``).
        """
        if self._sync is None:
            self._core.check_sync_twin()
            from .sync import SyncSessionFactory

            self._sync = SyncSessionFactory._from_core(self._core)
        return self._sync

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

    def __repr__(self) -> str:
        return self._core.describe("SessionFactory", self._core.config.class_, self.config.url)
