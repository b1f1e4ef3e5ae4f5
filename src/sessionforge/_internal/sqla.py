"""Where sessionforge relies on SQLAlchemy internals (written against 2.1.9).

Every touch of a private SQLAlchemy name is a function here, numbered below with its
reason. Two reliances are of another kind and documented where they sit: the
``sqlite+sessionforge`` driver subclasses SQLAlchemy's pysqlite dialect classes
(``drivers/sqlite.py``), and the SQLite BEGIN policy re-asserts ``isolation_level =
None`` after pysqlite writes ``""`` (``dialects/sqlite.py``).

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
6. Every session of the process: ``sqlalchemy.orm.session._sessions``, the weak
   registry ``close_all_sessions()`` walks, read by ``all_sessions()`` for the
   factories' ``close_all()``.
7. Retiring a session an ended ``isolated()`` block left open (``testing``). The
   block's outer rollback already ended the session's SAVEPOINT, so a rollback of it
   would make SQLAlchemy warn that it is "already deassociated from connection";
   ``session.close()`` is quiet and runs the after-rollback hooks, as a rollback would.
   ``begin()``'s exit (and ``session.rollback()``) call ``SessionTransaction.rollback``
   looked up on the instance, so ``close_instead_of_rollback`` sets an instance
   attribute on each of the session's open transactions. Tested by
   ``test_a_session_left_open_at_exit_is_reported_and_refused_afterwards``.
8. The driver bridge of the isolated async connection (``testing``). The asyncio
   adapters (``AsyncAdapt_dbapi_connection``) keep the driver's connection in
   ``_connection`` and call its coroutine methods from the caller's greenlet, i.e. in
   the caller's event loop. ``testing`` swaps a bridge in there (``driver_of``,
   ``replace_driver``) so that each driver call runs in the loop that opened the
   connection; nothing else of the adapter changes, and the swap is undone before the
   connection is closed. Tested by
   ``test_sessions_in_other_threads_and_loops_share_the_isolation``.
9. The ``AsyncSession`` of a ``Session``: ``AsyncSession._retrieve_proxy_for_target``
   (``ReversibleProxy``'s weak registry, what ``async_object_session()`` uses), read by
   ``async_proxy()`` for ``close_all()``, which walks sync sessions.
10. Pool figures (``EngineStatus``): ``QueuePool`` has no public accessor for its
    overflow limit, so ``pool_max_overflow`` reads ``_max_overflow``. Tested by the
    ``status()`` tests.
11. The pool class of ``sqlite+sessionforge://`` (``drivers/sqlite.py``) is chosen as
    SQLAlchemy's own ``SQLiteDialect_aiosqlite.get_pool_class`` chooses it, with the
    pysqlite dialect's private classmethods ``_is_url_file_db`` and
    ``_warn_memory_mode_pool_selection``: ``sqlite_pool_class``.
12. The driver's server-side cursor: ``SQLiteExecutionContext.create_server_side_cursor``
    is overridden, as in aiosqlite's dialect, to ask the execution context's private
    ``_dbapi_connection`` for ``cursor(server_side=True)``: ``server_side_cursor``.
13. ``AsyncResult`` calls ``cursor._async_soft_close()`` on every buffered cursor
    (``ext/asyncio/result.py``), a private hook of SQLAlchemy's own adapter cursors
    (``connectors/asyncio.py``). The driver's cursors take it from
    ``SoftClosingCursor`` here, as a no-op: they hold nothing to close. Sections 11-13
    are exercised by ``tests/test_sqlite_driver.py`` and by every SQLite case of the
    suite (the driver is the default of ``sqlite://``).
14. Connect failures as ``DatabaseUnavailableError`` (``_internal/disconnects.py``).
    asyncpg's connect raises a raw ``OSError`` (refused, reset) or ``TimeoutError``,
    which SQLAlchemy does not wrap and which never reaches the ``handle_error`` event
    (``Connection.__init__`` hands only DBAPI errors to
    ``_handle_dbapi_exception_noconnection``), so no event sees it. The pool's creator
    that ``create_engine`` builds (``engine/create.py``) runs the ``do_connect``
    listeners, then looks ``dialect.connect`` up on the dialect *instance* at each call;
    ``wrap_connect`` sets an instance attribute there that calls the dialect's own
    ``connect`` and rewords what it raises. Users' ``do_connect`` listeners (and one
    that returns a connection of its own) keep working, and each engine has its own
    dialect instance. Tested by ``test_refused_connect_*`` in ``tests/test_disconnects.py``.
    ``wrap_commit`` does the same with ``dialect.do_commit``, which
    ``Connection._commit_impl`` also looks up on the instance, to mark what a COMMIT
    raises (the ``commit`` event would do, but any connection event listener makes
    SQLAlchemy dispatch all of them on every statement). Tested by the
    ``AmbiguousCommitError`` tests there. ``wrap_execution`` does it with the three
    ``do_execute*`` methods, which every statement reaches (``Connection`` calls them
    on ``self.dialect``, positionally, the execution context last), to note writes on
    a primary with replicas (``routing.install_write_tracking``; tested by the
    read-your-writes tests of ``tests/test_replicas.py``).
15. Rerouting a session's connection (``_internal/routing.py``). A session routed to a
    replica chooses it in ``get_bind()`` (public), but a replica whose connection
    cannot be made must be swapped for another before the session's first statement.
    Every transaction of a session gets its connection from
    ``Session._connection_for_bind(engine, execution_options)`` (``orm/session.py``:
    ``execute``, ``connection()``, flushes); ``RerouteOnConnect`` overrides it in the
    routed sync session class to ask ``_sessionforge_reroute(engine, exc)`` for another
    engine when it raises, and calls it again. Tested by
    ``test_a_stopped_replica_is_skipped_and_used_again_once_back`` and
    ``test_with_every_replica_down_reads_go_to_the_primary`` (``tests/test_replicas.py``).

16. The idle connections of a pool whose event loop was closed without shutting its
    engine down (``_internal/loops.py``): ``QueuePool`` keeps them in ``_pool``, a
    ``util.queue.Queue`` (its deque ``queue``) or, on an async engine, an
    ``AsyncAdaptedQueue`` (an ``asyncio.Queue`` made on first use, memoized as
    ``_queue``, its deque ``_queue``), of ``_ConnectionRecord``, with no public way to list them;
    ``idle_driver_connections`` reads it, so that their driver connections can be let
    go of without the dead loop (``dialects.abandon_driver_connection``). Tested by
    ``test_loop_closed_without_shutdown_is_dropped_quietly`` (``tests/test_loops.py``).

17. Which attribute an implicit load is for (``_internal/lazyload.py``). Every lazy
    relationship load and every expired or deferred column load reaches the public
    ``Session.execute`` (``LazyLoader._emit_lazyload``, ``loading._load_on_pk_identity``),
    which the factory's sync class overrides; nothing public says there what the
    statement loads. ``implicit_load`` reads the ORM's load options from the execution
    options (``_sa_orm_load_options``): ``_lazy_loaded_from`` (the parent's state) with
    the statement's ``_compile_options._current_path`` (its last element, a
    ``_PropRegistry``, is the relationship) for a relationship; ``_refresh_state``
    without ``_is_user_refresh`` (which ``session.refresh`` sets) for a column load.
    A column load loads every expired attribute at once, so the one the user touched is
    read, on this error path only, from the frame of
    ``_AttributeImpl._fire_loader_callables(state, key, passive)``, where every
    attribute access that loads passes; without that frame, the first attribute of the
    load is named. Tested by ``tests/test_lazyload.py``.

If a SQLAlchemy upgrade breaks any of these, the tests ``test_events_*``,
``test_missing_driver_*``, ``test_postgres_liveness_ping_*`` and ``test_deadline_*``
fail first (``test_refused_connect_*`` for 14, ``tests/test_replicas.py`` for 15,
``tests/test_lazyload.py`` for 17).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL, Dialect
from sqlalchemy.event import base as event_base
from sqlalchemy.ext.asyncio import AsyncSession, async_scoped_session
from sqlalchemy.orm import InstanceState, Session, scoped_session
from sqlalchemy.orm import attributes as orm_attributes
from sqlalchemy.orm import session as orm_session
from sqlalchemy.orm.events import SessionEvents
from sqlalchemy.pool import Pool
from sqlalchemy.util import await_
from sqlalchemy.util.concurrency import in_greenlet as in_greenlet

__all__ = [
    "EVENT_TARGET_ATTRIBUTE",
    "SoftClosingCursor",
    "all_sessions",
    "async_proxy",
    "close_instead_of_rollback",
    "close_within",
    "driver_of",
    "idle_driver_connections",
    "implicit_load",
    "in_greenlet",
    "load_dialect",
    "ping",
    "pool_max_overflow",
    "replace_driver",
    "server_side_cursor",
    "sqlite_pool_class",
    "wrap_connect",
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


def wrap_connect(
    dialect: Dialect, wrapper: Callable[[Callable[..., Any]], Callable[..., Any]]
) -> None:
    """Have ``dialect``'s engine open connections through ``wrapper(dialect.connect)``.

    See 14. above.
    """
    connect: Any = wrapper(dialect.connect)
    dialect.connect = connect  # type: ignore[method-assign]


def wrap_commit(dialect: Dialect, wrapper: Callable[[Callable[[Any], None]], Any]) -> None:
    """Have ``dialect``'s connections commit through ``wrapper(dialect.do_commit)`` (14.)."""
    commit: Any = wrapper(dialect.do_commit)
    dialect.do_commit = commit  # type: ignore[method-assign]


