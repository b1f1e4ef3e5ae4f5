"""Which database errors mean what: retryable conflicts, statement timeouts, lost connections.

``is_retryable`` is public (``sessionforge.dialects.is_retryable``, the README points to
it): ``run_transaction`` re-runs the work for the errors it accepts, and a
``retry_if=`` predicate may call it. The retry *policy* (how often, how long to wait)
is ``_internal/transactions.py``; this module only reads error codes.

``is_connection_error`` tells a connection-class failure (the connection, not the
statement, failed: refused, reset, terminated, a server shutting down or in recovery, a
primary that is now a standby) from the rest. ``_internal/disconnects.py`` turns those
into ``DatabaseUnavailableError``; wrong passwords, missing databases and roles are not
connection-class (they do not go away on their own).
"""

from __future__ import annotations

import errno
import re
import socket
from typing import Final

from sqlalchemy.exc import StatementError

__all__ = ["is_connection_error", "is_retryable", "is_statement_timeout"]

# PostgreSQL: serialization_failure, deadlock_detected. MySQL/MariaDB: deadlock,
# lock wait timeout, and 1020 "Record has changed since last read" (MariaDB's
# innodb_snapshot_isolation refusing a lost update: dialects/mysql.py). SQLite:
# SQLITE_BUSY, SQLITE_LOCKED.
_RETRYABLE_SQLSTATES: Final = frozenset({"40001", "40P01"})
_RETRYABLE_MYSQL_CODES: Final = frozenset({1213, 1205, 1020})
_RETRYABLE_SQLITE_CODES: Final = frozenset({5, 6})
_STATEMENT_TIMEOUT_SQLSTATE: Final = "57014"  # query_canceled
# MariaDB's max_statement_time, MySQL's max_execution_time exceeded.
_STATEMENT_TIMEOUT_MYSQL_CODES: Final = frozenset({1969, 3024})
# The drivers' modules: each raises its server errors with the code as args[0]
# (aiomysql raises PyMySQL's classes; asyncmy its own, asyncmy.errors).
_MYSQL_DRIVER_MODULES: Final = ("pymysql", "aiomysql", "asyncmy", "MySQLdb")


def _driver_errors(exc: BaseException) -> list[BaseException]:
    """``exc`` and the driver exceptions it wraps (SQLAlchemy's ``.orig``, causes)."""
    found: list[BaseException] = []
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        found.append(current)
        stack.extend([getattr(current, "orig", None), current.__cause__])
    return found


def _sqlstate(error: BaseException) -> str | None:
    state = getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)
    return state if isinstance(state, str) else None


def is_retryable(exc: BaseException) -> bool:
    """True when re-running the whole transaction may succeed (conflicts, deadlocks)."""
    for error in _driver_errors(exc):
        if _sqlstate(error) in _RETRYABLE_SQLSTATES:
            return True
        code = getattr(error, "sqlite_errorcode", None)
        if isinstance(code, int) and code & 0xFF in _RETRYABLE_SQLITE_CODES:
            return True  # extended codes (SQLITE_BUSY_SNAPSHOT...) keep the primary low
        if type(error).__module__.startswith(("sqlite3", "aiosqlite")) and (
            "database is locked" in str(error) or "database is busy" in str(error)
        ):
            return True
        if _mysql_code(error) in _RETRYABLE_MYSQL_CODES:
            return True
    return False


def _mysql_code(error: BaseException) -> int | None:
    """The server's error number of a MySQL driver's exception, else ``None``."""
    args = getattr(error, "args", ())
    if type(error).__module__.startswith(_MYSQL_DRIVER_MODULES) and args:
        code = args[0]
        return code if isinstance(code, int) else None
    return None


def is_statement_timeout(exc: BaseException) -> bool:
    """True when the server cancelled a statement for its statement-time limit.

    PostgreSQL's ``statement_timeout``: SQLSTATE 57014 also covers a cancel by
    ``pg_cancel_backend`` ("due to user request"), so only the statement-timeout wording
    counts. MariaDB's ``max_statement_time`` (1969), MySQL's ``max_execution_time`` (3024).
    """
    return any(
        (_sqlstate(error) == _STATEMENT_TIMEOUT_SQLSTATE and "statement timeout" in str(error))
        or _mysql_code(error) in _STATEMENT_TIMEOUT_MYSQL_CODES
        for error in _driver_errors(exc)
    )


# --- connection-class failures --------------------------------------------------------

# SQLSTATE class 08 (connection_exception: PgBouncer also answers 08P01 for its own
# "server conn crashed?", "query_wait_timeout"...), and class 57's admin_shutdown,
# crash_shutdown and cannot_connect_now (shutting down, starting up, in recovery).
_CONNECTION_SQLSTATE_CLASS: Final = "08"
_CONNECTION_SQLSTATES: Final = frozenset({"57P01", "57P02", "57P03"})
#: read_only_sql_transaction: after a failover, a connection to the old primary (now a
#: standby), or a multi-host URL without target_session_attrs=read-write.
READ_ONLY_SQLSTATE: Final = "25006"
_MYSQL_READ_ONLY_TRANSACTION: Final = 1792  # ER_CANT_EXECUTE_IN_READ_ONLY_TRANSACTION

