"""What sessionforge does differently on SQLite.

- **URLs**: which spellings are in-memory, the shared name an in-memory database gets,
  and the query parameters SQLAlchemy's pysqlite dialect would refuse or ignore.
- **Pragmas** set on every new connection (``busy_timeout``, ``journal_mode``,
  ``synchronous``, ``foreign_keys``), in driver-level autocommit.
- **The BEGIN policy**: ``BEGIN IMMEDIATE`` (or ``DEFERRED``) sent when SQLAlchemy
  begins a transaction, read-only transactions (``PRAGMA query_only``), the rollback on
  return that replaces the pool's, a cancelled statement that keeps its connection,
  and the refusal of a file aiosqlite could not open.

The driver ``sqlite+sessionforge://`` is ``sessionforge/drivers/sqlite.py``; it also
rewrites BEGIN (it defers it to the first statement), under this policy.
"""

from __future__ import annotations

import asyncio
import math
import sqlite3
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import unquote, urlsplit

from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, Engine, ExceptionContext
from sqlalchemy.pool import AsyncAdaptedQueuePool, QueuePool

from sessionforge.errors import ConfigurationError

if TYPE_CHECKING:
    from sqlalchemy.pool import ConnectionPoolEntry, PoolResetState

__all__ = [
    "BEGIN_MODES",
    "BEGIN_OPTION",
    "JOURNAL_MODES",
    "READER_OPTIONS",
    "READONLY_OPTION",
    "SYNCHRONOUS_LEVELS",
    "check_url",
    "engine_arguments",
    "install_begin",
    "install_pragmas",
    "install_return_policy",
    "is_memory_sqlite",
    "is_sqlite",
    "normalise_memory_sqlite",
    "refuse_unopenable_files",
    "sqlite_path",
    "sqlite_unopenable",
]

JOURNAL_MODES: Final = frozenset({"WAL", "DELETE", "TRUNCATE", "PERSIST", "MEMORY", "OFF"})
SYNCHRONOUS_LEVELS: Final = frozenset({"OFF", "NORMAL", "FULL", "EXTRA"})
BEGIN_MODES: Final = frozenset({"immediate", "deferred"})

#: Execution option that picks the SQLite BEGIN mode of one connection's transactions
#: ("immediate" or "deferred").
BEGIN_OPTION: Final = "sessionforge_sqlite_begin"
#: Execution option asking SQLite for a read-only transaction (deferred BEGIN plus
#: ``PRAGMA query_only``).
READONLY_OPTION: Final = "sessionforge_readonly"
#: Execution options of a reader session. Connections already run in driver-level
#: autocommit with the BEGIN sent by ``install_begin``, so a reader just skips the
#: BEGIN; SQLAlchemy's AUTOCOMMIT level would cost two thread hops per session on
#: aiosqlite (set and restore).
READER_OPTIONS: Final[Mapping[str, Any]] = {BEGIN_OPTION: "none"}

_QUERY_ONLY: Final = "sessionforge_query_only"
_ROLLBACK_ON_RETURN: Final = "sessionforge_rollback_on_return"

# --- URLs ---------------------------------------------------------------------------

# Query parameters SQLAlchemy's pysqlite dialect (aiosqlite's and ours alike) gives
# the driver, converted when the engine is built; any other one is a SQLite URI
# parameter, passed on only with uri=true and otherwise ignored with a warning.
_DRIVER_QUERY: Final[Mapping[str, str]] = {
    "uri": "bool",
    "timeout": "float",
    "isolation_level": "str",
    "detect_types": "int",
    "check_same_thread": "bool",
    "cached_statements": "int",
}
_BOOLS: Final = frozenset(
    {"true", "yes", "on", "y", "t", "1", "false", "no", "off", "n", "f", "0"}
)


def is_sqlite(url: URL) -> bool:
    return url.get_backend_name() == "sqlite"


