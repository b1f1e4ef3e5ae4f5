"""Per-factory session classes, with the hook methods and transaction listeners.

Like ``sessionmaker``, each factory makes its own subclass of the session class it was
given, so ``event.listen(factory, ...)`` reaches exactly that factory's sessions. The
async class wraps the sync class (``AsyncSession.sync_session_class``), and the sync
twin instantiates the same sync class: a listener on either twin sees the sessions of
both, which is what makes them one factory.
"""

from __future__ import annotations

from typing import Any, TypeVar, cast

from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from . import hooks, transactions

__all__ = ["AsyncHookMethods", "SyncHookMethods", "make_session_classes"]

_AS = TypeVar("_AS", bound=AsyncSession)


class SyncHookMethods:
    """``session.on_commit(fn)`` and ``session.after_rollback(fn)`` on sync sessions."""

    def on_commit(self, fn: hooks.Hook) -> None:
        """Run ``fn()`` after the outermost transaction commits (see ``hooks``)."""
        hooks.on_commit(cast("Session", self), fn)

    def after_rollback(self, fn: hooks.Hook) -> None:
        """Run ``fn()`` if the current transaction rolls back or is discarded."""
        hooks.after_rollback(cast("Session", self), fn)

    # Hooks registered while no transaction had begun die with the session's state.
    def close(self) -> None:
        super().close()  # type: ignore[misc]
        hooks.discard_pending(cast("Session", self))

    def reset(self) -> None:
        super().reset()  # type: ignore[misc]
        hooks.discard_pending(cast("Session", self))

    def invalidate(self) -> None:
        super().invalidate()  # type: ignore[misc]
        hooks.discard_pending(cast("Session", self))


class AsyncHookMethods:
    """The same on async sessions, where ``fn`` may also be an async function."""

    sync_session: Session

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        setattr(self.sync_session, hooks.ASYNC_FLAG, True)

    def on_commit(self, fn: hooks.Hook) -> None:
        """Run ``fn()`` (awaited if async) after the outermost transaction commits."""
        hooks.on_commit(self.sync_session, fn)

    def after_rollback(self, fn: hooks.Hook) -> None:
        """Run ``fn()`` (awaited if async) if the current transaction rolls back."""
        hooks.after_rollback(self.sync_session, fn)


def make_session_classes(
    class_: type[_AS], sync_class_: type[Session] | None
) -> tuple[type[_AS], type[Session]]:
    """Return fresh (async, sync) subclasses for one factory's sessions."""
    sync_base: type[Session] = sync_class_ or class_.sync_session_class
    sync_class = type(
        sync_base.__name__, (SyncHookMethods, sync_base), {"__module__": sync_base.__module__}
    )
    hooks.install(sync_class)
    transactions.install(sync_class)
    async_class = type(
        class_.__name__,
        (AsyncHookMethods, class_),
        {"__module__": class_.__module__, "sync_session_class": sync_class},
    )
    return cast("type[_AS]", async_class), sync_class
