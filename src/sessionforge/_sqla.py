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

If a SQLAlchemy upgrade breaks either, the tests ``test_events_*`` and
``test_missing_driver_*`` fail first.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL, Dialect
from sqlalchemy.orm import Session
from sqlalchemy.orm.events import SessionEvents
from sqlalchemy.util.concurrency import in_greenlet as in_greenlet

__all__ = ["EVENT_TARGET_ATTRIBUTE", "in_greenlet", "load_dialect"]

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