def is_memory_sqlite(url: URL) -> bool:
    """True for every spelling of an in-memory SQLite database, ours included."""
    if not is_sqlite(url):
        return False
    database = url.database or ""
    return (
        database in ("", ":memory:")
        or "mode=memory" in database
        or (url.query.get("mode") == "memory")
    )


def normalise_memory_sqlite(url: URL) -> URL:
    """Give ``sqlite://`` a name of its own, so every connection of a factory shares it.

    A plain ``:memory:`` database belongs to one connection. A named shared-cache
    in-memory database is seen by every connection of this process that opens the same
    name — the async engine's and the sync twin's alike — and lives while one is open.
    """
    database = url.database or ""
    if database not in ("", ":memory:"):
        return url
    name = f"file:sessionforge-{uuid.uuid4().hex}"
    return url.set(database=name, query={"mode": "memory", "cache": "shared", "uri": "true"})


def check_url(url: URL) -> None:
    """Refuse what SQLAlchemy's SQLite dialects would refuse (or ignore) in ``url``."""
    if url.username or url.password or url.host or url.port:
        raise ConfigurationError(
            "a SQLite URL names a file, not a server: it has no user, password, host or "
            "port; write sqlite:///relative/app.db, sqlite:////absolute/app.db or "
            "sqlite:// for an in-memory database"
        )
    for key, kind in _DRIVER_QUERY.items():
        if key in url.query and not _is_query_value(url.query[key], kind):
            raise ConfigurationError(
                f"the SQLite URL's query parameter {key}= must be one {kind} value"
                + (" (true or false)" if kind == "bool" else "")
            )
    uri = str(url.query.get("uri", "false")).lower() in ("true", "yes", "on", "y", "t", "1")
    others = sorted(set(url.query) - set(_DRIVER_QUERY))
    if others and not uri:
        raise ConfigurationError(
            f"the SQLite URL's query parameter(s) {', '.join(map(repr, others))} are SQLite "
            "URI parameters, which apply only with uri=true in the URL "
            "(sqlite:///file:app.db?mode=ro&uri=true); without it they are ignored"
        )


def _is_query_value(value: str | tuple[str, ...], kind: str) -> bool:
    if not isinstance(value, str):
        return False  # given twice
    if kind == "bool":
        return value.lower() in _BOOLS
    if kind == "str":
        return True
    try:
        number = int(value) if kind == "int" else float(value)
    except ValueError:
        return False
    return math.isfinite(number)


# --- engines ------------------------------------------------------------------------


def engine_arguments(
    url: URL, kwargs: dict[str, Any], connect_args: dict[str, Any], *, is_async: bool
) -> None:
    """Set what every SQLite engine needs in ``kwargs`` and ``connect_args``."""
    if is_memory_sqlite(url):
        # One connection, held for the factory's life: the database lives in it.
        # Transactions are serialised by the pool (size 1, no overflow).
        kwargs["poolclass"] = AsyncAdaptedQueuePool if is_async else QueuePool
        kwargs["pool_size"] = 1
        kwargs["max_overflow"] = 0
        kwargs["pool_recycle"] = -1
    # Our pools hand a connection to one task or thread at a time.
    connect_args.setdefault("check_same_thread", False)
    # The rollback on return is ours (install_return_policy), only when a transaction
    # is open.
    kwargs["pool_reset_on_return"] = None


def install_pragmas(
    engine: Engine,
    *,
    busy_timeout: float,
    journal_mode: str | None,
    synchronous: str | None,
    foreign_keys: bool | None,
) -> None:
    """Set the pragmas on every new connection, and put it in driver-level autocommit."""
    pragmas: list[str] = []
    # busy_timeout first: switching a fresh file to WAL takes a lock others wait on.
    pragmas.append(f"PRAGMA busy_timeout = {round(busy_timeout * 1000)}")
    if journal_mode is not None and not is_memory_sqlite(engine.url):
        pragmas.append(f"PRAGMA journal_mode = {journal_mode}")
    if synchronous is not None:
        pragmas.append(f"PRAGMA synchronous = {synchronous}")
    if foreign_keys is not None:
        pragmas.append(f"PRAGMA foreign_keys = {'ON' if foreign_keys else 'OFF'}")

    def on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        # Driver-level autocommit: the driver never begins or ends a transaction on
        # its own, so the BEGIN below is the only one and SAVEPOINTs work
        # (SQLAlchemy's documented pysqlite/aiosqlite recipe).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            for pragma in pragmas:
                cursor.execute(pragma)
        finally:
            cursor.close()

    event.listen(engine, "connect", on_connect)


