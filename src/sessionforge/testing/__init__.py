"""Test isolation: every session of a factory on one connection, rolled back at the end.

``isolated(db)`` opens one connection, begins a transaction on it (on SQLite the
preset's real ``BEGIN IMMEDIATE``), and until the block ends binds every session the
factory makes — in the test, in app code, in FastAPI dependencies and middleware, on
any task, thread or event loop — to that connection with
``join_transaction_mode="create_savepoint"``. A session's transaction is then a
SAVEPOINT: ``commit()`` releases it, ``rollback()`` rolls back to it, ``atomic()``
nests further SAVEPOINTs. At the end the outer transaction is rolled back, so nothing
the test did stays in the database::

    async with isolated(db) as iso:
        async with db.begin() as session:
            session.add(User(name="ada"))     # committed... to a SAVEPOINT
        assert iso.hooks == []                # on-commit hooks are captured, not run

    with isolated(db.sync) as iso: ...

One connection serves one session transaction at a time: a session that begins a
transaction while another session's is open waits for it to end (sessions begun by
the task or thread holding the connection, or by tasks it started, nest instead). A
wait that can never end — the holder was garbage-collected without being closed —
fails at once rather than after ``lock_timeout``.

The block ends at once even if sessions are still open in it (a task still running,
a session never closed): their work is rolled back with the rest, sessions waiting
for the connection are woken with ``SessionClosedError``, every session made in the
block refuses further work with ``SessionClosedError`` saying why (closing and rolling
back stay quiet), and a ``RuntimeWarning`` counts the sessions left open — unless the
block is ending with an exception of its own. (A statement still running in another
task at that moment can make the exit itself fail with the driver's error.)

The async twin's connection lives in an event loop of its own, on a thread of its own;
the driver's I/O is handed to that loop, so sessions in any loop — the test's, or the
one Starlette's ``TestClient`` runs the app in — can use it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import inspect
import threading
import time
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Coroutine, Generator
from contextvars import ContextVar
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Generic, Self, TypeVar, overload

from sqlalchemy import event
from sqlalchemy.engine import Connection, ExceptionContext
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import ORMExecuteState, Session, SessionTransaction
from sqlalchemy.util import await_

from sessionforge._internal.core import FactoryBind, FactoryCore, IsolatedConnection
from sessionforge._internal.sqla import in_greenlet
from sessionforge.errors import ConfigurationError, SessionClosedError
from sessionforge.factory import SessionFactory
from sessionforge.hooks import CAPTURE_KEY, Hook
from sessionforge.sync import SyncSessionFactory

__all__ = ["AsyncIsolation", "SyncIsolation", "isolated"]

_AS = TypeVar("_AS", bound=AsyncSession)
_S = TypeVar("_S", bound=Session)
_T = TypeVar("_T")

#: Seconds a session waits for the isolated connection before giving up.
DEFAULT_LOCK_TIMEOUT = 30.0


@overload
def isolated(
    db: SessionFactory[_AS], *, run_hooks: bool = False, lock_timeout: float = ...
) -> AsyncIsolation[_AS]: ...


@overload
def isolated(
    db: SyncSessionFactory[_S], *, run_hooks: bool = False, lock_timeout: float = ...
) -> SyncIsolation[_S]: ...


def isolated(
    db: SessionFactory[Any] | SyncSessionFactory[Any],
    *,
    run_hooks: bool = False,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
) -> AsyncIsolation[Any] | SyncIsolation[Any]:
    """Route every session of ``db`` onto one connection, rolled back at exit.

    ``async with isolated(db)`` for a ``SessionFactory`` (plain ``with`` also works, for
    sync tests such as ones using Starlette's ``TestClient``); ``with
    isolated(db.sync)`` for a ``SyncSessionFactory``. The handle's ``hooks`` collects
    the on-commit hooks of sessions that committed, in order, without running them;
    ``run_hooks()`` runs them. ``run_hooks=True`` runs them at each commit instead, as
    outside the test. ``lock_timeout`` bounds the wait of a session for the connection
    (a session left open by the test would otherwise hang the next one).

    Leave the block after the sessions made in it are closed and the tasks and threads
    using them are done: sessions still open are rolled back with the test, refuse any
    later use with ``SessionClosedError``, and are counted in a ``RuntimeWarning``.

    Factories in ``db``'s ``binds`` (``binds={Audit: audit_db}``) are isolated with it,
    unless they are isolated already; an engine or connection in ``binds`` cannot be
    rolled back for the test and is refused with ``ConfigurationError`` (bind a
    factory instead). Binds given per call (``db(binds=...)``) are not isolated.
    """
    if isinstance(lock_timeout, bool) or not isinstance(lock_timeout, int | float):
        raise ConfigurationError(f"lock_timeout={lock_timeout!r} is invalid: expected seconds")
    if lock_timeout <= 0:
        raise ConfigurationError(f"lock_timeout={lock_timeout!r} is invalid: expected seconds > 0")
    if isinstance(db, SessionFactory):
        return AsyncIsolation(db, run_hooks=run_hooks, lock_timeout=lock_timeout)
    if isinstance(db, SyncSessionFactory):
        return SyncIsolation(db, run_hooks=run_hooks, lock_timeout=lock_timeout)
    raise ConfigurationError(
        f"isolated() takes a SessionFactory or a SyncSessionFactory, got {type(db).__name__}"
    )


# --- the handles -------------------------------------------------------------------


class _Isolation:
    """What both handles share: the lock, the captured hooks, the session listeners."""

    def __init__(self, core: FactoryCore[Any], *, run_hooks: bool, lock_timeout: float) -> None:
        self._core = core
        self._run_hooks = run_hooks
        self._lock = _ConnectionLock(lock_timeout)
        self._bound: Connection | None = None
        #: Transactions begun outside a greenlet while the connection was taken: they
        #: take their turn at their first statement or flush.
        self._pending: set[SessionTransaction] = set()
        #: Sessions that used the connection: they are retired when the block ends.
        self._sessions: weakref.WeakSet[Session] = weakref.WeakSet()
        #: On-commit hooks of sessions that committed, not run yet, oldest first.
        self.hooks: list[Hook] = []
        #: Isolations of the factories in ``binds``, entered and left with this one.
        self._targets: list[AsyncIsolation[Any] | SyncIsolation[Any]] = []
        self._lock_timeout = lock_timeout

    def _isolate_targets(self) -> None:
        """Isolate the factories this one's ``binds`` route to (see ``isolated``)."""
        twin = "async" if isinstance(self, AsyncIsolation) else "sync"
        try:
            for key, target in self._core.binds.items():
                isolation = _target_isolation(
                    key, target, twin, self._core, self._run_hooks, self._lock_timeout
                )
                if isolation is None:
                    continue
                isolation.__enter__()
                self._targets.append(isolation)
        except BaseException:
            self.__exit__(None, None, None)
            raise

    def _leave_targets(self) -> int:
        left_open = 0
        while self._targets:
            left_open += self._targets.pop()._leave()
        return left_open

    def _route(
        self, connection: AsyncConnection | Connection, sync_connection: Connection
    ) -> None:
        """Send the factory's sessions to ``connection`` (its outer transaction begun)."""
        core = self._core
        self._check_not_isolated()
        self._bound = sync_connection
        if not self._run_hooks:
            sync_connection.info[CAPTURE_KEY] = self.hooks.extend
        for name, listener in self._listeners():
            event.listen(core.sync_class, name, listener)
        event.listen(sync_connection.engine, "handle_error", self._keep_connection)
        core.isolation = IsolatedConnection(connection)

    def _keep_connection(self, context: ExceptionContext) -> None:
        # A statement cancelled mid-flight (a begin(timeout=) deadline, a cancelled
        # task): SQLAlchemy would invalidate the connection, and with it every later
        # session of the test. The drivers finish or cancel the statement and keep the
        # connection usable; the SAVEPOINT is rolled back as for any other error.
        if context.connection is self._bound and isinstance(
            context.original_exception, asyncio.CancelledError
        ):
            context.is_disconnect = False

    def _listeners(self) -> tuple[tuple[str, Any], ...]:
        return (
            ("after_transaction_create", self._transaction_created),
            ("after_transaction_end", self._transaction_ended),
            # where a deferred lock is taken (see AsyncIsolation._acquire)
            ("before_flush", self._before_flush),
            ("do_orm_execute", self._before_execute),
            ("before_commit", self._before_commit),
        )

    def _check_not_isolated(self) -> None:
        if self._core.isolation is not None:
            raise ConfigurationError(
                "this factory is already isolated; isolated() blocks of one factory cannot nest"
            )

    def _unroute(self) -> None:
        core = self._core
        core.isolation = None
        for name, listener in self._listeners():
            event.remove(core.sync_class, name, listener)
        bound, self._bound = self._bound, None
        if bound is not None:
            event.remove(bound.engine, "handle_error", self._keep_connection)
            if not bound.invalidated:
                bound.info.pop(CAPTURE_KEY, None)

    def _transaction_created(self, session: Session, transaction: SessionTransaction) -> None:
        if transaction.parent is None and session.bind is self._bound and self._bound is not None:
            self._sessions.add(session)
            self._acquire(transaction)

    def _transaction_ended(self, session: Session, transaction: SessionTransaction) -> None:
        if transaction.parent is None:
            self._pending.discard(transaction)
            self._lock.release(transaction)

    def _before_flush(self, session: Session, _context: object, _instances: object) -> None:
        self._take_deferred(session)

    def _before_execute(self, state: ORMExecuteState) -> None:
        self._take_deferred(state.session)

    def _take_deferred(self, session: Session) -> None:
        root = session.get_transaction()
        if root is not None and root in self._pending:
            self._pending.discard(root)
            self._acquire(root)

    def _before_commit(self, session: Session) -> None:
        # A task started inside this transaction may have stacked its own SAVEPOINT on
        # ours; releasing ours first would destroy it. Wait for it to end.
        root = session.get_transaction()
        if root is not None and session.bind is self._bound:
            self._wait_on_top(root)

    # leaving --------------------------------------------------------------------------

    def _stop(self) -> int:
        """No more turns on the connection; return how many sessions are still open in it.

        Sessions queued for the connection are woken with ``SessionClosedError``.
        """
        left_open = sum(1 for session in list(self._sessions) if session.in_transaction())
        self._lock.close()
        return left_open

    def _retire_sessions(self) -> None:
        """Make the block's sessions refuse further work (the connection has been closed).

        Their owners may still be using them, in other tasks or threads, so nothing is
        done to them here: they refuse at their next statement, flush or commit, in
        their own task. A rollback would make SQLAlchemy warn that the SAVEPOINT
        "already deassociated from connection" (the outer rollback ended it), so it
        closes the session instead, which is quiet and runs the after-rollback hooks
        in the owner's task as a rollback would. (SQLAlchemy internals, 2.1.9: the
        ``SessionTransaction.rollback`` that ``begin()``'s exit calls is looked up on
        the instance, so an instance attribute replaces it.)
        """
        for session in list(self._sessions):
            transaction = session.get_nested_transaction() or session.get_transaction()
            _refuse_from_now_on(session, _LEFT_OPEN if transaction is not None else _USED_AFTER)
            while transaction is not None:
                transaction.rollback = _closer(session)  # type: ignore[method-assign]
                transaction = transaction.parent
        self._sessions.clear()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        _warn_left_open(self._leave(), exc)

    def _leave(self) -> int:
        """End the block: roll back, close, retire; return the sessions left open."""
        raise NotImplementedError

    def _acquire(self, transaction: SessionTransaction) -> None:
        raise NotImplementedError

    def _wait_on_top(self, transaction: SessionTransaction) -> None:
        raise NotImplementedError


_LEFT_OPEN: Final = (
    "the test's isolated() block ended while this session was still open, so what it did "
    "was rolled back with the test"
)
_USED_AFTER: Final = (
    "this session was made in a test's isolated() block, which has ended (and its "
    "connection with it)"
)
_WHAT_TO_DO: Final = (
    "; close sessions, and await the tasks (join the threads) that use them, before the "
    "isolated() block ends"
)


def _target_isolation(
    key: object,
    target: object,
    twin: str,
    core: FactoryCore[Any],
    run_hooks: bool,
    lock_timeout: float,
) -> AsyncIsolation[Any] | SyncIsolation[Any] | None:
    """The isolation for one ``binds`` target, or ``None`` when it needs none."""
    name = getattr(key, "__name__", None) or repr(getattr(key, "name", key))
    if not isinstance(target, FactoryBind):
        raise ConfigurationError(
            f"binds[{name}] is not a factory but a {type(target).__name__}, whose writes "
            "isolated() cannot roll back; bind a SessionFactory for it instead "
            "(binds={...: SessionFactory(url)}), which isolated() isolates too"
        )
    if target.core is core or target.core.isolation is not None:
        return None  # the factory itself, or one the test isolated already
    factory = target.factory
    if twin == "sync":
        sync = factory.sync if isinstance(factory, SessionFactory) else factory
        return SyncIsolation(sync, run_hooks=run_hooks, lock_timeout=lock_timeout)
    if not isinstance(factory, SessionFactory):
        raise ConfigurationError(
            f"binds[{name}] is a SyncSessionFactory, which async sessions cannot use in "
            "isolated(); bind its SessionFactory instead"
        )
    return AsyncIsolation(factory, run_hooks=run_hooks, lock_timeout=lock_timeout)


def _refuse_from_now_on(session: Session, reason: str) -> None:
    """Have ``session`` raise ``SessionClosedError`` saying ``reason`` when used again."""

    def refused(what: str) -> SessionClosedError:
        return SessionClosedError(f"{what} refused: {reason}{_WHAT_TO_DO}")

    def on_execute(_state: ORMExecuteState) -> None:
        raise refused("a statement")

    def on_flush(_session: Session, _context: object, _instances: object) -> None:
        raise refused("session.flush()")

    def on_commit(_session: Session) -> None:
        raise refused("session.commit()")

    # Listeners of this session only: the factory's other sessions pay nothing.
    event.listen(session, "do_orm_execute", on_execute)
    event.listen(session, "before_flush", on_flush)
    event.listen(session, "before_commit", on_commit)


def _closer(session: Session) -> Callable[..., None]:
    def close(*_args: object, **_kwargs: object) -> None:
        session.close()

    return close


def _warn_left_open(count: int, exc: BaseException | None) -> None:
    """Report the sessions a block left open, unless it is failing for its own reason.

    A ``RuntimeWarning``, not a ``ResourceWarning``: pytest shows it (Python hides
    ``ResourceWarning`` by default), and under ``-W error`` the test fails — after the
    block has cleaned up, and never in place of the test's own exception.
    """
    if count and exc is None:
        sessions = "1 session was" if count == 1 else f"{count} sessions were"
        warnings.warn(
            f"{sessions} still open when the isolated() block ended; their work was rolled "
            "back with the test's and they now raise SessionClosedError. Close sessions, and "
            "await the tasks (join the threads) that use them, before the block ends",
            RuntimeWarning,
            stacklevel=3,
        )


class AsyncIsolation(_Isolation, Generic[_AS]):
    """The handle ``isolated(db)`` gives for a ``SessionFactory``."""

    def __init__(self, db: SessionFactory[_AS], *, run_hooks: bool, lock_timeout: float) -> None:
        super().__init__(db._core, run_hooks=run_hooks, lock_timeout=lock_timeout)
        #: The isolated factory (the one given: it is routed, not copied).
        self.factory = db
        self._home: _HomeLoop | None = None
        self._connection: AsyncConnection | None = None

    @property
    def connection(self) -> AsyncConnection:
        """The connection every session of the factory uses while isolated."""
        if self._connection is None:
            raise RuntimeError("the isolated() block has not been entered")
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
                _bridge_driver(raw.dbapi_connection, home)
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
                _unbridge_driver(raw.dbapi_connection)
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
        _warn_left_open(await asyncio.to_thread(self._leave), exc)

    def __enter__(self) -> Self:
        """Enter from sync code (a sync test, a pytest fixture); the app may be async."""
        self._check_free()
        home = self._home = _HomeLoop()
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


class SyncIsolation(_Isolation, Generic[_S]):
    """The handle ``isolated(db.sync)`` gives for a ``SyncSessionFactory``."""

    def __init__(
        self, db: SyncSessionFactory[_S], *, run_hooks: bool, lock_timeout: float
    ) -> None:
        super().__init__(db._core, run_hooks=run_hooks, lock_timeout=lock_timeout)
        #: The isolated factory (the one given: it is routed, not copied).
        self.factory = db
        self._connection: Connection | None = None

    @property
    def connection(self) -> Connection:
        """The connection every session of the factory uses while isolated."""
        if self._connection is None:
            raise RuntimeError("the isolated() block has not been entered")
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


# --- one session transaction at a time ----------------------------------------------

# The lock tokens held by this context and the contexts it was copied from (a task
# started by a holder inherits them): a session whose context holds the newest token
# nests its SAVEPOINT on top instead of waiting.
_HELD: ContextVar[tuple[object, ...]] = ContextVar("sessionforge_isolation_held", default=())


@dataclass(slots=True, eq=False)
class _Waiter:
    key: object
    held: tuple[object, ...]
    event: threading.Event | None = None
    loop: asyncio.AbstractEventLoop | None = None
    future: asyncio.Future[None] | None = None
    token: object | None = None

    def wake(self) -> None:
        if self.event is not None:
            self.event.set()
        elif self.loop is not None and self.future is not None:
            future = self.future
            self.loop.call_soon_threadsafe(_resolve, future)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


_POLL: Final = 0.005  # seconds between looks while a commit waits for a stacked grant
#: Seconds between a waiter's looks for a holder that was garbage-collected (the first
#: look runs the collector: a leaked session sits in a reference cycle).
_CHECK: Final = 1.0


class _ConnectionLock:
    """Who may use the isolated connection: one session transaction at a time.

    Works across threads and event loops (a ``threading.Lock`` guards the state; async
    waiters are woken with ``call_soon_threadsafe``). Grants are stacked: the holder of
    the newest grant, and the tasks and threads its context was copied into, may stack
    another (a nested SAVEPOINT); anyone else waits, first come first served.

    Holders are held weakly: a session garbage-collected in its transaction can never
    release its grant, and a waiter that finds one fails at once instead of waiting out
    the timeout. A holder that is merely slow is alive, and is waited for.
    """

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self._mutex = threading.Lock()
        # (key, token), oldest first
        self._holders: list[tuple[weakref.ref[object], object]] = []
        self._waiters: deque[_Waiter] = deque()
        self._closed = False  # the isolated block has ended

    def acquire(self, key: object) -> None:
        """Wait (blocking the thread) until ``key`` may use the connection."""
        waiter = self._grant_or_queue(key, threading.Event())
        if waiter.token is None:
            assert waiter.event is not None
            deadline = time.monotonic() + self._timeout
            collect = True
            while not waiter.event.wait(min(_CHECK, max(deadline - time.monotonic(), 0))):
                if time.monotonic() >= deadline or self._hopeless(waiter, collect):
                    break
                collect = False
            self._settle(waiter, None)
        self._hold(waiter.token)

    async def acquire_async(self, key: object) -> None:
        """Wait (suspending the task) until ``key`` may use the connection."""
        waiter = self._grant_or_queue(key, None)
        if waiter.token is None:
            assert waiter.future is not None
            deadline = time.monotonic() + self._timeout
            collect = True
            try:
                while (remaining := deadline - time.monotonic()) > 0:
                    await asyncio.wait((waiter.future,), timeout=min(_CHECK, remaining))
                    if waiter.future.done() or self._hopeless(waiter, collect):
                        break
                    collect = False
            except BaseException as error:
                self._settle(waiter, error)
            self._settle(waiter, None)
        self._hold(waiter.token)

    def acquire_now(self, key: object) -> bool:
        """Take the connection if it is free for this context; say whether it was."""
        held = _HELD.get()
        with self._mutex:
            self._check_open()
            if not self._grantable(held):
                return False
            token = self._grant(key)
        self._hold(token)
        return True

    def wait_on_top(self, key: object) -> None:
        """Wait (blocking) until no grant stacked on ``key``'s is left."""
        deadline = time.monotonic() + self._timeout
        while not self._on_top(key):
            if time.monotonic() > deadline:
                raise self._stacked_error()
            time.sleep(_POLL)

    async def wait_on_top_async(self, key: object) -> None:
        """Wait (suspending the task) until no grant stacked on ``key``'s is left."""
        deadline = time.monotonic() + self._timeout
        while not self._on_top(key):
            if time.monotonic() > deadline:
                raise self._stacked_error()
            await asyncio.sleep(_POLL)

    def _on_top(self, key: object) -> bool:
        with self._mutex:
            if self._closed:
                return True  # nothing to wait for: the commit is refused on its own
            keys = [holder() for holder, _token in self._holders]
        return key not in keys or keys[-1] is key

    def _stacked_error(self) -> TimeoutError:
        return TimeoutError(
            f"a transaction waited {self._timeout:g}s to commit for a session begun by a task "
            "or thread it started, whose SAVEPOINT sits on top of its own; await that task "
            "(or close its session) before committing"
        )

    def release(self, key: object) -> None:
        """``key``'s transaction ended: hand the connection to the next waiter."""
        with self._mutex:
            for index, (holder, _token) in enumerate(self._holders):
                if holder() is key:
                    del self._holders[index]
                    break
            else:
                return
            woken = self._next_waiter()
        if woken is not None:
            woken.wake()

    def close(self) -> None:
        """The isolated block ends: wake every waiter, refuse every later request."""
        with self._mutex:
            self._closed = True
            waiters = list(self._waiters)
            self._waiters.clear()
        for waiter in waiters:
            with contextlib.suppress(RuntimeError):  # its loop has closed: nobody waits
                waiter.wake()

    # internals (the _locked ones run under the mutex) ------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise SessionClosedError(
                "the test's isolated() block ended while this session was waiting for its turn "
                f"on the connection{_WHAT_TO_DO}"
            )

    def _hopeless(self, waiter: _Waiter, collect: bool) -> bool:
        """Whether a holder ahead of ``waiter`` was garbage-collected (so never releases)."""
        if collect:
            with self._mutex:
                alive = all(holder() is not None for holder, _token in self._holders)
            if alive:
                gc.collect()  # a leaked session and its transaction form a cycle
        with self._mutex:
            return self._dead_ahead_locked(waiter)

    def _dead_ahead_locked(self, waiter: _Waiter) -> bool:
        return any(
            holder() is None and token not in waiter.held for holder, token in self._holders
        )

    def _grant_or_queue(self, key: object, event: threading.Event | None) -> _Waiter:
        held = _HELD.get()
        waiter = _Waiter(key, held, event=event)
        with self._mutex:
            self._check_open()
            if self._grantable(held):
                waiter.token = self._grant(key)
                return waiter
            if event is None:
                waiter.loop = asyncio.get_running_loop()
                waiter.future = waiter.loop.create_future()
            self._waiters.append(waiter)
        return waiter

    def _settle(self, waiter: _Waiter, error: BaseException | None) -> None:
        """After a wait: keep a grant that arrived, or leave the queue and raise."""
        with self._mutex:
            if waiter.token is not None:
                if error is None and not self._closed:
                    return
                # Cancelled, or the block ended, just as it was granted: pass it on.
                granted = True
            else:
                granted = False
                if waiter in self._waiters:  # not if woken by close()
                    self._waiters.remove(waiter)
            hopeless = self._dead_ahead_locked(waiter)
        if granted:
            self.release(waiter.key)
        if isinstance(error, asyncio.CancelledError):
            raise error
        self._check_open()
        if hopeless:
            raise TimeoutError(
                "a session would wait forever for the test's isolated connection: the session "
                "holding it was garbage-collected without being closed, so its transaction "
                "can never end; close every session (`async with db() as session`, "
                "`async with db.begin()`, `await session.close()`), also in app code — "
                "track_session_origin=True makes the leak's ResourceWarning say where it "
                "was made"
            ) from error
        raise TimeoutError(
            f"a session waited {self._timeout:g}s for the test's isolated connection, which "
            "another session's transaction holds: a session the test left open, or a task "
            "that waits for this one while its own transaction is open; close sessions when "
            "done (or raise lock_timeout)"
        ) from error

    def _grantable(self, held: tuple[object, ...]) -> bool:
        return not self._holders or self._holders[-1][1] in held

    def _grant(self, key: object) -> object:
        token = object()
        self._holders.append((weakref.ref(key), token))
        return token

    def _next_waiter(self) -> _Waiter | None:
        for waiter in self._waiters:
            if self._grantable(waiter.held):
                self._waiters.remove(waiter)
                waiter.token = self._grant(waiter.key)
                return waiter
        return None

    def _hold(self, token: object | None) -> None:
        with self._mutex:
            live = {token for _key, token in self._holders}
        _HELD.set((*(t for t in _HELD.get() if t in live), token))


