"""The one place sessionforge relies on SQLAlchemy internals (written against 2.1.9).

1. Event target routing. ``event.listen(sessionmaker_instance, "before_flush", fn)``
   works because ``SessionEvents._accept_with`` maps a ``sessionmaker`` to its
   per-factory class; ``async_sessionmaker`` is not mapped and raises. SQLAlchemy's
   ``event._event_key`` asks every ``Events`` class registered for an event name to
   accept a target, in order. We register one more such class, after
   ``SessionEvents``, whose ``_accept_with`` maps our factories to their per-factory
   ``Session`` subclass; from there SQLAlchemy's own ``SessionEvents._listen`` does the
   work. Nothing of SQLAlchemy is patched.
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

If a SQLAlchemy upgrade breaks any of these, the tests ``test_events_*``,
``test_missing_driver_*`` and ``test_postgres_liveness_ping_*`` fail first.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL, Dialect
from sqlalchemy.orm import Session
from sqlalchemy.orm.events import SessionEvents
from sqlalchemy.util import await_
from sqlalchemy.util.concurrency import in_greenlet as in_greenlet

__all__ = ["EVENT_TARGET_ATTRIBUTE", "in_greenlet", "load_dialect", "ping"]

#: Attribute a factory sets to the ``Session`` subclass its events belong to.
EVENT_TARGET_ATTRIBUTE = "_sessionforge_event_target"


def _session_event_names() -> list[str]:
    events: Any = SessionEvents
    return list(events.dispatch._event_names)


def _accept_factory(cls: type, target: Any, identifier: str) -> type[Session] | None:
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
