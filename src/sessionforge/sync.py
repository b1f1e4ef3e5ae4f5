"""``SyncSessionFactory``: the sync twin, for migrations, CLI commands, workers, notebooks."""

from __future__ import annotations

import functools
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, Self, TypeVar, TypeVarTuple, cast, overload

from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from ._internal.begin import SyncBeginContext as SyncBeginContext
from ._internal.core import (
    FactoryCore,
    check_ping_timeout,
    resolve_target,
    unavailable,
)
from ._internal.engines import check_driver
from ._internal.ping import round_trip
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
from .config import FactoryConfig, SyncFactoryArguments

if TYPE_CHECKING:
    from typing import Unpack

__all__ = ["SyncSessionFactory"]

_S = TypeVar("_S", bound=Session)
_T = TypeVar("_T")
_Ts = TypeVarTuple("_Ts")


class SyncSessionFactory(TwinBase, Generic[_S]):
    """A configurable factory of ``Session`` objects over a sessionforge configuration.

    Reached as ``db.sync`` (sharing ``db``'s configuration: ``configure()`` on either
    is seen by both), or built on its own. Same methods and semantics as
    ``SessionFactory``, without the awaits. The engine's driver is the sync partner of
    the async one (aiosqlite → pysqlite, asyncpg/psycopg → psycopg, aiomysql/asyncmy →
    pymysql), with the same presets.

    Example::

        sdb = SyncSessionFactory(FactoryConfig.from_url("postgresql://app@db/app"))
        with sdb.begin() as session:
            session.add(User(name="ada"))
        sdb.dispose()
    """

    _twin = "sync"

    @overload
    def __init__(
        self: SyncSessionFactory[Session],
        target: str | URL | Engine | Connection | FactoryConfig | None = None,
        /,
        **options: Unpack[SyncFactoryArguments],
    ) -> None: ...

    @overload
    def __init__(
        self,
        target: str | URL | Engine | Connection | FactoryConfig | None = None,
        /,
        *,
        sync_class_: type[_S],
        **options: Unpack[SyncFactoryArguments],
    ) -> None: ...

    def __init__(
        self,
        target: str | URL | Engine | Connection | FactoryConfig | None = None,
        /,
        *,
        sync_class_: type[_S] | None = None,
        **options: Any,
    ) -> None:
        if sync_class_ is not None:
            options["sync_class_"] = sync_class_
        resolved = resolve_target(target, options, "sync")
        self._core: FactoryCore[Any] = FactoryCore(resolved, twin="sync")

    @classmethod
    def _from_core(cls, core: FactoryCore[Any]) -> SyncSessionFactory[Session]:
        """The twin of an async factory: same core, driver checked now."""
        if core.config.url is not None and core.sync_engine_if_built is None:
            check_driver(core.config.sync_url, is_async=False)
        twin: SyncSessionFactory[Session] = object.__new__(SyncSessionFactory)
        twin._core = core
        return twin

    # making sessions ---------------------------------------------------------------

    def __call__(self, **overrides: Any) -> _S:
        """Return a new session; ``overrides`` win over the factory's session options.

        ``binds={...}`` in ``overrides`` replaces the factory's binds for this session.
        """
        core = self._core
        session = core.new_sync_session(core.sync_class, None, overrides, require_bind=False)
        return cast("_S", session)

    def begin(
        self,
        *,
        isolation_level: str | None = None,
        readonly: bool = False,
        timeout: float | None = None,
        settings: Mapping[str, Any] | None = None,
        **overrides: Any,
    ) -> SyncBeginContext[_S]:
        """Return a ``with`` context: a session in a transaction, committed at exit.

        On an exception the transaction is rolled back and the same exception
        propagates; the session is closed in every case, including a failed COMMIT.
        The options are those of ``SessionFactory.begin()``; sync code cannot be
        interrupted, so ``timeout`` is checked when the block ends (and enforced per
        statement by PostgreSQL's ``statement_timeout``).
        """
        options = self._begin_options(isolation_level, readonly, timeout, settings, overrides)
        # A traced context once sessionforge.telemetry.instrument(db) ran; one check if not.
        begin = self._core.stats.sync_context or SyncBeginContext
        return begin(functools.partial(self._session, options, overrides), options)

    def reader(self, **overrides: Any) -> _S:
        """A session for reads only, on an AUTOCOMMIT connection (see ``SessionFactory``)."""
        core = self._core
        options, _, reader_class = core.reader()
        return cast("_S", core.new_sync_session(reader_class, options, overrides, reader=True))

    def _session(self, options: TransactionOptions | None, overrides: Mapping[str, Any]) -> _S:
        core = self._core
        return cast("_S", core.new_sync_session(core.sync_class, options, overrides))

    def run_transaction(
        self,
        fn: Callable[[_S, *_Ts], _T],
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
        """Run ``fn(session, *args)`` in ``begin(...)``, re-running it on conflicts.

        Same policy as ``SessionFactory.run_transaction``.
        """
        policy, options = self._retry_options(
            retries, backoff, retry_if, isolation_level, readonly, timeout, settings
        )
        return self._run_transaction(fn, args, policy, options)

    def _run_transaction(
        self,
        fn: Callable[[_S, *_Ts], _T],
        args: tuple[*_Ts],
        policy: RetryPolicy,
        options: TransactionOptions | None,
    ) -> _T:
        attempt = 0
        while True:
            attempt += 1
            try:
                make = functools.partial(self._session, options, {})
                begin = self._core.stats.sync_context or SyncBeginContext  # as in begin()
                with begin(make, options, attempt) as session:
                    result = fn(session, *args)
            except Exception as exc:
                if not policy.should_retry(exc, attempt):
                    raise
                self._core.stats.retried()
                time.sleep(policy.delay(attempt))
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
    ) -> Callable[[Callable[[_S, *_Ts], _T]], Callable[[*_Ts], _T]]:
        """Decorator form of ``run_transaction``: ``fn(session, *args)`` becomes ``fn(*args)``."""
        options = self._retry_options(
            retries, backoff, retry_if, isolation_level, readonly, timeout, settings
        )

        def decorate(fn: Callable[[_S, *_Ts], _T]) -> Callable[[*_Ts], _T]:
            @functools.wraps(fn)
            def run(*args: *_Ts) -> _T:
                return self._run_transaction(fn, args, *options)

            return run

        return decorate

    # the current session -----------------------------------------------------------

    @contextmanager
    def scope(self, **overrides: Any) -> Iterator[_S]:
        """Make a new session the current one of this thread/context for the block."""
        session = self(**overrides)
        current = self._core.current_sync
        token = current.set(session)
        try:
            with session:
                yield session
        finally:
            current.reset(token)

    def current(self) -> _S:
        """The current session of this thread/context, or ``NoCurrentSessionError``."""
        return cast("_S", self._core.current_sync.get(self.__repr__))

    @contextmanager
    def atomic(
        self,
        *,
        durable: bool = False,
        isolation_level: str | None = None,
        readonly: bool = False,
        timeout: float | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> Iterator[_S]:
        """A transaction, or a SAVEPOINT inside the current one (see ``SessionFactory``)."""
        check_durable(durable)
        current = self._core.current_sync
        session = current.peek()
        if session is None or not joins(session):
            context = self.begin(
                isolation_level=isolation_level,
                readonly=readonly,
                timeout=timeout,
                settings=settings,
            )
            with context as new_session:
                token = current.set(new_session)
                try:
                    with atomic_block(new_session):
                        yield new_session
                finally:
                    current.reset(token)
            return
        with atomic_block(session) as depth:
            check_joinable(depth, durable, isolation_level, readonly, timeout, settings)
            with session.begin_nested():
                yield cast("_S", session)
            if not depth:
                session.commit()

    # sessionmaker's class methods ----------------------------------------------------

    object_session = staticmethod(Session.object_session)
    identity_key = staticmethod(Session.identity_key)

    def close_all(self) -> int:
        """Close every open session this factory's sync twin made in this process.

        Sessions of the async twin are left to ``await db.close_all()``. Returns how
        many sessions were closed.
        """
        sessions = self._core.open_sessions("sync")
        for session in sessions:
            session.close()
        return len(sessions)

    # the database ------------------------------------------------------------------

    def ping(self, *, timeout: float = 10.0) -> float:
        """Check out a connection and make one round trip; return the seconds taken.

        Raises ``DatabaseUnavailableError`` when the database cannot be reached or
        does not answer within ``timeout`` seconds. Sync I/O cannot be interrupted, so
        the probe runs in a thread of its own and the caller stops waiting at the
        deadline; a probe still hanging then finishes (or fails) in the background
        and returns its connection to the pool.
        """
        check_ping_timeout(timeout)
        engine = self._core.sync_engine()
        started = time.perf_counter()
        outcome: queue.SimpleQueue[BaseException | None] = queue.SimpleQueue()

        def probe() -> None:
            try:
                with engine.connect() as connection:
                    round_trip(connection)
            except BaseException as exc:  # handed to the caller below
                outcome.put(exc)
            else:
                outcome.put(None)

        threading.Thread(target=probe, name="sessionforge-ping", daemon=True).start()
        try:
            error = outcome.get(timeout=timeout)
        except queue.Empty:
            error = TimeoutError()
        if isinstance(error, DBAPIError | OSError | TimeoutError):
            raise unavailable(engine.url, error, timeout) from error
        if error is not None:
            raise error
        return time.perf_counter() - started

    def dispose(self) -> None:
        """Close the pooled connections of the sync engine, if this factory built it.

        The async twin's engine needs its event loop: ``await db.dispose()`` closes
        both.
        """
        for _, sync_engine in self._core.forget_all_engines(sync_only=True):
            if sync_engine is not None:
                sync_engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.dispose()

    # introspection -----------------------------------------------------------------

    @property
    def class_(self) -> type[_S]:
        """This factory's own subclass of the sync session class."""
        return cast("type[_S]", self._core.sync_class)

    @property
    def engine(self) -> Engine:
        """The sync engine sessions are bound to, built on first use."""
        return self._core.sync_engine()

    @property
    def url(self) -> URL:
        engine = self._core.sync_engine_if_built
        return engine.url if engine is not None else self._core.config.sync_url

    def __repr__(self) -> str:
        base = self._core.config.sync_class_ or self._core.config.class_.sync_session_class
        engine = self._core.sync_engine_if_built
        url = engine.url if engine is not None else self._core.config.url
        if url is not None and engine is None:
            url = self._core.config.sync_url
        return self._core.describe("SyncSessionFactory", base, url)
