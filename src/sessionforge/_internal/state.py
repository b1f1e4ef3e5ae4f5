"""What sessionforge keeps about one session, in one typed object.

Every session of a factory's sync class (the sync side of each ``AsyncSession`` too)
carries one ``SessionState`` as ``session._sessionforge_state``, made with the session
(``session.SyncHookMethods.__init__``). The modules that keep per-session facts read
and write its fields instead of setting string-named attributes on SQLAlchemy's
objects: counters and leak reports (``stats.py``), the options a ``begin()`` gave and
the open atomic blocks (``transactions.py``), hooks (``hooks.py``). The async session's
guard keeps its holder on the ``AsyncSession`` itself (``session.py``), since it guards
that object.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine
    from sqlalchemy.orm import Session, SessionTransaction

    from .consistency import Consistency
    from .routing import Route
    from .transactions import TransactionOptions

__all__ = ["SessionState", "state_of"]

#: The attribute a session's state lives in.
ATTRIBUTE = "_sessionforge_state"


class SessionState:
    """One session's sessionforge facts (see the module docstring)."""

    __slots__ = (
        "atomic_depth",
        "committed",
        "connected",
        "consistency",
        "counted_open",
        "engine",
        "hooks",
        "options",
        "origin",
        "primary_connections",
        "route",
    )

    def __init__(self) -> None:
        #: Counted in the factory's open sessions (``stats``).
        self.counted_open = False
        #: The root transaction that reached the database, and its engine (``stats``).
        self.connected: SessionTransaction | None = None
        self.engine: Engine | None = None
        #: The root transaction that committed (``stats``).
        self.committed: SessionTransaction | None = None
        #: Where the session was made, with ``track_session_origin`` (``stats``).
        self.origin: list[str] | None = None
        #: The options of the ``begin()`` that made the session (``transactions``).
        self.options: TransactionOptions | None = None
        #: How many ``atomic()`` blocks are open on the session (``transactions``).
        self.atomic_depth = 0
        #: Registered on-commit / after-rollback hooks (``hooks``; made on first use).
        self.hooks: Any = None
        #: With replicas (``routing``): where a routed session reads, the primary
        #: connections of the open transaction, the position its last commit reached.
        self.route: Route | None = None
        self.primary_connections: list[Connection] | None = None
        self.consistency: Consistency | None = None


def state_of(session: Session) -> SessionState | None:
    """``session``'s state, or ``None`` for a session no sessionforge factory made."""
    state: SessionState | None = getattr(session, ATTRIBUTE, None)
    return state
