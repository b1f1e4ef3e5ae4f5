"""Sessions routed to replicas, and the commits that move a context's consistency.

A factory with ``replicas=`` gives its sync session class (the sync side of its
AsyncSessions too) ``RoutedMethods`` and the listeners here; factories without replicas
have neither and pay nothing.

- A *routed* session (a reader, a read-only ``begin()``: ``core.py`` decides) carries a
  ``Route``. Its ``get_bind()`` asks ``Replicas.choose`` once, on first use, for a
  replica that has the context's writes; without one, the session's own bind (the
  primary) serves. A connection to the chosen replica that cannot be made (before the
  first statement) marks it unhealthy and the route chooses again: the caller sees no
  error while another replica or the primary can serve.
- A primary session's transaction is *written* when the connection ran a statement
  other than a plain read (``install_write_tracking`` on the primary's engines; text
  SQL included: see ``is_write``). After such a transaction commits, one round trip on the
  same connection gives the position (``dialects/replication.commit_position``), kept in
  the session's state and applied to the committing context — and, by
  ``carry_consistency``, to the caller's context when the COMMIT ran in a task of its
  own (``begin()``'s exit does).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, SessionTransaction

from sessionforge.dialects.errors import is_connection_error
from sessionforge.dialects.replication import commit_position
from sessionforge.errors import DatabaseUnavailableError

from . import sqla as _sqla
from .replicas import Replica, Replicas, Twin

if TYPE_CHECKING:
    from .state import SessionState

__all__ = [
    "Route",
    "RoutedMethods",
    "carry_consistency",
    "install_routing",
    "install_write_tracking",
    "is_write",
]

logger = logging.getLogger("sessionforge.replicas")

#: Set in a primary connection's ``info`` once its transaction wrote.
_WROTE: Final = "sessionforge_wrote"
# Statements that change no data: reads, and the transaction's own bookkeeping.
_NOT_WRITES: Final = ("SELECT", "SHOW", "SET ", "SAVEPOINT", "RELEASE", "ROLLBACK", "BEGIN")
_LEADING_COMMENTS: Final = re.compile(r"^(\s+|--[^\n]*(\n|$)|/\*.*?\*/)+", re.DOTALL)
_INTO: Final = re.compile(r"\bINTO\b", re.IGNORECASE)


def is_write(statement: str) -> bool:
    """Whether ``statement`` may change data: anything but a plain read.

    Leading comments (sqlcommenter's, say) are skipped. Conservative: a statement that
    starts with ``WITH`` or ``(`` counts as a write, and so does ``SELECT ... INTO``.
    A ``SELECT`` of a function that writes does not — and is not seen.
    """
    head = statement[:9].upper()
    if not head[:1].isalpha():
        statement = _LEADING_COMMENTS.sub("", statement, count=1)
        head = statement[:9].upper()
    if not head.startswith(_NOT_WRITES):
        return True
    return head.startswith("SELECT") and _INTO.search(statement) is not None


class Route:
    """Where one routed session reads: a replica chosen on first use, or the primary."""

    __slots__ = (
        "chosen",
        "decided",
        "execution_options",
        "reader",
        "replica",
        "replicas",
        "twin",
    )

    def __init__(
        self,
        replicas: Replicas,
        twin: Twin,
        execution_options: dict[str, Any] | None,
        *,
        reader: bool,
    ) -> None:
        self.replicas = replicas
        self.twin = twin
        #: A reader's statements are transactions of their own: each may move.
        self.reader = reader
        self.execution_options = execution_options
        #: Whether the current transaction's server is chosen, and which: a replica's
        #: engine, or ``None`` for the primary.
        self.decided = False
        self.chosen: Engine | None = None
        self.replica: Replica | None = None

    def engine(self) -> Engine | None:
        """The replica engine to use, or ``None`` for the session's own (the primary).

        Chosen once per transaction. A ``get_bind()`` outside SQLAlchemy's greenlet
        (an async session's, called from plain async code) cannot check replicas: it
        answers from what is known, and the choice is made at the first real use.
        """
        if self.decided and not self._behind():
            return self.chosen
        io = self.twin == "sync" or _sqla.in_greenlet()
        replica = self.replicas.choose(self.twin, io=io)
        engine = None if replica is None else replica.engine(self.twin, self.execution_options)
        if io:
            self.decided, self.chosen, self.replica = True, engine, replica
            if replica is not None:
                next(replica.reads)
        return engine

    def _behind(self) -> bool:
        """Whether a reader's replica is not known to have the context's writes any more
        (the context committed since it was chosen): the next statement chooses again.
        A read-only *transaction* keeps its server: its snapshot is taken."""
        replica = self.replica
        if replica is None or not self.reader:
            return False
        need = self.replicas.needed()
        return need is not None and replica.position < need

    def reroute(self, engine: Engine, exc: Exception) -> Engine | None:
        """After ``engine`` could not give a connection: the next choice, or re-raise."""
        replica = self.replica
        if replica is None or engine is not self.chosen or not reroutable(exc):
            raise exc
        self.replicas.failed(replica, exc)
        self.reset()
        return self.engine()

    def reset(self) -> None:
        self.decided, self.chosen, self.replica = False, None, None


def reroutable(exc: BaseException) -> bool:
    """Whether a failure to get a replica connection means "try another server"."""
    if isinstance(exc, DatabaseUnavailableError | OSError | TimeoutError):
        return True
    return is_connection_error(exc, connecting=True) or bool(
        getattr(exc, "connection_invalidated", False)
    )


class RoutedMethods(_sqla.RerouteOnConnect):
    """``get_bind()`` and connection setup of a factory with replicas (module docstring)."""

    _sessionforge_state: SessionState

    def get_bind(self, mapper: Any = None, *args: Any, **kwargs: Any) -> Any:
        route = self._sessionforge_state.route
        if route is not None and kwargs.get("bind") is None:
            engine = route.engine()
            if engine is not None:
                return engine
        return super().get_bind(mapper, *args, **kwargs)  # type: ignore[misc]

    def _sessionforge_reroute(self, engine: Any, exc: Exception) -> Any:
        """The engine to try after ``engine`` could not connect (or re-raise ``exc``)."""
        route = self._sessionforge_state.route
        if route is None:
            raise exc
        return route.reroute(engine, exc) or super().get_bind()  # type: ignore[misc]


def install_routing(session_class: type[Session], replicas: Replicas) -> None:
    """The listeners of a factory with replicas, on its sync session class."""

    def connected(session: Session, transaction: SessionTransaction, connection: Any) -> None:
        if transaction.parent is not None or not isinstance(session.bind, Engine):
            return  # a SAVEPOINT; or a session on a connection (isolated(), a test's)
        state: SessionState = session._sessionforge_state  # type: ignore[attr-defined]
        if state.route is None and replicas.read_your_writes:
            connection.info.pop(_WROTE, None)
            if state.primary_connections is None:
                state.primary_connections = [connection]
            else:  # binds= to several engines
                state.primary_connections.append(connection)

    def committed(session: Session) -> None:
        if session.get_nested_transaction() is not None:
            return  # a RELEASE SAVEPOINT fires after_commit too: the COMMIT is later
        state: SessionState = session._sessionforge_state  # type: ignore[attr-defined]
        connections = state.primary_connections
        if connections is None:
            return
        state.primary_connections = None
        wrote = [c for c in connections if c.info.pop(_WROTE, False) and not c.invalidated]
        if wrote:
            take_position(state, wrote[-1])

    def take_position(state: SessionState, connection: Any) -> None:
        try:
            position, system = commit_position(
                connection.connection.dbapi_connection,
                with_system=replicas.system is None,
                in_transaction=replicas.in_transaction,
            )
        except Exception:  # the COMMIT succeeded: never turn that into an error
            logger.warning(
                "could not read the primary's WAL position after a commit; this "
                "context's next reads may not see it on a replica",
                exc_info=True,
            )
            return
        consistency = replicas.committed(position, system)
        state.consistency = consistency
        replicas.apply(consistency)

    def ended(session: Session, transaction: SessionTransaction) -> None:
        if transaction.parent is None:
            state: SessionState = session._sessionforge_state  # type: ignore[attr-defined]
            state.primary_connections = None
            if state.route is not None:
                state.route.reset()

    event.listen(session_class, "after_begin", connected)
    event.listen(session_class, "after_commit", committed)
    event.listen(session_class, "after_transaction_end", ended)


def install_write_tracking(engine: Engine) -> None:
    """Note on a primary connection that its transaction ran a write (``is_write``).

    Through the dialect's ``do_execute*`` (``sqla.py`` §14), not the
    ``before_cursor_execute`` event: a connection event listener makes SQLAlchemy
    dispatch every connection event on every statement.
    """

    def noting(execute: Callable[..., None]) -> Callable[..., None]:
        def execute_noting_writes(cursor: Any, statement: str, *args: Any) -> None:
            if is_write(statement):
                connection = getattr(args[-1] if args else None, "root_connection", None)
                if connection is not None:
                    connection.info[_WROTE] = True
            execute(cursor, statement, *args)

        return execute_noting_writes

    _sqla.wrap_execution(engine.dialect, noting)


def carry_consistency(session: Session, replicas: Replicas | None) -> None:
    """Apply the position ``session`` last committed at to the running context."""
    if replicas is None:
        return
    state: SessionState = session._sessionforge_state  # type: ignore[attr-defined]
    consistency = state.consistency
    if consistency is not None:
        state.consistency = None
        replicas.apply(consistency)
