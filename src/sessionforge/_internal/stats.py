"""Session and transaction counters of a factory (both twins), and leak reports.

Counted from session events on the factory's own session class, so every path counts:
``begin()``, ``commit()`` on a plain session, ``async with session.begin()``. The same
events tell whether a session holds a connection; a session garbage-collected while it
does is reported with a ``ResourceWarning`` (``report_leak``).
"""

from __future__ import annotations

import copy
import itertools
import logging
import traceback
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, SessionTransaction

from . import sqla as _sqla

if TYPE_CHECKING:
    from .begin import AsyncBeginContext, SyncBeginContext
    from .engines import EngineStatus
    from .replicas import ReplicaStatus
    from .state import SessionState
    from .telemetry import Telemetry

__all__ = [
    "Counters",
    "FactoryStats",
    "FactoryStatus",
    "closed_session",
    "connected_engine",
    "forget",
    "install",
    "is_open",
    "open_sessions",
    "opened_session",
    "report_leak",
]

logger = logging.getLogger("sessionforge.sessions")

#: Class attribute of a factory's session classes: that factory's ``FactoryStats``.
STATS: Final = "_sessionforge_stats"


@dataclass(frozen=True, slots=True)
class FactoryStatus:
    """A snapshot of a factory's connections and counters.

    ``checked_out`` counts the connections checked out of the engine that a new
    session of this factory would use now; ``engines`` has the pool figures of every
    engine the factory has built so far (the running loop's async engine first). The
    counters cover both twins: sessions made and not yet closed, and transactions that
    reached the database and committed, rolled back (closing without a commit
    counts), or were re-run by ``run_transaction``.
    """

    checked_out: int
    engines: tuple[EngineStatus, ...]
    sessions_open: int = 0
    transactions_committed: int = 0
    transactions_rolled_back: int = 0
    transactions_retried: int = 0
    #: With ``replicas=``: each replica's health and figures, and how many routed
    #: sessions (readers, read-only transactions) the primary served instead.
    replicas: tuple[ReplicaStatus, ...] = ()
    primary_fallbacks: int = 0


@dataclass(frozen=True, slots=True)
class Counters:
    """A snapshot of a factory's counters."""

    sessions_open: int
    transactions_committed: int
    transactions_rolled_back: int
    transactions_retried: int


class FactoryStats:
    """Counters shared by a factory and its twin, safe across threads without a lock.

    Each is an ``itertools.count`` advanced with ``next()``, which is atomic in CPython;
    "open" is made minus closed. The pair's telemetry hangs here too, shared like the
    counters it reports: ``sessionforge.telemetry.instrument`` sets the traced
    ``begin()`` contexts, which the twins use instead of the plain ones.
    """

    def __init__(self) -> None:
        self._made = itertools.count()
        self._closed = itertools.count()
        self._committed = itertools.count()
        self._rolled_back = itertools.count()
        self._retried = itertools.count()
        self.telemetry: Telemetry | None = None
        self.async_context: type[AsyncBeginContext[Any]] | None = None
        self.sync_context: type[SyncBeginContext[Any]] | None = None

    def opened(self, state: SessionState) -> None:
        if not state.counted_open:
            state.counted_open = True
            next(self._made)

    def closed(self, state: SessionState) -> None:
        if state.counted_open:
            state.counted_open = False
            next(self._closed)

    def retried(self) -> None:
        next(self._retried)

    def snapshot(self) -> Counters:
        def peek(counter: itertools.count[int]) -> int:
            return next(copy.copy(counter))  # the copy advances, not the counter

        return Counters(
            sessions_open=peek(self._made) - peek(self._closed),
            transactions_committed=peek(self._committed),
            transactions_rolled_back=peek(self._rolled_back),
            transactions_retried=peek(self._retried),
        )

    def _count(self, committed: bool) -> None:
        next(self._committed if committed else self._rolled_back)


def install(session_class: type[Session], stats: FactoryStats) -> None:
    setattr(session_class, STATS, stats)
    event.listen(session_class, "after_transaction_create", _reopened)
    event.listen(session_class, "after_begin", _connected)
    event.listen(session_class, "after_commit", _committed)
    event.listen(session_class, "after_transaction_end", _ended)


def opened_session(session: Session, track_origin: bool) -> None:
    """Count a session the factory just made (and note where, if asked to)."""
    state: SessionState = session._sessionforge_state  # type: ignore[attr-defined]
    _stats(session).opened(state)
    if track_origin:
        state.origin = traceback.format_stack(limit=12)[:-3]


def closed_session(session: Session) -> None:
    _stats(session).closed(_state(session))


def _state(session: Session) -> SessionState:
    state: SessionState = session._sessionforge_state  # type: ignore[attr-defined]
    return state


def _stats(session: Session) -> FactoryStats:
    stats: FactoryStats = getattr(session, STATS)
    return stats


def _reopened(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None:  # a closed session in use again
        _stats(session).opened(_state(session))


def _connected(session: Session, transaction: SessionTransaction, connection: Connection) -> None:
    if transaction.parent is None:
        state = _state(session)
        state.connected = transaction
        state.engine = connection.engine


def _committed(session: Session) -> None:
    if session.get_nested_transaction() is None:
        _state(session).committed = session.get_transaction()


def _ended(session: Session, transaction: SessionTransaction) -> None:
    # Only transactions that reached the database count: a begin() that ran no
    # statement neither commits nor rolls back anything.
    state = _state(session)
    if transaction.parent is not None or state.connected is not transaction:
        return
    state.connected = None
    committed = state.committed is transaction
    state.committed = None
    _stats(session)._count(committed)


def forget(session: Session) -> None:
    """Count ``session`` closed and holding nothing: it was given up, its connection
    invalidated and returned (the guard, when another task's call never ended)."""
    state = _state(session)
    state.connected = None
    _stats(session).closed(state)


def holds_connection(session: Session) -> bool:
    """Whether ``session`` is in a transaction that reached the database."""
    return _state(session).connected is not None


def connected_engine(session: Session) -> Engine | None:
    """The engine of the connection ``session`` holds, if it holds one."""
    state = _state(session)
    return None if state.connected is None else state.engine


def is_open(session: Session) -> bool:
    """Whether ``session`` was made (or used again) and not closed since."""
    return _state(session).counted_open


def open_sessions(session_class: type[Session]) -> list[Session]:
    """The open sessions of ``session_class`` (or a subclass) in this process."""
    return [s for s in _sqla.all_sessions() if isinstance(s, session_class) and is_open(s)]


def report_leak(session: Session) -> None:
    """Warn that ``session`` was collected while holding a connection (from ``__del__``).

    Sessions that were closed are never reported, and a closed sessionforge session
    is freed by reference counting at once (it is in no reference cycle), so the
    report comes from the code that dropped an open session: when the session sits in
    a cycle (an open transaction is one), the cyclic collector may run it in unrelated
    code — so if a warnings filter turns the warning into an error, it is logged on
    ``sessionforge.sessions`` instead of being raised inside the garbage collector.
    """
    origin = _state(session).origin
    where = (
        "; it was made at:\n" + "".join(origin)
        if origin
        else " (make the factory with track_session_origin=True to see where it was made)"
    )
    message = (
        f"a {type(session).__name__} was garbage-collected while holding a database "
        "connection: close every session (`async with db() as session`, "
        f"`async with db.begin()`, or `await session.close()`){where}"
    )
    try:
        warnings.warn(message, ResourceWarning, stacklevel=2, source=session)
    except Warning:
        logger.error(message)
