"""Per-factory session classes, with the hook methods and transaction listeners.

Like ``sessionmaker``, each factory makes its own subclass of the session class it was
given, so ``event.listen(factory, ...)`` reaches exactly that factory's sessions. The
async class wraps the sync class (``AsyncSession.sync_session_class``), and the sync
twin instantiates the same sync class: a listener on either twin sees the sessions of
both, which is what makes them one factory.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, Final, TypeVar, cast

from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from sessionforge import hooks
from sessionforge.errors import ConcurrentSessionUseError, ConfigurationError, SessionClosedError

from . import routing, stats, transactions
from .cancellation import end_and_close
from .lazyload import ImplicitIOCheck
from .replicas import Replicas
from .state import SessionState

__all__ = [
    "AsyncHookMethods",
    "SyncHookMethods",
    "guarded_methods",
    "make_session_classes",
    "retire",
]

_AS = TypeVar("_AS", bound=AsyncSession)


class SyncHookMethods:
    """``session.on_commit(fn)`` and ``session.after_rollback(fn)`` on sync sessions.

    Also gives every session its ``SessionState`` (``state.py``).
    """

    _sessionforge_state: SessionState

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._sessionforge_state = SessionState()
        super().__init__(*args, **kwargs)

    def on_commit(self, fn: hooks.Hook) -> None:
        """Run ``fn()`` after the outermost transaction commits (see ``hooks``)."""
        hooks.on_commit(cast("Session", self), fn)

    def after_rollback(self, fn: hooks.Hook) -> None:
        """Run ``fn()`` if the current transaction rolls back or is discarded."""
        hooks.after_rollback(cast("Session", self), fn)

    # Hooks registered while no transaction had begun die with the session's state;
    # the factory's count of open sessions goes down.
    def close(self) -> None:
        super().close()  # type: ignore[misc]
        _closed(self)

    def reset(self) -> None:
        super().reset()  # type: ignore[misc]
        _closed(self)

    def invalidate(self) -> None:
        super().invalidate()  # type: ignore[misc]
        _closed(self)

    def __del__(self) -> None:
        if stats.holds_connection(cast("Session", self)):
            stats.report_leak(cast("Session", self))
        stats.closed_session(cast("Session", self))  # collected: no longer open


def _closed(session: object) -> None:
    sync = cast("Session", session)
    hooks.discard_pending(sync)
    stats.closed_session(sync)


class AsyncHookMethods:
    """The same on async sessions, where ``fn`` may also be an async function.

    Also the one-task-at-a-time guard (see ``guarded_methods`` for what is guarded): a
    guarded call notes the task using the session while it is in flight; a second task
    calling in meanwhile gets ``ConcurrentSessionUseError`` at once, before it touches
    the session, so the first task's work is not disturbed. Sequential use from
    different tasks stays allowed. Ending the session is the exception: ``close()`` and
    the end of a ``db()``/``db.begin()`` block wait for the other task's operation
    (``take_turn``), then close, so an abandoned ``asyncio.gather`` leaks nothing.
    """

    sync_session: Session
    _sessionforge_holder: asyncio.Task[Any] | Retired | None = None
    #: Futures of the tasks waiting in ``take_turn``, woken when the holder is done.
    _sessionforge_waiters: list[asyncio.Future[None]] | None = None

    def on_commit(self, fn: hooks.Hook) -> None:
        """Run ``fn()`` (awaited if async) after the outermost transaction commits."""
        hooks.on_commit(self.sync_session, fn)

    def after_rollback(self, fn: hooks.Hook) -> None:
        """Run ``fn()`` (awaited if async) if the current transaction rolls back."""
        hooks.after_rollback(self.sync_session, fn)

    async def _sessionforge_take_turn(
        self, task: asyncio.Task[Any] | None, caller: asyncio.Task[Any] | None
    ) -> Turn:
        """Wait until no other task is in an operation here, then hold it for this task.

        ``task`` is the current task. Returns ``(proceed, restore)`` for
        ``_sessionforge_end_turn(task, restore)``. The
        wait lasts up to the engine's ``pool_timeout``; past it, the session's
        connection is invalidated (on PostgreSQL that ends the other task's statement
        with an error), and the wait goes on as long again. If the operation still
        runs then, the session is retired and ``proceed`` is False: ending it must not
        run alongside that operation (its connection is already back in the pool).

        ``caller`` is the task that started this ending in a task of its own and
        awaits it: if that task is the holder (a block ending inside one of the
        session's own guarded methods), waiting for it would deadlock, so the turn
        is taken over and handed back by ``_sessionforge_end_turn``.
        """
        deadline: float | None = None
        invalidated = False
        while True:
            holder = self._sessionforge_holder
            if type(holder) is Retired:
                return True, _UNCLAIMED  # the guard refuses everything but close()
            if holder is None or holder is task or holder is caller:
                self._sessionforge_holder = task
                return True, holder
            loop = asyncio.get_running_loop()
            if deadline is None:
                deadline = loop.time() + _pool_timeout(self.sync_session)
            waiter: asyncio.Future[None] = loop.create_future()
            if self._sessionforge_waiters is None:
                self._sessionforge_waiters = []
            self._sessionforge_waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            except TimeoutError:
                if invalidated:
                    retire(self, _GAVE_UP)  # type: ignore[arg-type]
                    # Never closed now, but its connection went back to the pool
                    # invalidated: neither open nor a leak.
                    stats.forget(self.sync_session)
                    return False, _UNCLAIMED
                _invalidate_connection(self.sync_session)
                invalidated = True
                deadline = loop.time() + _pool_timeout(self.sync_session)
            finally:
                waiters = self._sessionforge_waiters
                if waiters is not None and waiter in waiters:
                    waiters.remove(waiter)

    def _sessionforge_end_turn(self, task: asyncio.Task[Any] | None, restore: object) -> None:
        """Give back the turn ``_sessionforge_take_turn`` took (see there)."""
        if restore is not _UNCLAIMED and self._sessionforge_holder is task:
            self._sessionforge_holder = cast("asyncio.Task[Any] | None", restore)
            if restore is None and self._sessionforge_waiters:
                _wake(self)

    async def __aexit__(self, type_: Any, value: Any, traceback: Any) -> None:
        # As AsyncSession's own (close in a task of its own, to completion), but the
        # close waits for another task's operation, and a block ending inside one of
        # this session's guarded methods does not wait for itself (the caller is noted
        # here, in the task that awaits the close).
        await end_and_close(self, None)  # type: ignore[arg-type]  # (no cast(): a call)


#: What ``_sessionforge_take_turn`` returns: (proceed, what to give back at the end).
Turn = tuple[bool, object]
_UNCLAIMED: Final = object()  # the turn was not taken: nothing to give back
_GAVE_UP: Final = (
    "another task's operation on this session outlived pool_timeout twice while the "
    "session was being closed; its connection was invalidated"
)
_DEFAULT_POOL_TIMEOUT: Final = 30.0  # SQLAlchemy's QueuePool default


def _wake(session: AsyncHookMethods) -> None:
    waiters, session._sessionforge_waiters = session._sessionforge_waiters, None
    for waiter in waiters or ():
        if not waiter.done():
            waiter.set_result(None)


def _pool_timeout(sync: Session) -> float:
    """The ``pool_timeout`` of the engine the session uses (default: QueuePool's).

    Not ``get_bind()`` first: a session routed to replicas would choose one there."""
    try:
        engine = sync._sessionforge_state.engine or sync.get_bind()  # type: ignore[attr-defined]
        timeout = getattr(engine.engine.pool, "timeout", None)
    except Exception:  # unbound, or binds only: SQLAlchemy's default
        return _DEFAULT_POOL_TIMEOUT
    return float(timeout()) if callable(timeout) else _DEFAULT_POOL_TIMEOUT


def _invalidate_connection(sync: Session) -> None:
    """Invalidate the connection of ``sync``'s transaction, if it reached the database.

    Runs outside the holder's greenlet while its operation may be in flight: the
    pool terminates the DBAPI connection (asyncpg aborts the socket, the server rolls
    back) and takes the connection back. Only the default bind's connection is
    reached (``binds`` to other engines are not).
    """
    transaction = sync.get_transaction()
    if transaction is None or not stats.holds_connection(sync):
        return
    # An existing connection is returned without I/O; if the session is mid-change
    # (IllegalStateChangeError), the close tries again once the operation ends.
    with contextlib.suppress(Exception):
        transaction.connection(None).invalidate()


class Retired:
    """The guard's holder of a session closed for good: every later call is refused."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def retire(session: AsyncSession, reason: str) -> None:
    """Refuse any further I/O on ``session`` with ``SessionClosedError`` saying ``reason``.

    ``close()`` stays allowed (a no-op for a closed session). Only sessions of a
    sessionforge factory carry the guard that enforces it.
    """
    session._sessionforge_holder = Retired(reason)  # type: ignore[attr-defined]
    waiters = getattr(session, "_sessionforge_waiters", None)
    if waiters:
        _wake(cast("AsyncHookMethods", session))


# Which methods are guarded ------------------------------------------------------------

_COROUTINE: Final = "coroutine"
_ASYNC_GENERATOR: Final = "async generator"


def guarded_methods(class_: type[AsyncSession]) -> dict[str, str]:
    """The methods of ``class_`` the guard wraps, each with its kind.

    The rule: every public name (no leading underscore) that ``class_`` or one of its
    bases up to ``AsyncSession`` defines as an ``async def`` function or async
    generator, looked through ``functools.wraps`` decorators, in any class of that
    chain (so a sync override of an awaitable method, such as SQLModel's deprecated
    ``execute``, stays guarded). Class and static methods are not (``close_all``), nor
    private helpers: they run inside a public guarded call or are the user's to
    guard. The guard itself looks the method up at call time, so patching a class
    reaches sessions of a factory made earlier.
    """
    kinds: dict[str, str] = {}
    for klass in class_.__mro__:
        for name, value in vars(klass).items():
            if name.startswith("_") or name in kinds or getattr(value, _GUARD, False):
                continue
            if isinstance(value, (classmethod, staticmethod)):
                continue
            function = inspect.unwrap(value) if callable(value) else None
            if inspect.iscoroutinefunction(function):
                kinds[name] = _COROUTINE
            elif inspect.isasyncgenfunction(function):
                kinds[name] = _ASYNC_GENERATOR
        if klass is AsyncSession:
            break
    return kinds


_GUARD: Final = "_sessionforge_guard"


def _guarded(name: str, owner: list[type]) -> Callable[..., Coroutine[Any, Any, Any]]:
    """The one-task-at-a-time check around the method ``name`` found above ``owner[0]``.

    ``owner`` holds the per-factory class once it exists; the method is looked up on
    each call (``super(owner, self)``), never captured, so ``mock.patch`` of
    ``AsyncSession`` or of the user's class reaches it.
    """
    current_task = asyncio.current_task
    waits = name == "close"

    async def guarded(self: Any, *args: Any, **kwargs: Any) -> Any:
        holder = self._sessionforge_holder
        task = current_task()
        if holder is task or task is None:  # re-entrant, or no task at all
            return await getattr(super(owner[0], self), name)(*args, **kwargs)
        if holder is not None:
            if type(holder) is Retired:
                if waits:
                    return None
                raise SessionClosedError(f"session.{name}() refused: {holder.reason}")
            if waits:
                close = getattr(super(owner[0], self), name)
                return await _close_after_turn(self, close, args, kwargs)
            raise ConcurrentSessionUseError(_concurrent_message(name, holder, task))
        self._sessionforge_holder = task
        try:
            return await getattr(super(owner[0], self), name)(*args, **kwargs)
        finally:
            if self._sessionforge_holder is task:  # not if retired meanwhile
                self._sessionforge_holder = None
                if self._sessionforge_waiters:
                    _wake(self)

    guarded.__name__ = guarded.__qualname__ = name
    setattr(guarded, _GUARD, True)
    return guarded


async def _close_after_turn(
    session: Any, close: Callable[..., Awaitable[None]], args: Any, kwargs: Any
) -> None:
    """``close()`` called while another task is in an operation: wait, then close."""
    task = asyncio.current_task()
    proceed, restore = await session._sessionforge_take_turn(task, None)
    if not proceed or type(session._sessionforge_holder) is Retired:
        return
    try:
        await close(*args, **kwargs)
    finally:
        session._sessionforge_end_turn(task, restore)


def _guarded_generator(name: str, owner: list[type]) -> Callable[..., AsyncIterator[Any]]:
    """The check around each step of the async generator method ``name``.

    The session is held while a step runs, not between steps (the caller's code
    runs there); values sent in with ``asend()`` are not passed on.
    """

    async def guarded(self: Any, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        steps = getattr(super(owner[0], self), name)(*args, **kwargs)
        try:
            while True:
                try:
                    item = await _step(self, name, steps.__anext__)
                except StopAsyncIteration:
                    return
                yield item
        finally:
            await _step(self, name, steps.aclose)

    guarded.__name__ = guarded.__qualname__ = name
    setattr(guarded, _GUARD, True)
    return guarded


async def _step(self: Any, name: str, advance: Callable[[], Awaitable[Any]]) -> Any:
    """One step of a guarded async generator: ``_guarded``'s check, without a wait."""
    holder = self._sessionforge_holder
    task = asyncio.current_task()
    if holder is task or task is None:
        return await advance()
    if holder is not None:
        if type(holder) is Retired:
            raise SessionClosedError(f"session.{name}() refused: {holder.reason}")
        raise ConcurrentSessionUseError(_concurrent_message(name, holder, task))
    self._sessionforge_holder = task
    try:
        return await advance()
    finally:
        if self._sessionforge_holder is task:
            self._sessionforge_holder = None
            if self._sessionforge_waiters:
                _wake(self)


def _refused_when_retired(name: str, owner: list[type]) -> Callable[..., Any]:
    """Wrap a non-awaitable ``begin``/``begin_nested``: a retired session refuses them."""

    def checked(self: Any, *args: Any, **kwargs: Any) -> Any:
        holder = self._sessionforge_holder
        if holder is not None and type(holder) is Retired:
            raise SessionClosedError(f"session.{name}() refused: {holder.reason}")
        return getattr(super(owner[0], self), name)(*args, **kwargs)

    checked.__name__ = checked.__qualname__ = name
    return checked


def _concurrent_message(name: str, holder: asyncio.Task[Any], task: asyncio.Task[Any]) -> str:
    return (
        f"{task.get_name()} ({_coroutine_name(task)}) called session.{name}() while "
        f"{holder.get_name()} ({_coroutine_name(holder)}) is still using this session; "
        "an AsyncSession serves one task at a time: give each task its own session (db() "
        "or db.scope() per task), or await the first call before the next"
    )


def _coroutine_name(task: asyncio.Task[Any]) -> str:
    coroutine = task.get_coro()
    return getattr(coroutine, "__qualname__", type(coroutine).__name__)


async def _users_exit(self: Any, type_: Any, value: Any, traceback: Any) -> Any:
    return await super(AsyncHookMethods, self).__aexit__(type_, value, traceback)


def make_session_classes(
    class_: type[_AS],
    sync_class_: type[Session] | None,
    counters: stats.FactoryStats,
    replicas: Replicas | None = None,
) -> tuple[type[_AS], type[Session]]:
    """Fresh (async, sync) subclasses for one factory's sessions: the sync class refuses
    lazy loads on the event loop (``lazyload.py``), and routes with ``replicas``."""
    sync_base: type[Session] = sync_class_ or class_.sync_session_class
    for given, mixin in ((class_, AsyncHookMethods), (sync_base, SyncHookMethods)):
        if issubclass(given, mixin):
            raise ConfigurationError(
                f"{given.__name__} is a sessionforge factory's own session class; give the "
                "new factory the class that factory was given (db.config.class_ / "
                "db.config.sync_class_), or a subclass of it"
            )
    routed = () if replicas is None else (routing.RoutedMethods,)
    bases = (*routed, ImplicitIOCheck, SyncHookMethods, sync_base)
    sync_class = type(sync_base.__name__, bases, {"__module__": sync_base.__module__})
    # SyncHookMethods.__init__ takes (*args, **kwargs): show the given class's signature.
    sync_class.__signature__ = inspect.signature(sync_base)  # type: ignore[attr-defined]
    if replicas is not None:  # first: on-commit hooks see the commit's consistency token
        routing.install_routing(sync_class, replicas)
    hooks.install(sync_class)
    transactions.install(sync_class)
    stats.install(sync_class, counters)
    namespace: dict[str, Any] = {"__module__": class_.__module__, "sync_session_class": sync_class}
    owner: list[type] = []  # the class, once made: the guards look methods up above it
    for name, kind in guarded_methods(class_).items():
        wrap = _guarded if kind == _COROUTINE else _guarded_generator
        namespace[name] = wrap(name, owner)
    for name in ("begin", "begin_nested"):
        namespace[name] = _refused_when_retired(name, owner)
    if class_.__aexit__ is not AsyncSession.__aexit__:
        # The user's own exit wins over AsyncHookMethods'; it closes through the
        # guarded close(), which waits, but cannot know its caller (see take_turn).
        namespace["__aexit__"] = _users_exit
    async_class = type(class_.__name__, (AsyncHookMethods, class_), namespace)
    owner.append(async_class)
    return cast("type[_AS]", async_class), sync_class
