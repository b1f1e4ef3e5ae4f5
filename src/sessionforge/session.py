"""Per-factory session classes, with the hook methods and transaction listeners.

Like ``sessionmaker``, each factory makes its own subclass of the session class it was
given, so ``event.listen(factory, ...)`` reaches exactly that factory's sessions. The
async class wraps the sync class (``AsyncSession.sync_session_class``), and the sync
twin instantiates the same sync class: a listener on either twin sees the sessions of
both, which is what makes them one factory.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any, Final, TypeVar, cast

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import ORMExecuteState, Session

from . import hooks, stats, transactions
from .errors import ConcurrentSessionUseError, ReadOnlySessionError, SessionClosedError

__all__ = [
    "GUARDED_METHODS",
    "AsyncHookMethods",
    "SyncHookMethods",
    "make_session_classes",
    "reader_classes",
    "retire",
]

_AS = TypeVar("_AS", bound=AsyncSession)


class SyncHookMethods:
    """``session.on_commit(fn)`` and ``session.after_rollback(fn)`` on sync sessions."""

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


def _closed(session: object) -> None:
    sync = cast("Session", session)
    hooks.discard_pending(sync)
    stats.closed_session(sync)


class AsyncHookMethods:
    """The same on async sessions, where ``fn`` may also be an async function.

    Also the one-task-at-a-time guard: every awaitable I/O method of ``AsyncSession`` is
    wrapped (per factory class, in ``make_session_classes``) to note the task using the
    session while the call is in flight; a second task calling in meanwhile gets
    ``ConcurrentSessionUseError`` at once, before it touches the session, so the first
    task's work is not disturbed. Sequential use from different tasks stays allowed.
    """

    sync_session: Session
    _sessionforge_holder: asyncio.Task[Any] | Retired | None = None

    def on_commit(self, fn: hooks.Hook) -> None:
        """Run ``fn()`` (awaited if async) after the outermost transaction commits."""
        hooks.on_commit(self.sync_session, fn)

    def after_rollback(self, fn: hooks.Hook) -> None:
        """Run ``fn()`` (awaited if async) if the current transaction rolls back."""
        hooks.after_rollback(self.sync_session, fn)


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


# Awaitable AsyncSession methods that run an operation on the sync session.
GUARDED_METHODS: Final = (
    "close",
    "commit",
    "connection",
    "delete",
    "execute",
    "flush",
    "get",
    "get_one",
    "invalidate",
    "merge",
    "refresh",
    "reset",
    "rollback",
    "run_sync",
    "scalar",
    "scalars",
    "stream",
    "stream_scalars",
)


def _guarded(name: str, method: Callable[..., Any]) -> Callable[..., Coroutine[Any, Any, Any]]:
    """Wrap ``method`` (the session class's own) with the one-task-at-a-time check."""
    current_task = asyncio.current_task

    @functools.wraps(method)
    async def guarded(self: Any, *args: Any, **kwargs: Any) -> Any:
        holder = self._sessionforge_holder
        task = current_task()
        if holder is task or task is None:
            return await method(self, *args, **kwargs)  # re-entrant, or no task at all
        if holder is not None:
            if type(holder) is Retired:
                if name == "close":
                    return None
                raise SessionClosedError(f"session.{name}() refused: {holder.reason}")
            raise ConcurrentSessionUseError(_concurrent_message(name, holder, task))
        self._sessionforge_holder = task
        try:
            return await method(self, *args, **kwargs)
        finally:
            if self._sessionforge_holder is task:  # not if retired meanwhile
                self._sessionforge_holder = None

    return guarded


def _refused_when_retired(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a non-awaitable ``begin``/``begin_nested``: a retired session refuses them."""

    @functools.wraps(method)
    def checked(self: Any, *args: Any, **kwargs: Any) -> Any:
        holder = self._sessionforge_holder
        if holder is not None and type(holder) is Retired:
            raise SessionClosedError(f"session.{name}() refused: {holder.reason}")
        return method(self, *args, **kwargs)

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


def make_session_classes(
    class_: type[_AS], sync_class_: type[Session] | None, counters: stats.FactoryStats
) -> tuple[type[_AS], type[Session]]:
    """Return fresh (async, sync) subclasses for one factory's sessions."""
    sync_base: type[Session] = sync_class_ or class_.sync_session_class
    sync_class = type(
        sync_base.__name__, (SyncHookMethods, sync_base), {"__module__": sync_base.__module__}
    )
    hooks.install(sync_class)
    transactions.install(sync_class)
    stats.install(sync_class, counters)
    namespace: dict[str, Any] = {"__module__": class_.__module__, "sync_session_class": sync_class}
    # Wrap the given class's own methods (a user's override included) directly: no
    # super() lookup on the hot path.
    for name in GUARDED_METHODS:
        namespace[name] = _guarded(name, getattr(class_, name))
    for name in ("begin", "begin_nested"):
        namespace[name] = _refused_when_retired(name, getattr(class_, name))
    async_class = type(class_.__name__, (AsyncHookMethods, class_), namespace)
    return cast("type[_AS]", async_class), sync_class


# Readers ----------------------------------------------------------------------------

_READER: Final = "_sessionforge_reader_classes"

_WRITE_REFUSED: Final = (
    "a reader session (db.reader()) runs each statement on its own in AUTOCOMMIT mode and "
    "does not write; {what} — write in db.begin() (or db.atomic()) instead"
)


def reader_classes(
    async_class: type[_AS],
    sync_class: type[Session],
    on_begin: Callable[[Session, Any, Any], None] | None = None,
) -> tuple[type[_AS], type[Session]]:
    """The (async, sync) reader subclasses of one factory's session classes.

    Made once per factory, on first use. A subclass inherits the factory's listeners
    (``event.listen(db, ...)``, hooks, counters) and adds the two that refuse writes:
    ORM changes at flush, and Core ``insert``/``update``/``delete`` at execute (text SQL
    is not inspected), plus the dialect's ``after_begin`` listener ``on_begin``, if any.
    """
    made = async_class.__dict__.get(_READER)
    if made is None:
        sync_reader = type(
            sync_class.__name__, (sync_class,), {"__module__": sync_class.__module__}
        )
        event.listen(sync_reader, "before_flush", _refuse_flush)
        event.listen(sync_reader, "do_orm_execute", _refuse_dml)
        if on_begin is not None:
            event.listen(sync_reader, "after_begin", on_begin)
        namespace = {"__module__": async_class.__module__, "sync_session_class": sync_reader}
        async_reader = type(async_class.__name__, (async_class,), namespace)
        made = (async_reader, sync_reader)
        setattr(async_class, _READER, made)
    return made


def _refuse_flush(session: Session, _context: object, _instances: object) -> None:
    if session.new or session.dirty or session.deleted:
        raise ReadOnlySessionError(_WRITE_REFUSED.format(what="it was asked to flush changes"))


def _refuse_dml(state: ORMExecuteState) -> None:
    if state.is_insert or state.is_update or state.is_delete:
        kind = "INSERT" if state.is_insert else "UPDATE" if state.is_update else "DELETE"
        raise ReadOnlySessionError(_WRITE_REFUSED.format(what=f"it was asked to run an {kind}"))
