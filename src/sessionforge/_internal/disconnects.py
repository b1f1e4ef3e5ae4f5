"""Lost connections reach callers as ``DatabaseUnavailableError``, never raw (DESIGN §9).

Installed on every engine sessionforge builds (``engines._prepare``, both twins and
every replica engine):

- **At connect**: the dialect's ``connect`` is wrapped (``_sqla.wrap_connect``, §14)
  so that a refused, unreachable or timed-out attempt — asyncpg raises a bare
  ``OSError``/``TimeoutError`` that no SQLAlchemy event sees — raises
  ``DatabaseUnavailableError`` worded by ``diagnosis.explain``, the driver's error as
  its ``__cause__``. Wrong passwords and missing databases stay what they were.
- **On an open connection**: a ``handle_error`` listener, registered after the
  presets', turns a connection-class failure (``dialects.is_connection_error``, or
  SQLAlchemy's own ``dialect.is_disconnect``) into ``DatabaseUnavailableError`` and
  sets ``is_disconnect``, so SQLAlchemy invalidates the connection (and the pool's
  older ones: after a failover they all point at the old server). SQLAlchemy raises
  what the listener returns ``from`` the driver's error.
- **COMMIT in flight**: the dialect's ``do_commit`` is wrapped (``_sqla.wrap_commit``,
  §14; not the ``commit`` event, whose listener would make SQLAlchemy dispatch every
  connection event of every statement — about 100 Python calls per transaction) and
  marks the exception it raises; a connection-class failure so marked is an
  ``AmbiguousCommitError`` — the server may have committed. A connection already known
  dead before the COMMIT is sent is not marked: the COMMIT never left, the server rolled
  the transaction back, and it is a plain ``DatabaseUnavailableError`` that
  ``run_transaction`` re-runs.

A write refused with 25006 (read-only transaction) counts as a lost connection — a
standby where a primary was expected — except in a transaction sessionforge opened
``READ ONLY`` itself (``begin(readonly=True)``, a reader), where it is the caller's
mistake and keeps the driver's error.
"""

from __future__ import annotations

import contextlib
import select
from collections.abc import Callable
from typing import Any, Final

from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, Engine, ExceptionContext

from sessionforge.dialects import errors as dialect_errors
from sessionforge.dialects.postgresql import is_reader_connection
from sessionforge.errors import AmbiguousCommitError, DatabaseUnavailableError

from . import sqla as _sqla
from .diagnosis import driver_reason, explain
from .urls import mask_url

__all__ = ["install", "known_closed"]

#: Set on the exception a DBAPI commit raised after the COMMIT may have been sent.
_COMMIT_IN_FLIGHT: Final = "_sessionforge_commit_in_flight"

#: Non-blocking reads of an idle psycopg socket before a COMMIT (see ``known_closed``).
_PEEKS: Final = 3

# The connect argument that bounds one attempt, per driver (for the message).
_TIMEOUT_ARGUMENT: Final = {"asyncpg": "timeout", "psycopg": "connect_timeout"}


def install(engine: Engine) -> None:
    """Reword connection-class failures of ``engine`` (the sync core of an async one)."""
    url = engine.url
    _sqla.wrap_connect(engine.dialect, lambda connect: _connecting(url, connect))

    def on_error(context: ExceptionContext) -> BaseException | None:
        return _lost(url, context)

    event.listen(engine, "handle_error", on_error)
    dialect = engine.dialect
    _sqla.wrap_commit(dialect, lambda commit: _committing(dialect, commit))


def _connecting(url: URL, connect: Callable[..., Any]) -> Callable[..., Any]:
    argument = _TIMEOUT_ARGUMENT.get(url.get_driver_name().removesuffix("_async"))

    def connect_or_explain(*cargs: Any, **cparams: Any) -> Any:
        try:
            return connect(*cargs, **cparams)
        except Exception as exc:
            if not dialect_errors.is_connection_error(exc, connecting=True):
                raise
            timeout = cparams.get(argument) if argument is not None else None
            seconds = float(timeout) if isinstance(timeout, int | float) else None
            raise DatabaseUnavailableError(explain(url, exc, seconds)) from exc

    return connect_or_explain