def wrap_execution(dialect: Dialect, wrapper: Callable[[Callable[..., None]], Any]) -> None:
    """Have ``dialect``'s cursors execute through ``wrapper`` (14.): ``do_execute``,
    ``do_executemany`` and ``do_execute_no_params``, each called with the execution
    context as its last positional argument."""
    for name in ("do_execute", "do_executemany", "do_execute_no_params"):
        setattr(dialect, name, wrapper(getattr(dialect, name)))


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


def close_instead_of_rollback(session: Session) -> None:
    """Have every open transaction of ``session`` close it when rolled back (see 7. above)."""

    def close(*_args: object, **_kwargs: object) -> None:
        session.close()

    transaction = session.get_nested_transaction() or session.get_transaction()
    while transaction is not None:
        transaction.rollback = close  # type: ignore[method-assign]
        transaction = transaction.parent


def driver_of(adapted: Any) -> Any:
    """The driver connection an asyncio adapter calls (see 8. above)."""
    return adapted._connection


def replace_driver(adapted: Any, driver: Any) -> None:
    """Make an asyncio adapter call ``driver`` instead (see 8. above)."""
    adapted._connection = driver


def async_proxy(session: Session) -> AsyncSession | None:
    """The ``AsyncSession`` wrapping ``session``, if any (see 9. above)."""
    proxy: AsyncSession | None = AsyncSession._retrieve_proxy_for_target(session, regenerate=False)
    return proxy


