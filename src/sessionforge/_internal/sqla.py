"""The one place sessionforge relies on SQLAlchemy internals (written against 2.1.9).

1. Event target routing. ``event.listen(sessionmaker_instance, "before_flush", fn)``
   works because ``SessionEvents._accept_with`` maps a ``sessionmaker`` to its
   per-factory class; ``async_sessionmaker`` is not mapped and raises. SQLAlchemy's
   ``event._event_key`` asks every ``Events`` class registered for an event name
   (``event.base._registrars[name]``) to accept a target, in order, and stops at the
   first that does. We register one more such class whose ``_accept_with`` maps our
   factories — and ``scoped_session`` / ``async_scoped_session`` over them — to their
   per-factory ``Session`` subclass, and move it to the front of those lists:
   ``SessionEvents._accept_with`` raises ``ArgumentError`` for a ``scoped_session``
   whose factory is not a ``sessionmaker`` before later classes are asked. Ours
   accepts nothing else, so every other target reaches ``SessionEvents`` as before;
   from there SQLAlchemy's own ``SessionEvents._listen`` does the work.
2. Awaiting async on-commit hooks from inside a session event: SQLAlchemy runs every
   AsyncSession operation in a greenlet, where ``sqlalchemy.util.await_`` (public) can
   wait for a coroutine; ``in_greenlet`` (``sqlalchemy.util.concurrency``) tells
   whether we are in one.
3. Loading a dialect class for the async or the sync engine, to check at factory
   construction that its driver is installed (``URL.get_dialect(_is_async=...)``).

4. A one-round-trip liveness ping on asyncpg. The adapter's ``ping()`` wraps its
   ``SELECT`` in BEGIN/ROLLBACK — three round trips — because asyncpg's ``fetchrow``
   prepares a statement, which PgBouncer in transaction mode could route to another
   server connection (SQLAlchemy #10226). asyncpg's ``Connection.execute(sql)`` without
   arguments uses the simple query protocol: one round trip, nothing prepared, so safe
   behind PgBouncer too. We reach the asyncpg connection through the adapter's
   ``_connection`` and its open-transaction marker ``_transaction``.
5. A bounded close for an invalidated asyncpg connection (issue 11). SQLAlchemy 2.1.9's
   asyncpg adapter ``terminate()``, which every invalidation ends in (also the one
   SQLAlchemy does itself when a statement is cancelled), awaits a graceful
   ``close(timeout=2)`` (SQLAlchemy #10717: let a pending cancel request reach the
   server) and aborts only when that fails: against a hung server a timed-out
   ``begin(timeout=1)`` took 3 s. From the pool's ``invalidate`` event, which fires
   before that close, ``close_within`` awaits asyncpg's ``close(timeout=grace)``
   itself (in SQLAlchemy's greenlet, shielded, as the adapter does), which aborts the
   connection when the grace runs out; the adapter's graceful close then finds the
   connection closed and returns at once. We reach the asyncpg connection through
   ``Dialect.get_driver_connection`` (public).

If a SQLAlchemy upgrade breaks any of these, the tests ``test_events_*``,
``test_missing_driver_*``, ``test_postgres_liveness_ping_*`` and ``test_deadline_*``
fail first.
"""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL, Dialect
from sqlalchemy.event import base as event_base
from sqlalchemy.ext.asyncio import async_scoped_session
from sqlalchemy.orm import Session, scoped_session
from sqlalchemy.orm import session as orm_session
from sqlalchemy.orm.events import SessionEvents
from sqlalchemy.util import await_
from sqlalchemy.util.concurrency import in_greenlet as in_greenlet

__all__ = [
    "EVENT_TARGET_ATTRIBUTE",
    "all_sessions",
    "close_within",
    "in_greenlet",
    "load_dialect",
    "ping",
]

#: Attribute a factory sets to the ``Session`` subclass its events belong to.
EVENT_TARGET_ATTRIBUTE = "_sessionforge_event_target"


def _session_event_names() -> list[str]:
    events: Any = SessionEvents
    return list(events.dispatch._event_names)


def _accept_factory(cls: type, target: Any, identifier: str) -> type[Session] | None:
    if isinstance(target, scoped_session | async_scoped_session):
        target = target.session_factory
    session_class = getattr(target, EVENT_TARGET_ATTRIBUTE, None)
    if isinstance(session_class, type) and issubclass(session_class, Session):
        return session_class
    return None


# Subclassing event.Events registers the class for every event name defined in its
# namespace; _dispatch_target=None keeps it from installing a dispatcher anywhere.
_FactorySessionEvents = type(
    "_FactorySessionEvents",
    (event.Events,),
    {
        "_dispatch_target": None,
        "_accept_with": classmethod(_accept_factory),
        **{name: vars(SessionEvents)[name] for name in _session_event_names()},
    },
)
for _name in _session_event_names():
    _registrars: Any = event_base._registrars[_name]
    _registrars.remove(_FactorySessionEvents)
    _registrars.insert(0, _FactorySessionEvents)


def all_sessions() -> list[Session]:
    """Every ``Session`` of this process still alive (see 6. above)."""
    return list(orm_session._sessions.values())


def load_dialect(url: URL, *, is_async: bool) -> type[Dialect]:
    """Return the dialect class an (async) engine for ``url`` would use."""
    return url.get_dialect(_is_async=is_async)


def ping(dialect: Dialect, dbapi_connection: Any) -> None:
    """Check that ``dbapi_connection`` answers: one round trip on asyncpg (see 4. above)."""
    driver_connection = getattr(dbapi_connection, "_connection", None)
    if (
        dialect.driver == "asyncpg"
        and driver_connection is not None
        and getattr(dbapi_connection, "_transaction", None) is None
    ):
        await_(driver_connection.execute(";"))
    else:
        dialect.do_ping(dbapi_connection)


def close_within(dialect: Dialect, dbapi_connection: Any, grace: float) -> None:
    """Close an asyncpg connection gracefully within ``grace`` seconds, else abort it.

    See 5. above. Outside a greenlet (a connection garbage-collected) SQLAlchemy
    aborts the connection without waiting anyway, so nothing is done here.
    """
    if dialect.driver != "asyncpg" or not in_greenlet():
        return
    connection = dialect.get_driver_connection(dbapi_connection)
    if connection is None or connection.is_closed():
        return
    try:
        await_(asyncio.shield(connection.close(timeout=grace)))
    except asyncio.CancelledError:
        connection.terminate()  # cancelled again while waiting: drop it and go on
        raise
    except Exception:
        connection.terminate()  # asyncpg aborted it already (timeout) or will now
