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

Inside: ``_handles`` (the two handles), ``_isolation`` (what they share: the routing of
sessions onto the connection, and their retirement at the end), ``_lock`` (the turn
lock), ``_bridge`` (the async connection's own loop); the errors are in
``sessionforge.errors``.
"""

from __future__ import annotations

from typing import Any, TypeVar, overload

from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from sessionforge.errors import ConfigurationError
from sessionforge.factory import SessionFactory
from sessionforge.sync import SyncSessionFactory

from ._handles import AsyncIsolation as AsyncIsolation
from ._handles import SyncIsolation as SyncIsolation

__all__ = ["AsyncIsolation", "SyncIsolation", "isolated"]

_AS = TypeVar("_AS", bound=AsyncSession)
_S = TypeVar("_S", bound=Session)

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