# Socket errors of an open connection (a refused or unreachable *connect* is any OSError).
_SOCKET_ERRNOS: Final = frozenset(
    {
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.EPIPE,
        errno.ENOTCONN,
        errno.ETIMEDOUT,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ENETDOWN,
        errno.EHOSTDOWN,
    }
)

# What the drivers say when the connection is gone, for errors that carry no SQLSTATE:
# asyncpg's InterfaceError, psycopg's OperationalError (libpq's text), asyncpg's
# InternalClientError when a connection died mid-operation ("cannot switch to state 15;
# another operation is in progress"), and libpq's target_session_attrs refusals.
_LOST_CONNECTION: Final = re.compile(
    r"connection is closed|connection was closed|the connection is lost"
    r"|server closed the connection unexpectedly|terminating connection"
    r"|consuming input failed|could not receive data from server"
    r"|could not send data to server|SSL SYSCALL error|SSL connection has been closed"
    r"|cannot switch to state|connection not open|no connection to the server"
    r"|the database system is (?:shutting down|starting up|in recovery mode"
    r"|not yet accepting connections|not accepting connections)"
    r"|Connection refused|Connection reset|Connection timed out|timeout expired"
    r"|No route to host|Network is unreachable"
    r"|session is read-only|server is in hot standby mode",
    re.IGNORECASE,
)

# Driver exceptions that mean the connection broke whatever their text: asyncpg's
# "no host matches target_session_attrs" and its "connection does not exist".
_LOST_CONNECTION_TYPES: Final = frozenset(
    {"TargetServerAttributeNotMatched", "ConnectionDoesNotExistError", "ConnectionFailureError"}
)
# MySQL client and server codes of a connection that failed or is gone: 2002/2003 can't
# connect (socket, TCP), 2005 unknown host, 2006 server has gone away, 2013 lost
# connection during query, 2055 lost connection at a stage, 1053 server shutdown in
# progress, 1927 connection killed (MariaDB), 4031 disconnected for inactivity (MySQL 8).
_MYSQL_CONNECTION_CODES: Final = frozenset({2002, 2003, 2005, 2006, 2013, 2055, 1053, 1927, 4031})
_DRIVER_MODULES: Final = ("asyncpg", "psycopg", "psycopg2", "pg8000", "sqlalchemy")


def is_connection_error(
    exc: BaseException, *, connecting: bool = False, read_only_transaction: bool = False
) -> bool:
    """True when ``exc`` means the connection failed, not the statement.

    ``connecting``: ``exc`` came from opening a connection, where any ``OSError``
    (refused, unreachable, unresolvable, timed out) counts. ``read_only_transaction``:
    the transaction was opened ``READ ONLY`` on purpose (``begin(readonly=True)``, a
    reader behind PgBouncer), so a write refused with 25006 is the caller's mistake,
    not a standby where a primary was expected. Cancellations are never connection
    errors.
    """
    if not isinstance(exc, Exception):
        return False  # CancelledError, KeyboardInterrupt: not ours to reword
    # (asyncio.timeout's TimeoutError is raised from the CancelledError it turned into)
    errors = [error for error in _driver_errors(exc) if isinstance(error, Exception)]
    states = [
        state
        for error in errors
        if (state := _sqlstate(error)) is not None
        # MySQL's 1792 (25006) refuses a write in a READ ONLY transaction, which only
        # the caller opens (a read-only MariaDB/MySQL server answers 1290, HY000).
        and _mysql_code(error) != _MYSQL_READ_ONLY_TRANSACTION
    ]
    if states:  # the server answered: its code says what failed
        return any(
            state.startswith(_CONNECTION_SQLSTATE_CLASS)
            or state in _CONNECTION_SQLSTATES
            or (state == READ_ONLY_SQLSTATE and not read_only_transaction)
            for state in states
        )
    for error in errors:
        if isinstance(error, OSError) and _is_socket_error(error, connecting=connecting):
            return True
        if type(error).__name__ in _LOST_CONNECTION_TYPES:
            return True
        if _mysql_code(error) in _MYSQL_CONNECTION_CODES:
            return True
        if (
            type(error).__module__.startswith(_DRIVER_MODULES)
            and not isinstance(error, StatementError)  # its text quotes the SQL too
            and _LOST_CONNECTION.search(str(error))
        ):
            return True
    return False


def _is_socket_error(error: OSError, *, connecting: bool) -> bool:
    if connecting or isinstance(error, ConnectionError | socket.gaierror):
        return True
    return error.errno in _SOCKET_ERRNOS
