"""Session and transaction counters of a factory (both twins), for ``status()``.

Counted from session events on the factory's own session class, so every path counts:
``begin()``, ``commit()`` on a plain session, ``async with session.begin()``.
"""

from __future__ import annotations

import copy
import itertools
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
    """Counters shared by a factory and its twin, safe across threads without a lock.

    Each is an ``itertools.count`` advanced with ``next()``, which is atomic in CPython;
    "open" is made minus closed.
    """

    def __init__(self) -> None:
        self._made = itertools.count()
        self._closed = itertools.count()
        self._committed = itertools.count()
        self._rolled_back = itertools.count()
        self._retried = itertools.count()

    def opened(self, session: Session) -> None:
        if not getattr(session, _OPEN, False):
            setattr(session, _OPEN, True)
            next(self._made)

    def closed(self, session: Session) -> None:
        if getattr(session, _OPEN, False):
            setattr(session, _OPEN, False)
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