def pool_max_overflow(pool: Any) -> int | None:
    """A ``QueuePool``'s overflow limit, ``None`` for other pools (see 10. above)."""
    return getattr(pool, "_max_overflow", None)


def idle_driver_connections(pool: Any) -> list[Any]:
    """The driver connections idle in ``pool`` (a ``QueuePool``; see 16. above)."""
    holder = getattr(pool, "_pool", None)
    queue: Any = getattr(holder, "queue", None)
    if queue is None:  # AsyncAdaptedQueue: read the memoized queue without making one
        queue = getattr(vars(holder).get("_queue") if holder is not None else None, "_queue", ())
    adapted = [getattr(record, "dbapi_connection", None) for record in list(queue)]
    return [getattr(a, "_connection", a) for a in adapted if a is not None]


def sqlite_pool_class(
    dialect_cls: Any, url: URL, file_pool: type[Pool], memory_pool: type[Pool]
) -> type[Pool]:
    """``file_pool`` for a SQLite file, else ``memory_pool``, warning as SQLAlchemy does.

    See 11. above.
    """
    if dialect_cls._is_url_file_db(url):
        return file_pool
    dialect_cls._warn_memory_mode_pool_selection(url, memory_pool, file_pool)
    return memory_pool


def server_side_cursor(context: Any) -> Any:
    """A server-side cursor of the execution context's connection (see 12. above)."""
    return context._dbapi_connection.cursor(server_side=True)


class SoftClosingCursor:
    """Gives a driver cursor the hook ``AsyncResult`` calls (see 13. above)."""

    async def _async_soft_close(self) -> None:
        """SQLAlchemy's asyncio results call this; the cursor holds nothing to close."""


class RerouteOnConnect:
    """A ``Session`` mixin: a failed connect asks for another engine (section 15)."""

    def _sessionforge_reroute(self, engine: Any, exc: Exception) -> Any:
        raise exc  # overridden by routing.RoutedMethods

    def _connection_for_bind(self, engine: Any, execution_options: Any = None, **kw: Any) -> Any:
        while True:
            try:
                return super()._connection_for_bind(  # type: ignore[misc]
                    engine, execution_options, **kw
                )
            except Exception as exc:
                engine = self._sessionforge_reroute(engine, exc)


_FIRE_LOADERS = orm_attributes._AttributeImpl._fire_loader_callables.__code__


def implicit_load(
    statement: Any, execution_options: Mapping[str, Any]
) -> tuple[InstanceState[Any], str] | None:
    """The object and attribute key an implicit load is for (section 17).

    ``None`` for any other statement, ``session.get()`` and ``session.refresh()``
    included.
    """
    load_options = execution_options.get("_sa_orm_load_options")
    if load_options is None:
        return None
    parent: InstanceState[Any] | None = load_options._lazy_loaded_from
    if parent is not None:
        path = getattr(statement._compile_options, "_current_path", None)
        prop = getattr(path, "prop", None)
        return (parent, prop.key) if prop is not None else None
    state: InstanceState[Any] | None = load_options._refresh_state
    if state is None or load_options._is_user_refresh:
        return None
    touched = _touched_key(state)
    if touched is not None:
        return state, touched
    keys = sorted(getattr(statement._compile_options, "_only_load_props", None) or ())
    return (state, keys[0]) if keys else None


def _touched_key(state: InstanceState[Any]) -> str | None:
    """The key of ``state`` whose access is loading, from the caller's frames (17.)."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            if frame.f_code is _FIRE_LOADERS and frame.f_locals.get("state") is state:
                return str(frame.f_locals["key"])
            frame = frame.f_back
        return None
    finally:
        del frame  # no reference cycle through this frame's locals
