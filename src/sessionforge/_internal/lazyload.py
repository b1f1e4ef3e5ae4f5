"""Implicit IO under asyncio: ``LazyLoadError`` before a load that cannot work.

Touching a lazy relationship, or an expired or deferred column, of an async session's
object in plain ``async`` code makes SQLAlchemy load it there and then, synchronously:
outside the greenlet ``AsyncSession`` runs its work in, the driver cannot be awaited,
and SQLAlchemy fails with ``MissingGreenlet`` ("greenlet_spawn has not been called")
once the statement reaches the driver, naming neither the attribute nor the fix (its
most reported async problem: sqlalchemy #6164, #9627, sqlmodel #74).

Every such load goes through the public ``Session.execute``, which the factory's sync
session class overrides (``ImplicitIOCheck``): outside SQLAlchemy's greenlet, for the
sync side of an ``AsyncSession``, a lazy load is refused with ``LazyLoadError`` before
anything else happens (no autoflush, no connection, no statement), so the session is
as it was. Which attribute the load is for is read from SQLAlchemy's load options
(``sqla.implicit_load``, section 16). Loads that work are untouched: inside
``run_sync`` or ``awaitable_attrs`` (in the greenlet), the sync twin's sessions (no
``AsyncSession``), identity-map hits (no statement), ``lazy="raise"`` and detached
objects (SQLAlchemy raises before it executes anything).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy.ext.asyncio import async_session
from sqlalchemy.orm import InstanceState, RelationshipProperty
from sqlalchemy.util import EMPTY_DICT

from sessionforge.errors import LazyLoadError

from .sqla import implicit_load, in_greenlet

__all__ = ["ImplicitIOCheck", "lazy_load_message"]


class ImplicitIOCheck:
    """A ``Session`` mixin: an implicit load on the event loop raises ``LazyLoadError``.

    On the hot path this is one Python frame per ``execute`` (about 0.25 µs): a
    statement without execution options (a user's ``execute(select(...))``) skips the
    greenlet check, and every load SQLAlchemy runs in its greenlet passes it at once.
    """

    def execute(
        self,
        statement: Any,
        params: Any = None,
        *,
        execution_options: Mapping[str, Any] = EMPTY_DICT,
        **kwargs: Any,
    ) -> Any:
        if execution_options and not in_greenlet():
            _refuse_on_the_event_loop(self, statement, execution_options)
        return super().execute(  # type: ignore[misc]
            statement, params, execution_options=execution_options, **kwargs
        )


def _refuse_on_the_event_loop(session: Any, statement: Any, options: Mapping[str, Any]) -> None:
    """Raise ``LazyLoadError`` if ``statement`` is an async session's implicit load."""
    if async_session(session) is None:
        return  # the sync twin's session: its loads work anywhere
    load = implicit_load(statement, options)
    if load is not None:
        raise LazyLoadError(lazy_load_message(*load))


def lazy_load_message(state: InstanceState[Any], key: str) -> str:
    """What went wrong loading ``key`` of ``state``'s object, and the ways to load it."""
    model = state.class_.__name__
    attribute = f"{model}.{key}"
    awaited = f"await obj.awaitable_attrs.{key}"
    if not hasattr(state.class_, "awaitable_attrs"):
        awaited += " (with sqlalchemy.ext.asyncio.AsyncAttrs among the model's bases)"
    refresh = f'await session.refresh(obj, ["{key}"])'
    if isinstance(state.mapper.attrs.get(key), RelationshipProperty):
        what = f"{attribute} is not loaded"
        fixes = (
            f"Load it with the query: select({model}).options(selectinload({attribute})); "
            f"or now: {awaited}, or {refresh}"
        )
    elif key in state.expired_attributes:
        what = (
            f"{attribute} is expired (a commit expires every attribute with "
            "expire_on_commit=True; so do rollback() and session.expire())"
        )
        fixes = (
            f"Load it again first: await session.refresh(obj) or {refresh}; or {awaited}; "
            "or keep attributes loaded across commits with expire_on_commit=False "
            "(the factory's default)"
        )
    else:
        what = f"{attribute} is deferred (the query did not load it)"
        fixes = (
            f"Load it with the query: select({model}).options(undefer({attribute})); "
            f"or now: {awaited}, or {refresh}"
        )
    return (
        f"{what}, and loading it on access would be IO on the event loop, outside the "
        "greenlet an AsyncSession runs IO in (SQLAlchemy would fail with MissingGreenlet); "
        f"nothing was sent to the database. {fixes}"
    )
