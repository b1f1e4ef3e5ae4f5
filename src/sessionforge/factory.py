"""``SessionFactory``: the async session factory, sessionmaker's async-first twin."""

from __future__ import annotations

import asyncio
import contextlib
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
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    AsyncSessionTransaction,
)

from . import dialects
from ._internal.cancellation import end_and_close, run_to_completion
from ._internal.core import (
    FactoryCore,
    FactoryStatus,
    check_ping_timeout,
    resolve_target,
    unavailable,
)
from ._internal.engines import check_driver
from ._internal.stats import open_sessions
from ._internal.transactions import (
    RetryPolicy,
    RetryPredicate,
    TransactionOptions,
    atomic_block,
    check_durable,
    check_joinable,
    joins,
)
from .config import FactoryArguments, FactoryConfig
from .errors import ConfigurationError, TransactionTimeoutError

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from .asgi import Lifespan
    from .sync import SyncSessionFactory

__all__ = ["SessionFactory"]

_AS = TypeVar("_AS", bound=AsyncSession)
_T = TypeVar("_T")
_Ts = TypeVarTuple("_Ts")


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
        resolved = resolve_target(target, options, twin="async")
        if resolved.config.url is not None:
            check_driver(resolved.config.async_url, is_async=True)
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
        options = self._core.transaction_options(isolation_level, readonly, timeout, settings)
        if overrides:
            self._core.session_kwargs(overrides, "async")  # bad arguments fail here
        return AsyncBeginContext(functools.partial(self._session, options, overrides), options)

    def reader(self, **overrides: Any) -> _AS:
        """A session for reads only, on an AUTOCOMMIT connection from the same pool.

        No BEGIN and no COMMIT: each statement is its own transaction and sees its own
        snapshot, so two reads may see different data (use ``begin(readonly=True)``
        for reads that must agree). ORM changes and ``insert``/``update``/``delete``
        raise ``ReadOnlySessionError``; text SQL is not inspected. The connection goes
        back to the pool in its normal transactional mode. ``async with db.reader() as
        session:`` closes it at exit.
        """
        core = self._core
        options, reader_class, _ = core.reader()
        return core.new_async_session(reader_class, options, overrides, reader=True)

    def _session(self, options: TransactionOptions | None, overrides: Mapping[str, Any]) -> _AS:
        core = self._core
        return core.new_async_session(core.async_class, options, overrides)

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
        policy = RetryPolicy.build(retries, backoff, retry_if)
        options = self._core.transaction_options(isolation_level, readonly, timeout, settings)
        attempt = 0
        while True:
            attempt += 1
            try:
                context = AsyncBeginContext(functools.partial(self._session, options, {}), options)
                async with context as session:
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
        RetryPolicy.build(retries, backoff, retry_if)
        self._core.transaction_options(isolation_level, readonly, timeout, settings)

        def decorate(
            fn: Callable[[_AS, Unpack[_Ts]], Awaitable[_T]],
        ) -> Callable[[Unpack[_Ts]], Awaitable[_T]]:
            @functools.wraps(fn)
            async def run(*args: *_Ts) -> _T:
                return await self.run_transaction(
                    fn,
                    *args,
                    retries=retries,
                    backoff=backoff,
                    isolation_level=isolation_level,
                    readonly=readonly,
                    timeout=timeout,
                    settings=settings,
                    retry_if=retry_if,
                )

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

    def configure(self, **options: Any) -> None:
        """Change session options for later sessions of this factory and its twin.

        As ``sessionmaker.configure()``: ``bind=`` (a URL, an ``AsyncEngine`` or an
        ``AsyncConnection``) binds a factory made without one, before it first builds
        an engine; ``binds={...}`` replaces the factory's binds.
        """
        self._core.configure(options, "async")

    # sessionmaker's class methods ----------------------------------------------------

    # As AsyncSession's own: object_session() answers the (sync) Session, like
    # AsyncSession.object_session; sqlalchemy.ext.asyncio.async_object_session() gives
    # the AsyncSession.
    object_session = staticmethod(AsyncSession.object_session)
    identity_key = staticmethod(AsyncSession.identity_key)

    async def close_all(self) -> int:
        """Close every open session this factory made in the running event loop.

        For a graceful shutdown: sessions still in a transaction are rolled back and
        their connections returned. Sessions holding a connection of another event
        loop are left alone (they can only be closed in their own loop). Returns how
        many sessions were closed. (SQLAlchemy 2.1 removed ``sessionmaker.close_all()``;
        ``sqlalchemy.orm.close_all_sessions()`` closes every session of the process.)
        """
        closed = 0
        for sync_session in open_sessions(self._core.sync_class):
            session = AsyncSession._retrieve_proxy_for_target(sync_session, regenerate=False)
            if session is None or not self._core.in_this_loop(sync_session):
                continue
            await session.close()
            closed += 1
        return closed

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
        before the response is sent::

            SessionDep = Annotated[AsyncSession, Depends(db.dependency())]

        ``commit="auto"`` commits when the endpoint returns and rolls back when it
        raises (``HTTPException`` included); ``"manual"`` never commits. The session is
        the request's current one (``db.current()``); ``db.atomic()`` in the request is
        a SAVEPOINT of its transaction. The same options give the same dependency, so
        every use in one request shares one session. Inside ``SessionMiddleware`` the
        middleware's session is shared and the middleware ends it.
        """
        options = self._core.transaction_options(isolation_level, readonly, None, None)
        options_key = None if options is None else options.cache_key
        dependency = self._dependencies.get((commit, options_key))
        if dependency is None:
            from .asgi import make_dependency

            dependency = self._dependencies[(commit, options_key)] = make_dependency(
                self, functools.partial(self._session, options, {}), options_key, commit
            )
        return dependency

    # introspection -----------------------------------------------------------------

    @property
    def sync(self) -> SyncSessionFactory[Session]:
        """The sync twin: same configuration, same session options, a sync engine.

        A factory made on an ``AsyncConnection`` has none (``ConfigurationError``).
        """
        if self._sync is None:
            if self._core.connection is not None:
                raise ConfigurationError(
                    "this factory was made on an AsyncConnection, which sync code cannot "
                    "use, so it has no sync twin; make a SyncSessionFactory on a "
                    "Connection (or a URL) for sync code"
                )
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
        return self._core.describe("SessionFactory", self._core.config.class_, self.config.url)


class AsyncBeginContext(Generic[_AS]):
    """What ``SessionFactory.begin()`` returns: ``async with`` yields the session.

    The session is made when the block is entered, so a context that is never
    entered leaves nothing behind (and is not counted as an open session).
    """

    __slots__ = ("_deadline", "_make_session", "_options", "_session", "_transaction")

    def __init__(
        self, make_session: Callable[[], _AS], options: TransactionOptions | None = None
    ) -> None:
        self._make_session = make_session
        self._options = options
        self._transaction: AsyncSessionTransaction | None = None
        self._deadline: asyncio.Timeout | None = None

    async def __aenter__(self) -> _AS:
        self._session = self._make_session()
        try:
            if self._options is not None and self._options.timeout is not None:
                self._deadline = asyncio.timeout(self._options.timeout)
                await self._deadline.__aenter__()
            self._transaction = await self._session.begin()
        except BaseException as error:
            if self._deadline is not None:  # disarm it: it must not cancel later code
                with contextlib.suppress(BaseException):
                    await self._deadline.__aexit__(type(error), error, error.__traceback__)
            await run_to_completion(self._session.close())
            raise
        return self._session

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._transaction is not None, "__aexit__ without __aenter__"
        timed_out = False
        if self._deadline is not None:
            # The deadline covers the block, not the COMMIT: a COMMIT cut short would
            # leave the caller not knowing whether it happened.
            try:
                await self._deadline.__aexit__(exc_type, exc, tb)
            except TimeoutError as expired:
                exc_type, exc, timed_out = TimeoutError, expired, True
        if (
            exc is not None
            and self._options is not None
            and self._options.timeout is not None
            and dialects.is_statement_timeout(exc)
        ):
            timed_out = True  # our transaction-local statement_timeout fired
        end: Callable[[], Awaitable[object]]
        if timed_out and self._options is not None and self._options.invalidate_on_timeout:
            # A statement may still be running on the server: drop the connection (the
            # server rolls back) rather than queue a ROLLBACK behind it.
            end = self._session.invalidate
        else:
            end = functools.partial(self._transaction.__aexit__, exc_type, exc, tb)
        await end_and_close(self._session, end)
        if timed_out:
            assert self._options is not None
            raise TransactionTimeoutError(
                f"the transaction outlived its timeout of {self._options.timeout:g}s and was "
                "rolled back; raise timeout= or make the work shorter"
            ) from exc