# --- the async connection's own event loop ------------------------------------------


class _HomeLoop:
    """A thread running the event loop that owns the isolated async connection.

    Drivers such as asyncpg tie a connection to the loop that opened it; the test's
    loop may not be running while the app's (``TestClient``'s) runs, and may not even
    exist (a sync test). This loop runs for the whole isolated block.
    """

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: asyncio.Event | None = None
        self.thread_id: int | None = None
        self._thread = threading.Thread(
            target=self._serve, name="sessionforge-isolated", daemon=True
        )

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()

    def submit(self, coroutine: Coroutine[Any, Any, _T]) -> concurrent.futures.Future[_T]:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def run(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        """Run ``coroutine`` in the home loop, blocking this (other) thread meanwhile."""
        return self.submit(coroutine).result()

    def stop(self) -> None:
        if self._loop is not None and self._done is not None:
            self._loop.call_soon_threadsafe(self._done.set)
        self._thread.join()

    def _serve(self) -> None:
        # asyncio.Runner: closing it ends the loop's async generators, which disposes
        # the factory's engine for this loop (loops.py).
        with asyncio.Runner() as runner:
            runner.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._done = asyncio.Event()
        self.thread_id = threading.get_ident()
        self._ready.set()
        await self._done.wait()


# The one reliance on SQLAlchemy internals outside _sqla.py (2.1.9): the asyncio
# adapters (``AsyncAdapt_dbapi_connection``) keep the driver's connection in
# ``_connection`` and call its coroutine methods from the caller's greenlet, i.e. in
# the caller's event loop. Swapping in a bridge there makes each driver call run in
# the home loop instead. Nothing else of the adapter changes; the swap is undone
# before the connection is closed.
def _bridge_driver(adapted: Any, home: _HomeLoop) -> None:
    driver = adapted._connection
    package = type(driver).__module__.partition(".")[0]
    adapted._connection = _Bridge(driver, home, package)


def _unbridge_driver(adapted: Any) -> None:
    bridge = adapted._connection
    if isinstance(bridge, _Bridge):
        adapted._connection = bridge._target


class _Bridge:
    """A driver object whose calls run in the home loop, whatever loop awaits them.

    Coroutines are awaited there (``run_coroutine_threadsafe``) and their results
    bridged in turn when they are driver objects (prepared statements, cursors,
    transactions); plain calls run there too, blocking the caller for the call.
    """

    __slots__ = ("_home", "_package", "_target")

    def __init__(self, target: Any, home: _HomeLoop, package: str) -> None:
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_home", home)
        object.__setattr__(self, "_package", package)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if not callable(value):
            return self._wrap(value)
        home = self._home

        def call(*args: Any, **kwargs: Any) -> Any:
            if inspect.iscoroutinefunction(value) or threading.get_ident() == home.thread_id:
                result = value(*args, **kwargs)  # a coroutine does nothing until awaited
            else:

                async def in_home() -> Any:
                    return value(*args, **kwargs)

                result = home.run(in_home())
            wrapped = self._wrap(result)
            if wrapped is result and inspect.isawaitable(result):
                return self._await(result)
            return wrapped

        return call

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._target, name, value)

    def __await__(self) -> Generator[Any, None, Any]:
        return self._await(self._target).__await__()

    async def _await(self, awaitable: Any) -> Any:
        home = self._home
        if threading.get_ident() == home.thread_id:
            return self._wrap(await awaitable)

        async def in_home() -> Any:
            return await awaitable

        return self._wrap(await asyncio.wrap_future(home.submit(in_home())))

    def _wrap(self, value: Any) -> Any:
        kind = type(value)
        if (kind.__module__ or "").partition(".")[0] == self._package and _is_stateful(kind):
            return _Bridge(value, self._home, self._package)
        return value


_STATEFUL: dict[type, bool] = {}


def _is_stateful(kind: type) -> bool:
    """Whether ``kind`` has coroutine methods: a connection-bound driver object."""
    stateful = _STATEFUL.get(kind)
    if stateful is None:
        stateful = _STATEFUL[kind] = any(
            inspect.iscoroutinefunction(getattr(kind, name, None)) for name in dir(kind)
        )
    return stateful