# --- the BEGIN policy ---------------------------------------------------------------


def install_begin(engine: Engine, default_mode: str, engine_isolation: str | None) -> None:
    """Emit ``BEGIN IMMEDIATE`` (or ``DEFERRED``) when SQLAlchemy begins a transaction.

    A deferred transaction that reads, then writes, fails at once with "database is
    locked" when another connection wrote in between (WAL gives no busy wait there);
    an immediate one takes the write lock up front and waits ``busy_timeout`` for it,
    which is what makes read-modify-write increments exact.
    """

    def on_begin(connection: Connection) -> None:
        options = connection.get_execution_options()
        if options.get("isolation_level", engine_isolation) == "AUTOCOMMIT":
            return
        dbapi_connection = connection.connection.dbapi_connection
        if dbapi_connection is not None and dbapi_connection.isolation_level is not None:
            # SQLAlchemy's pysqlite dialect sets "" when it restores a non-AUTOCOMMIT
            # isolation level (2.1, SQLiteDialect_pysqlite.set_isolation_level).
            dbapi_connection.isolation_level = None
        readonly = bool(options.get(READONLY_OPTION, False))
        mode = "deferred" if readonly else options.get(BEGIN_OPTION, default_mode)
        if mode == "none":  # a reader session: each statement on its own
            return
        connection.exec_driver_sql("BEGIN IMMEDIATE" if mode == "immediate" else "BEGIN")
        if readonly or connection.info.get(_QUERY_ONLY, False):
            _set_query_only(connection.connection.dbapi_connection, connection.info, readonly)

    def on_checkin(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        # A read-only transaction's PRAGMA must not outlive it for users of the
        # connection that never BEGIN (AUTOCOMMIT ones).
        if record.info.get(_QUERY_ONLY, False):
            _set_query_only(dbapi_connection, record.info, False)

    event.listen(engine, "begin", on_begin)
    event.listen(engine, "checkin", on_checkin)


def _set_query_only(dbapi_connection: Any, info: dict[Any, Any], value: bool) -> None:
    """``PRAGMA query_only``: SQLite refuses every write while it is on."""
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA query_only = {int(value)}")
    finally:
        cursor.close()
    info[_QUERY_ONLY] = value


def install_return_policy(engine: Engine, *, reset_on_return: bool) -> None:
    """Keep a cancelled statement's connection; roll back on return only when needed.

    ``reset_on_return`` is False when the user passed their own
    ``pool_reset_on_return``: theirs applies, as given.
    """
    event.listen(engine, "handle_error", _keep_connection_on_cancel)
    if reset_on_return:
        event.listen(engine, "reset", _end_transaction_on_return)


def _keep_connection_on_cancel(context: ExceptionContext) -> None:
    """Do not invalidate a SQLite connection because its task was cancelled.

    SQLAlchemy invalidates any connection whose operation a ``CancelledError`` (or
    another exit exception) interrupts: right for a network connection in an unknown
    state. aiosqlite's statement runs on in its worker thread and the connection stays
    sound; invalidating it instead *abandons* it — with SQLAlchemy 2.1.9 and aiosqlite
    0.22 the sqlite3 connection is stopped but not closed, keeping its transaction's
    write lock on the file ("database is locked" for everyone), and an in-memory
    database dies with its one connection. Kept, the connection is rolled back and
    returned like any other once the statement ends.
    """
    if isinstance(context.original_exception, asyncio.CancelledError):
        context.is_disconnect = False
        if context.connection is not None:
            # The statement may still be running in the driver's thread (a BEGIN
            # IMMEDIATE waiting for the lock, say): SQLite's in_transaction flag cannot
            # be trusted until it ends, so roll back on return in any case.
            context.connection.info[_ROLLBACK_ON_RETURN] = True


def _end_transaction_on_return(
    dbapi_connection: Any, record: ConnectionPoolEntry, state: PoolResetState
) -> None:
    """Roll back a returned SQLite connection only if SQLite says a transaction is open.

    Stands in for the pool's reset-on-return, switched off for SQLite engines
    (``engine_arguments``). SQLAlchemy 2.1 rolls back at every checkin unless the
    ``Connection`` ended its transaction on the way out — which a committed session's
    connection has not (the COMMIT cleared it first) — so with aiosqlite every
    transaction paid one more worker-thread hop for a ROLLBACK of nothing, and a
    cancellation landing in that hop made the pool log "Exception during reset" and
    abandon the connection. SQLite's own flag (``sqlite3.Connection.in_transaction``)
    is exact and free to read on an idle connection: it also catches the transaction a
    failed COMMIT leaves open (a deferred foreign key, say), which SQLAlchemy counts as
    ended. After a cancellation a statement may still be running in the driver's
    thread, so the flag is not trusted (``_keep_connection_on_cancel`` marks the
    connection) and the ROLLBACK waits behind the interrupted statement.
    """
    if not state.asyncio_safe:
        return
    if record.info.pop(_ROLLBACK_ON_RETURN, False) or _in_transaction(dbapi_connection):
        dbapi_connection.rollback()  # queued behind a statement still running, if any


def _in_transaction(dbapi_connection: Any) -> bool:
    # pysqlite's connection and our driver's adapter have the flag; SQLAlchemy's
    # aiosqlite adapter does not pass it through, aiosqlite's connection does.
    flag = getattr(dbapi_connection, "in_transaction", None)
    if flag is None:
        driver_connection = getattr(dbapi_connection, "driver_connection", None)
        flag = getattr(driver_connection, "in_transaction", True)  # unknown: roll back
    return bool(flag)


def sqlite_path(url: URL) -> Path | None:
    """The file a SQLite URL opens (relative to the working directory, as SQLite does).

    ``None`` for other databases and for in-memory SQLite.
    """
    if not is_sqlite(url) or is_memory_sqlite(url) or not url.database:
        return None
    database = url.database
    if database.startswith("file:"):  # a SQLite URI filename (uri=true)
        database = unquote(urlsplit(database).path)
    return Path(database)


def sqlite_unopenable(url: URL) -> str | None:
    """Why SQLite cannot open the file of ``url``, when the path alone shows it."""
    path = sqlite_path(url)
    if path is not None and not path.parent.is_dir():
        return f"the directory {path.parent} does not exist; create it, or fix the path in the URL"
    if path is not None and path.is_dir():
        return f"{path} is a directory; the URL must name a file"
    return None


def refuse_unopenable_files(engine: Engine) -> None:
    """Fail a connect to a file SQLite cannot open (``sqlite_unopenable``), before any thread.

    aiosqlite 0.22.1 starts a thread per connection and, when sqlite3 cannot open the
    file, stops it without waiting: the thread later posts its result to the event
    loop, which may be closed by then ("Event loop is closed" in a thread). The common
    causes (no such directory, a directory given) are told from the path alone, so they
    fail here, as sqlite3 itself would fail.
    """
    url = engine.url

    def on_connect(_dialect: Any, _record: Any, _cargs: Any, _cparams: Any) -> None:
        if sqlite_unopenable(url) is not None:
            raise sqlite3.OperationalError("unable to open database file")

    event.listen(engine, "do_connect", on_connect)
