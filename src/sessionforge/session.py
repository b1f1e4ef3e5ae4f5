"""Per-factory session classes.

Like ``sessionmaker``, each factory makes its own subclass of the session class it was
given, so ``event.listen(factory, ...)`` reaches exactly that factory's sessions. The
async class wraps the sync class (``AsyncSession.sync_session_class``), and the sync
twin instantiates the same sync class: a listener on either twin sees the sessions of
both, which is what makes them one factory. Later features (hooks, the task guard)
add their mixins here.
"""

from __future__ import annotations

from typing import TypeVar, cast

from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

__all__ = ["make_session_classes"]

_AS = TypeVar("_AS", bound=AsyncSession)


def make_session_classes(
    class_: type[_AS], sync_class_: type[Session] | None
) -> tuple[type[_AS], type[Session]]:
    """Return fresh (async, sync) subclasses for one factory's sessions."""
    sync_base: type[Session] = sync_class_ or class_.sync_session_class
    sync_class = type(sync_base.__name__, (sync_base,), {"__module__": sync_base.__module__})
    async_class = type(
        class_.__name__,
        (class_,),
        {"__module__": class_.__module__, "sync_session_class": sync_class},
    )
    return cast("type[_AS]", async_class), sync_class
