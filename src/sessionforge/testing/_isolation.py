"""What both ``isolated()`` handles share: routing a factory's sessions onto the test's
connection, their turns on it, and what becomes of them when the block ends.

While a block is entered, listeners on the factory's session class bind every session
to the isolated connection and take the turn lock (``_lock``) for each session
transaction; at the end the block's sessions are retired. The handles themselves
(``AsyncIsolation``, ``SyncIsolation``) add how the connection is opened and closed.
"""

from __future__ import annotations

import asyncio
import warnings
import weakref
from types import TracebackType
from typing import Any, Final, Self

from sqlalchemy import event
from sqlalchemy.engine import Connection, ExceptionContext
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.orm import ORMExecuteState, Session, SessionTransaction

from sessionforge._internal import sqla
from sessionforge._internal.core import FactoryBind, FactoryCore, IsolatedConnection
from sessionforge.errors import ConfigurationError, SessionClosedError
from sessionforge.factory import SessionFactory
from sessionforge.hooks import CAPTURE_KEY, Hook
from sessionforge.sync import SyncSessionFactory

from ._lock import WHAT_TO_DO, ConnectionLock

__all__ = ["BaseIsolation", "warn_left_open"]


class BaseIsolation:
    """What both handles share: the lock, the captured hooks, the session listeners."""

    def __init__(self, core: FactoryCore[Any], *, run_hooks: bool, lock_timeout: float) -> None:
        self._core = core
        self._run_hooks = run_hooks
        self._lock = ConnectionLock(lock_timeout)
        self._bound: Connection | None = None
        #: Transactions begun outside a greenlet while the connection was taken: they
        #: take their turn at their first statement or flush.
        self._pending: set[SessionTransaction] = set()
        #: Sessions that used the connection: they are retired when the block ends.
        self._sessions: weakref.WeakSet[Session] = weakref.WeakSet()
        #: On-commit hooks of sessions that committed, not run yet, oldest first.
        self.hooks: list[Hook] = []
        #: Isolations of the factories in ``binds``, entered and left with this one.
        self._targets: list[BaseIsolation] = []
        self._lock_timeout = lock_timeout

    def _isolate_targets(self) -> None:
        """Isolate the factories this one's ``binds`` route to (see ``isolated``)."""
        try:
            for key, target in self._core.binds.items():
                isolation = self._target_isolation(key, target)
                if isolation is None:
                    continue
                isolation.__enter__()
                self._targets.append(isolation)
        except BaseException:
            self.__exit__(None, None, None)
            raise

    def _target_isolation(self, key: object, target: object) -> BaseIsolation | None:
        """The isolation for one ``binds`` target, or ``None`` when it needs none."""
        name = getattr(key, "__name__", None) or repr(getattr(key, "name", key))
        if not isinstance(target, FactoryBind):
            raise ConfigurationError(
                f"binds[{name}] is not a factory but a {type(target).__name__}, whose writes "
                "isolated() cannot roll back; bind a SessionFactory for it instead "
                "(binds={...: SessionFactory(url)}), which isolated() isolates too"
            )
        if target.core is self._core or target.core.isolation is not None:
            return None  # the factory itself, or one the test isolated already
        return self._isolation_for(name, target.factory)

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
        in the owner's task as a rollback would (SQLAlchemy internals: ``sqla``, 7.).
        """
        for session in list(self._sessions):
            transaction = session.get_nested_transaction() or session.get_transaction()
            _refuse_from_now_on(session, _LEFT_OPEN if transaction is not None else _USED_AFTER)
            sqla.close_instead_of_rollback(session)
        self._sessions.clear()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        warn_left_open(self._leave(), exc)

    # what each handle adds -----------------------------------------------------------

    def _isolation_for(
        self, name: str, factory: SessionFactory[Any] | SyncSessionFactory[Any]
    ) -> BaseIsolation:
        """An isolation of this handle's twin for the factory ``binds[name]`` routes to."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        raise NotImplementedError

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


def _refuse_from_now_on(session: Session, reason: str) -> None:
    """Have ``session`` raise ``SessionClosedError`` saying ``reason`` when used again."""

    def refused(what: str) -> SessionClosedError:
        return SessionClosedError(f"{what} refused: {reason}{WHAT_TO_DO}")

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


def warn_left_open(count: int, exc: BaseException | None) -> None:
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
