"""Session and transaction counters of a factory (both twins), for ``status()``.

Counted from session events on the factory's own session class, so every path counts:
``begin()``, ``commit()`` on a plain session, ``async with session.begin()``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Final

from sqlalchemy import event
from sqlalchemy.orm import Session, SessionTransaction

__all__ = ["Counters", "FactoryStats", "closed_session", "install", "opened_session"]

#: Class attribute of a factory's session classes: that factory's ``FactoryStats``.
STATS: Final = "_sessionforge_stats"
_OPEN: Final = "_sessionforge_counted_open"
_CONNECTED: Final = "_sessionforge_connected_transaction"
_COMMITTED: Final = "_sessionforge_committed_transaction"


@dataclass(frozen=True, slots=True)
class Counters:
    """A snapshot of a factory's counters."""

    sessions_open: int
    transactions_committed: int
    transactions_rolled_back: int
    transactions_retried: int


class FactoryStats:
    """Thread-safe counters shared by a factory and its twin."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open = self._committed = self._rolled_back = self._retried = 0

    def opened(self, session: Session) -> None:
        if not getattr(session, _OPEN, False):
            setattr(session, _OPEN, True)
            with self._lock:
                self._open += 1

    def closed(self, session: Session) -> None:
        if getattr(session, _OPEN, False):
            setattr(session, _OPEN, False)
            with self._lock:
                self._open -= 1

    def retried(self) -> None:
        with self._lock:
            self._retried += 1

    def snapshot(self) -> Counters:
        with self._lock:
            return Counters(self._open, self._committed, self._rolled_back, self._retried)

    def _count(self, committed: bool) -> None:
        with self._lock:
            if committed:
                self._committed += 1
            else:
                self._rolled_back += 1


def install(session_class: type[Session], stats: FactoryStats) -> None:
    setattr(session_class, STATS, stats)
    event.listen(session_class, "after_transaction_create", _reopened)
    event.listen(session_class, "after_begin", _connected)
    event.listen(session_class, "after_commit", _committed)
    event.listen(session_class, "after_transaction_end", _ended)


def opened_session(session: Session) -> None:
    """Count a session the factory just made."""
    _stats(session).opened(session)


def closed_session(session: Session) -> None:
    _stats(session).closed(session)


def _stats(session: Session) -> FactoryStats:
    stats: FactoryStats = getattr(session, STATS)
    return stats


def _reopened(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None:  # a closed session in use again
        _stats(session).opened(session)


def _connected(session: Session, transaction: SessionTransaction, _connection: object) -> None:
    if transaction.parent is None:
        setattr(session, _CONNECTED, transaction)


def _committed(session: Session) -> None:
    if session.get_nested_transaction() is None:
        setattr(session, _COMMITTED, session.get_transaction())


def _ended(session: Session, transaction: SessionTransaction) -> None:
    # Only transactions that reached the database count: a begin() that ran no
    # statement neither commits nor rolls back anything.
    if transaction.parent is not None or getattr(session, _CONNECTED, None) is not transaction:
        return
    setattr(session, _CONNECTED, None)
    committed = getattr(session, _COMMITTED, None) is transaction
    setattr(session, _COMMITTED, None)
    _stats(session)._count(committed)