def _lost(url: URL, context: ExceptionContext) -> BaseException | None:
    """The ``handle_error`` listener: the error to raise instead, or ``None``."""
    connection = context.connection
    original = context.original_exception
    in_commit = getattr(original, _COMMIT_IN_FLIGHT, False)
    if context.is_pre_ping or not isinstance(original, Exception):
        return None  # the pool's own check; a cancellation
    if getattr(context, "chained_exception", None) is not None:
        return None  # an earlier listener decided already
    if connection is not None and connection.invalidated:
        return None  # dropped on purpose before (a deadline, the guard): not the server
    read_only = connection is not None and _opened_read_only(connection)
    lost = dialect_errors.is_connection_error(original, read_only_transaction=read_only) or (
        context.is_disconnect and context.sqlalchemy_exception is not None
    )
    if not lost:
        return None
    context.is_disconnect = True
    reason = driver_reason(url, original)
    where = mask_url(url)
    if in_commit:
        return AmbiguousCommitError(
            f"the COMMIT was sent to the database at {where} and the connection was lost "
            f"before its answer ({reason}): the transaction may or may not have committed; "
            "check before re-running it (run_transaction does not re-run it)"
        )
    if _refused_write(original, read_only):
        return DatabaseUnavailableError(
            f"the database at {where} refused a write as read-only ({reason}): this "
            "connection reached a standby, not the primary (after a failover, or a "
            "multi-host URL without target_session_attrs=read-write); the connection was "
            "dropped and the server rolled the transaction back — run it again "
            "(run_transaction does)"
        )
    return DatabaseUnavailableError(
        f"lost the connection to the database at {where} ({reason}); the server rolls "
        "back the open transaction: run it again (run_transaction does), and if this "
        "repeats check that the server is up and the network in between"
    )


def _refused_write(original: BaseException, read_only: bool) -> bool:
    return not read_only and any(
        getattr(error, "sqlstate", None) == dialect_errors.READ_ONLY_SQLSTATE
        for error in (original, original.__cause__)
    )


def _opened_read_only(connection: Connection) -> bool:
    """Whether sessionforge opened this connection's transaction ``READ ONLY``."""
    if connection.get_execution_options().get("postgresql_readonly"):
        return True  # begin(readonly=True), run_transaction(readonly=True)
    try:
        proxied = connection.connection
    except Exception:  # invalidated or closed meanwhile
        return False
    # A reader: behind PgBouncer on asyncpg a READ ONLY transaction (the adapter's flag,
    # also what postgresql_readonly sets), otherwise autocommit.
    return bool(getattr(proxied.dbapi_connection, "readonly", False)) or bool(
        is_reader_connection(proxied.info)
    )


def _committing(dialect: Any, commit: Callable[[Any], None]) -> Callable[[Any], None]:
    """``dialect.do_commit``, noting on what it raises that the COMMIT may have left.

    A connection the driver already knows is gone sends nothing: its failure is not
    marked (the server rolled the transaction back).
    """

    def do_commit(dbapi_connection: Any) -> None:
        sent = not known_closed(dialect.get_driver_connection(dbapi_connection))
        try:
            commit(dbapi_connection)
        except BaseException as exc:
            if sent:
                with contextlib.suppress(AttributeError):  # an exception with __slots__
                    setattr(exc, _COMMIT_IN_FLIGHT, True)
            raise

    return do_commit


def known_closed(driver_connection: Any) -> bool:
    """Whether the driver already knows its connection is gone (nothing can be sent).

    asyncpg reads the socket on the event loop, so a backend the server terminated is
    ``is_closed()`` as soon as the loop has seen it. psycopg reads only when asked: a
    socket with something to read while no statement runs is consumed first, without
    blocking, and libpq says whether the server hung up (its goodbye message is kept
    as a notice).
    """
    is_closed = getattr(driver_connection, "is_closed", None)
    if callable(is_closed):  # asyncpg
        return bool(is_closed())
    if getattr(driver_connection, "closed", False) or getattr(driver_connection, "broken", False):
        return True
    pgconn = getattr(driver_connection, "pgconn", None)
    if pgconn is None:
        return False
    try:
        # A goodbye is a message, then the end of the stream: libpq sees the end on
        # the read after the one that got the message.
        for _ in range(_PEEKS):
            readable, _, _ = select.select([pgconn.socket], [], [], 0)
            if not readable:
                break
            pgconn.consume_input()
    except Exception:  # no socket, or the read found the end of the connection
        return True
    return bool(getattr(driver_connection, "broken", False))
