"""What sessionforge does differently on MariaDB and MySQL.

- **Snapshot isolation** (the ``mysql_snapshot_isolation`` preset): InnoDB's REPEATABLE
  READ lets a read-modify-write transaction overwrite a row another transaction changed
  after its snapshot — a lost update, with no error (issue 14: 131 of 500 increments
  survived). MariaDB 10.6.18 / 10.11.8 and later have ``innodb_snapshot_isolation``:
  with it ON the losing transaction fails with error 1020 ("Record has changed since
  last read"), which ``run_transaction`` retries. It is set per connection, when the
  pool opens one; a server without the variable (older MariaDB, every MySQL) is logged
  once per engine and its connections are left as they are.
- **Read-only transactions**: ``START TRANSACTION READ ONLY``, sent when the session
  gets its connection (``TransactionOptions.statements``; the drivers begin implicitly,
  at the first statement, so nothing has begun yet). SQLAlchemy's MySQL dialects have
  no read-only execution option.
- **``begin(timeout=)``**: the statement-time limit of the server (MariaDB's
  ``max_statement_time`` in seconds, MySQL's ``max_execution_time`` in milliseconds,
  SELECTs only) for the connection while the transaction runs. These are session
  variables, so the value the connection had is kept in a user variable and put back
  when the connection returns to the pool (``install_return_policy``): a pool ``reset``
  listener, whose failure makes SQLAlchemy invalidate the connection rather than hand
  it on.
- **The return to the pool** (``install_return_policy``): the pool's own reset
  (``pool_reset_on_return``) is switched off for MySQL engines, and the connection is
  rolled back at return only when the server said a transaction is open (the
  ``SERVER_STATUS_IN_TRANS`` flag of its last reply, kept by every driver), or after a
  failed statement (an error reply carries no flag). SQLAlchemy rolls back at every
  return unless the ``Connection`` ended its transaction on the way out — which a
  committed session's has not — so each committed transaction paid one ROLLBACK of
  nothing.
- **``ping()``** (``ping``): the driver's COM_PING, one round trip with no statement.
- ``settings=`` is refused: MySQL has no transaction-local settings, and a session
  variable set for one transaction would reach the connection's next user.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.exc import DBAPIError

from sessionforge.errors import ConfigurationError

if TYPE_CHECKING:
    from sqlalchemy.engine import ExceptionContext
    from sqlalchemy.pool import ConnectionPoolEntry, PoolResetState

__all__ = [
    "READONLY_STATEMENT",
    "STATEMENT_TIME",
    "apply_settings",
    "check_settings",
    "engine_arguments",
    "install_return_policy",
    "install_snapshot_isolation",
    "is_mysql",
    "ping",
    "server_name",
    "statement_time_limit",
    "timeout_settings",
]

logger = logging.getLogger("sessionforge.engines")

#: Sent when a ``begin(readonly=True)`` transaction gets its connection.
READONLY_STATEMENT: Final = "START TRANSACTION READ ONLY"
SNAPSHOT_ISOLATION_STATEMENT: Final = "SET SESSION innodb_snapshot_isolation = ON"
_UNKNOWN_SYSTEM_VARIABLE: Final = 1193  # ER_UNKNOWN_SYSTEM_VARIABLE
# Where a timed transaction keeps the connection's own limit until the connection returns.
_SAVED: Final = "@sessionforge_statement_time"
# record.info key: the statement-time limit to put back at return (the variable's name).
_RESTORE: Final = "sessionforge_restore_statement_time"
_MARIADB_LIMIT: Final = "max_statement_time"  # seconds, a double; 0 = none
_MYSQL_LIMIT: Final = "max_execution_time"  # milliseconds, SELECTs only; 0 = none
# The server status flag of an open transaction, in every OK and EOF reply (the
# protocol's SERVER_STATUS_IN_TRANS).
_SERVER_STATUS_IN_TRANS: Final = 0x0001
# record.info key: a statement failed on the connection, so its status flag is stale.
_FAILED: Final = "sessionforge_statement_failed"


def is_mysql(url: URL) -> bool:
    """True for MySQL and MariaDB URLs (``mariadb://`` is folded to ``mysql``)."""
    return url.get_backend_name() in ("mysql", "mariadb")


def server_name(dialect: Any) -> str:
    """ "MariaDB" or "MySQL", as SQLAlchemy's dialect found the server at first connect."""
    return "MariaDB" if getattr(dialect, "is_mariadb", False) else "MySQL"


# --- the snapshot isolation preset ------------------------------------------------------


def install_snapshot_isolation(engine: Engine) -> None:
    """Run ``SET SESSION innodb_snapshot_isolation = ON`` on each new connection.

    A server that does not know the variable answers 1193: that is logged once, and the
    engine's later connections skip the statement.
    """
    supported = True

    def on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        nonlocal supported
        if not supported:
            return
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(SNAPSHOT_ISOLATION_STATEMENT)
        except Exception as exc:
            if _code(exc) != _UNKNOWN_SYSTEM_VARIABLE:
                raise
            supported = False
            logger.warning(
                "%s has no innodb_snapshot_isolation (MariaDB 10.6.18, 10.11.8 and later "
                "have it; MySQL does not): read-modify-write transactions at REPEATABLE "
                "READ can silently lose updates there; lock the rows you read with "
                "SELECT ... FOR UPDATE (with_for_update()), or pass "
                "mysql_snapshot_isolation=False to silence this",
                engine.url.render_as_string(hide_password=True),
            )
        finally:
            cursor.close()

    event.listen(engine, "connect", on_connect)


def _code(exc: BaseException) -> object:
    args = getattr(exc, "args", ())
    return args[0] if args else None


# --- per-transaction options ----------------------------------------------------------

#: The neutral name of ``begin(timeout=)``'s server-side limit in a transaction's
#: settings: MariaDB or MySQL (which variable, in which unit) is known only once
#: connected.
STATEMENT_TIME: Final = "statement_time"


def timeout_settings(timeout: float | None) -> tuple[tuple[str, str], ...]:
    """The settings pair that limits each statement of a transaction to ``timeout``."""
    return () if timeout is None else ((STATEMENT_TIME, repr(timeout)),)


def statement_time_limit(is_mariadb: bool, timeout: float) -> tuple[str, str]:
    """The server variable that limits each statement to ``timeout``, and its value."""
    if is_mariadb:
        return _MARIADB_LIMIT, f"{timeout:.6f}"
    return _MYSQL_LIMIT, str(max(1, round(timeout * 1000)))


def apply_settings(connection: Connection, settings: tuple[tuple[str, str], ...]) -> None:
    """Apply a transaction's settings (only ``STATEMENT_TIME``) on its new connection.

    The connection's own limit is saved in a user variable in the same statement, and
    put back when the connection returns to the pool (``install_return_policy``).
    """
    for name, value in settings:
        assert name == STATEMENT_TIME, name  # check_settings() lets no other through
        variable, limit = statement_time_limit(
            server_name(connection.dialect) == "MariaDB", float(value)
        )
        # Noted first: whatever happens to the SET, the return restores the saved value
        # (after a failed SET the restore fails too, and the connection is invalidated).
        connection.connection.info[_RESTORE] = variable
        connection.exec_driver_sql(
            f"SET {_SAVED} = @@session.{variable}, SESSION {variable} = {limit}"
        )


def install_return_policy(engine: Engine, *, reset_on_return: bool) -> None:
    """Roll back at return only when a transaction is open; restore a timed limit.

    Stands in for the pool's reset-on-return, switched off for MySQL engines
    (``engine_arguments``); ``reset_on_return`` is False when the user passed their
    own ``pool_reset_on_return``: theirs applies, as given, and only the limit is
    restored here. A pool ``reset`` listener runs on every return of a connection
    SQLAlchemy can still talk to; when it raises, SQLAlchemy invalidates the
    connection, so neither an open transaction nor a timed transaction's limit reaches
    the connection's next user.
    """
    dialect = engine.dialect

    def on_reset(
        dbapi_connection: Any, record: ConnectionPoolEntry, state: PoolResetState
    ) -> None:
        failed = record.info.pop(_FAILED, False)
        name = record.info.pop(_RESTORE, None)
        if not state.asyncio_safe or state.terminate_only:
            return
        if reset_on_return and (failed or _in_transaction(dialect, dbapi_connection)):
            dbapi_connection.rollback()
        if name is not None:
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute(f"SET SESSION {name} = {_SAVED}")
            finally:
                cursor.close()

    event.listen(engine, "reset", on_reset)
    if reset_on_return:
        event.listen(engine, "handle_error", _note_failure)


def engine_arguments(kwargs: dict[str, Any]) -> None:
    """What every MySQL engine needs in its ``create_engine`` arguments."""
    # The rollback on return is ours (install_return_policy), only when a transaction
    # is open.
    kwargs["pool_reset_on_return"] = None


def _note_failure(context: ExceptionContext) -> None:
    connection = context.connection
    if connection is not None and not connection.invalidated:
        connection.info[_FAILED] = True


def _in_transaction(dialect: Any, dbapi_connection: Any) -> bool:
    """The server's own word, from its last reply: is a transaction open?

    PyMySQL, aiomysql and asyncmy keep the status flags of the last OK or EOF reply
    in ``server_status``; a driver without them is rolled back, as the pool would.
    """
    status = getattr(dialect.get_driver_connection(dbapi_connection), "server_status", None)
    if not isinstance(status, int):
        return True
    return bool(status & _SERVER_STATUS_IN_TRANS)


#: The port a MySQL/MariaDB URL without one connects to.
DEFAULT_PORT: Final = 3306

#: The async MySQL drivers that close their connection when a call is cancelled
#: mid-statement (aiomysql: "Cancelled during execution").
CANCEL_CLOSES_CONNECTION: Final = frozenset({"aiomysql", "asyncmy"})


def abandon_driver_connection(driver: Any) -> None:
    """Let go of an aiomysql connection whose event loop is closed, without the loop.

    aiomysql's ``Connection.__del__`` closes its transport through the loop, which
    raises "Event loop is closed" (printed by the garbage collector). Without its
    stream writer it does nothing, and the transport's own finalizer closes the socket.
    """
    if type(driver).__module__.startswith("aiomysql.") and getattr(driver, "_writer", None):
        driver._writer = driver._reader = None


def ping(connection: Connection) -> None:
    """One round trip on ``connection``: the driver's COM_PING, no statement at all.

    The driver's exception is raised as SQLAlchemy's ``DBAPIError`` (a statement's
    would be), and a lost connection is invalidated, so the pool does not hand it on.
    """
    dialect = connection.dialect
    dbapi_connection = connection.connection.dbapi_connection
    assert dbapi_connection is not None  # a checked-out connection that is valid
    try:
        dialect.do_ping(dbapi_connection)
    except dialect.loaded_dbapi.Error as exc:
        lost = dialect.is_disconnect(exc, dbapi_connection, None)
        if lost:
            connection.invalidate(exc)
        raise DBAPIError.instance(
            None,
            None,
            exc,
            dialect.loaded_dbapi.Error,
            connection_invalidated=lost,
            dialect=dialect,
        ) from exc


def check_settings(settings: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """``begin(settings=...)`` on MySQL/MariaDB: a ``ConfigurationError`` that says why."""
    if settings:
        raise ConfigurationError(
            "settings= are transaction-local server settings, which MySQL and MariaDB do "
            "not have: a session variable set for one transaction would stay on the pooled "
            "connection for its next user, so sessionforge does not set them; run "
            "SET STATEMENT name=value FOR <statement> (MariaDB) inside the transaction, or "
            "set a variable for every connection with "
            "connect_args={'init_command': 'SET SESSION name=value'}"
        )
    return ()
