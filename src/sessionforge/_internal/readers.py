"""Reader sessions (``db.reader()``): per-factory subclasses that refuse writes.

A reader's session class is a subclass of the factory's own (so it inherits the
factory's listeners, hooks, counters and guard) that refuses writes: ORM changes at
flush (a listener), Core ``insert``/``update``/``delete`` when given to ``execute``,
``scalar`` or ``scalars`` (``RefuseDML``: overriding the three public methods costs a
frame each, where a ``do_orm_execute`` listener made SQLAlchemy run its ORM
pre-execution twice for every statement, ~20 Python calls). The engine
side (autocommit, SQLite's skipped BEGIN, a READ ONLY transaction behind PgBouncer) is the
dialect's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, TypeVar

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from sessionforge.errors import ReadOnlySessionError

__all__ = ["reader_classes"]

_AS = TypeVar("_AS", bound=AsyncSession)

_READER: Final = "_sessionforge_reader_classes"

_WRITE_REFUSED: Final = (
    "a reader session (db.reader()) runs each statement on its own in AUTOCOMMIT mode (a "
    "READ ONLY transaction behind PgBouncer) and does not write; {what} — write in "
    "db.begin() (or db.atomic()) instead"
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
            sync_class.__name__, (RefuseDML, sync_class), {"__module__": sync_class.__module__}
        )
        event.listen(sync_reader, "before_flush", _refuse_flush)
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


class RefuseDML:
    """A ``Session`` mixin: Core ``insert``/``update``/``delete`` statements are refused."""

    def execute(self, statement: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(statement, "is_dml", False):
            _refuse_dml(statement)
        return super().execute(statement, *args, **kwargs)  # type: ignore[misc]

    def scalar(self, statement: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(statement, "is_dml", False):
            _refuse_dml(statement)
        return super().scalar(statement, *args, **kwargs)  # type: ignore[misc]

    def scalars(self, statement: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(statement, "is_dml", False):
            _refuse_dml(statement)
        return super().scalars(statement, *args, **kwargs)  # type: ignore[misc]


def _refuse_dml(statement: Any) -> None:
    what = (
        "an INSERT" if statement.is_insert else "an UPDATE" if statement.is_update else "a DELETE"
    )
    raise ReadOnlySessionError(_WRITE_REFUSED.format(what=f"it was asked to run {what}"))
