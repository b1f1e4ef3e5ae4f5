"""Everything sessionforge knows about particular databases and drivers.

Driver mapping (async ↔ sync), URL defaults, isolation levels each dialect accepts, and
the presets applied to engines the factory builds: SQLite's pragmas and BEGIN policy,
PostgreSQL's ``application_name`` and PgBouncer settings. No other module names a
dialect or a driver.
"""

from __future__ import annotations

import asyncio
import math
import re
import sqlite3
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import event
from sqlalchemy.dialects import registry
from sqlalchemy.engine import URL, Connection, Engine, ExceptionContext
from sqlalchemy.pool import AsyncAdaptedQueuePool, QueuePool

if TYPE_CHECKING:
    from sqlalchemy.orm import Session
    from sqlalchemy.pool import ConnectionPoolEntry, PoolResetState

    from sessionforge.config import FactoryConfig

__all__ = [
    "BEGIN_OPTION",
    "DriverInfo",
    "apply_presets",
    "async_driver_for",
    "engine_kwargs",
    "install_sqlite_begin",
    "is_memory_sqlite",
    "is_sqlite",
    "isolation_levels",
    "known_drivers",
    "normalise_memory_sqlite",
    "sync_driver_for",
]


@dataclass(frozen=True, slots=True)
class DriverInfo:
    """One driver of one dialect: whether it is async, and what to install for it."""

    dialect: str
    driver: str
    is_async: bool
    package: str


_DRIVERS: Final[tuple[DriverInfo, ...]] = (
    DriverInfo("postgresql", "asyncpg", True, "asyncpg"),
    DriverInfo("postgresql", "psycopg", True, "psycopg[binary]"),
    DriverInfo("postgresql", "psycopg_async", True, "psycopg[binary]"),
    DriverInfo("postgresql", "psycopg2", False, "psycopg2-binary"),
    DriverInfo("postgresql", "psycopg2cffi", False, "psycopg2cffi"),
    DriverInfo("postgresql", "pg8000", False, "pg8000"),
    DriverInfo("sqlite", "aiosqlite", True, "aiosqlite"),
    DriverInfo("sqlite", "sessionforge", True, "(part of sessionforge)"),
    DriverInfo("sqlite", "pysqlite", False, "(part of Python)"),
    DriverInfo("mysql", "aiomysql", True, "aiomysql"),
    DriverInfo("mysql", "asyncmy", True, "asyncmy"),
    DriverInfo("mysql", "pymysql", False, "pymysql"),
    DriverInfo("mysql", "mysqldb", False, "mysqlclient"),
    DriverInfo("mysql", "mysqlconnector", False, "mysql-connector-python"),
    DriverInfo("mysql", "mariadbconnector", False, "mariadb"),
)

# Our own async SQLite driver (sqlite_driver.py), opt-in: sqlite+sessionforge:///app.db.
# Registered lazily: the module is imported when such a URL is first used.
registry.register(
    "sqlite.sessionforge", "sessionforge.drivers.sqlite", "SQLiteDialect_sessionforge"
)

# The async driver a URL without one gets, and the async driver we point users of a
# sync-only driver to.
_DEFAULT_ASYNC: Final[Mapping[str, str]] = {
    "postgresql": "asyncpg",
    "sqlite": "aiosqlite",
    "mysql": "aiomysql",
}
# The sync twin's driver for each async driver (DESIGN.md §5).
_SYNC_TWIN: Final[Mapping[tuple[str, str], str]] = {
    ("postgresql", "asyncpg"): "psycopg",
    ("postgresql", "psycopg"): "psycopg",
    ("postgresql", "psycopg_async"): "psycopg",
    ("sqlite", "aiosqlite"): "pysqlite",
    ("sqlite", "sessionforge"): "pysqlite",
    ("mysql", "aiomysql"): "pymysql",
    ("mysql", "asyncmy"): "pymysql",
}
# Dialect names SQLAlchemy accepts as spelled by users, folded to the canonical one.
_DIALECT_ALIASES: Final[Mapping[str, str]] = {"postgres": "postgresql", "mariadb": "mysql"}

_ISOLATION_LEVELS: Final[Mapping[str, frozenset[str]]] = {
    "postgresql": frozenset(
        {"READ COMMITTED", "READ UNCOMMITTED", "REPEATABLE READ", "SERIALIZABLE", "AUTOCOMMIT"}
    ),
    "mysql": frozenset(
        {"READ COMMITTED", "READ UNCOMMITTED", "REPEATABLE READ", "SERIALIZABLE", "AUTOCOMMIT"}
    ),
    "sqlite": frozenset({"SERIALIZABLE", "READ UNCOMMITTED", "AUTOCOMMIT"}),
}

#: The longest wait, in seconds, sessionforge passes on: PostgreSQL's
#: ``statement_timeout`` and SQLite's ``busy_timeout`` are C ints of milliseconds
#: (2147483647 ms, about 24.8 days). The same bound on every dialect, so a value that
#: passes tests on SQLite does not fail in production on PostgreSQL.
MAX_SECONDS: Final = (2**31 - 1) / 1000

# Levels a driver's SQLAlchemy dialect refuses, and what to pass for the same
# behaviour. PostgreSQL runs READ UNCOMMITTED as READ COMMITTED (its docs, "Transaction
# Isolation"), and SQLAlchemy's asyncpg dialect, whose lookup table has no READ
# UNCOMMITTED, raises ArgumentError for it, at checkout, leaking the connection.
_DRIVER_LEVELS: Final[Mapping[tuple[str, str], Mapping[str, str]]] = {
    ("postgresql", "asyncpg"): {"READ UNCOMMITTED": "READ COMMITTED"},
}

SQLITE_JOURNAL_MODES: Final = frozenset({"WAL", "DELETE", "TRUNCATE", "PERSIST", "MEMORY", "OFF"})
SQLITE_SYNCHRONOUS: Final = frozenset({"OFF", "NORMAL", "FULL", "EXTRA"})
SQLITE_BEGIN_MODES: Final = frozenset({"immediate", "deferred"})

# Options of FactoryConfig that only one dialect uses; the others refuse them.
_OPTION_DIALECTS: Final[Mapping[str, str]] = {
    "pgbouncer": "postgresql",
    "application_name": "postgresql",
    "sqlite_journal_mode": "sqlite",
    "sqlite_synchronous": "sqlite",
    "sqlite_busy_timeout": "sqlite",
    "sqlite_foreign_keys": "sqlite",
    "sqlite_begin": "sqlite",
}
_DISPLAY_NAMES: Final[Mapping[str, str]] = {
    "postgresql": "PostgreSQL",
    "sqlite": "SQLite",
    "mysql": "MySQL/MariaDB",
}

#: Execution option that picks the SQLite BEGIN mode of one connection's transactions
#: ("immediate" or "deferred").
BEGIN_OPTION: Final = "sessionforge_sqlite_begin"
#: Execution option asking SQLite for a read-only transaction (deferred BEGIN plus
#: ``PRAGMA query_only``).
READONLY_OPTION: Final = "sessionforge_readonly"


def known_drivers() -> tuple[DriverInfo, ...]:
    """Every driver sessionforge has a mapping or an install hint for."""
    return _DRIVERS


def option_dialect(option: str) -> str | None:
    """The dialect a ``FactoryConfig`` option belongs to, or ``None`` if it is for all."""
    return _OPTION_DIALECTS.get(option)


def display_name(dialect: str) -> str:
    """``dialect`` as people write it in prose ("PostgreSQL")."""
    return _DISPLAY_NAMES.get(dialect, dialect)


def canonical_dialect(name: str) -> str:
    """Return the dialect name SQLAlchemy's registry uses for ``name``."""
    return _DIALECT_ALIASES.get(name, name)


def find_driver(dialect: str, driver: str) -> DriverInfo | None:
    """Return what sessionforge knows of this dialect+driver, or ``None``."""
    for info in _DRIVERS:
        if info.dialect == dialect and info.driver == driver:
            return info
    return None


def default_async_driver(dialect: str) -> str | None:
    """Return the async driver a URL of this dialect without a driver gets."""
    return _DEFAULT_ASYNC.get(dialect)


def async_driver_for(dialect: str) -> DriverInfo | None:
    """Return the async driver to suggest to a user of a sync driver of ``dialect``."""
    name = _DEFAULT_ASYNC.get(dialect)
    return None if name is None else find_driver(dialect, name)


def sync_driver_for(dialect: str, driver: str) -> DriverInfo | None:
    """Return the sync twin's driver for an async ``dialect+driver``, or ``None``."""
    info = find_driver(dialect, driver)
    if info is not None and not info.is_async:
        return info
    name = _SYNC_TWIN.get((dialect, driver))
    return None if name is None else find_driver(dialect, name)


def isolation_levels(dialect: str) -> frozenset[str] | None:
    """Return the isolation levels ``dialect`` accepts, or ``None`` when unknown."""
    return _ISOLATION_LEVELS.get(canonical_dialect(dialect))


def check_isolation_level(url: URL, level: str) -> str:
    """Return ``level`` normalised ("repeatable_read" → "REPEATABLE READ"), or raise."""
    from sessionforge.errors import ConfigurationError

    if not isinstance(level, str):
        raise ConfigurationError(
            f"isolation_level of type {type(level).__name__} is invalid: expected a string "
            "such as 'SERIALIZABLE'"
        )
    normalised = level.upper().replace("_", " ").strip()
    supported = isolation_levels(url.get_backend_name())
    if supported is not None and normalised not in supported:
        raise ConfigurationError(
            f"isolation_level={level!r} is not supported by {url.get_backend_name()}; "
            f"use one of {', '.join(sorted(supported))}"
        )
    return normalised


def driver_isolation_level(url: URL, level: str) -> str:
    """The level to hand SQLAlchemy for ``level`` (normalised) on ``url``'s driver."""
    aliases = _DRIVER_LEVELS.get((url.get_backend_name(), url.get_driver_name()), {})
    return aliases.get(level, level)


# Query parameters SQLAlchemy's pysqlite dialect (aiosqlite's and ours alike) gives
# the driver, converted when the engine is built; any other one is a SQLite URI
# parameter, passed on only with uri=true and otherwise ignored with a warning.
_SQLITE_DRIVER_QUERY: Final[Mapping[str, str]] = {
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


def check_url(url: URL) -> None:
    """Refuse what ``url``'s dialect would refuse (or ignore) when the engine is built."""
    from sessionforge.errors import ConfigurationError

    if not is_sqlite(url):
        return
    if url.username or url.password or url.host or url.port:
        raise ConfigurationError(
            "a SQLite URL names a file, not a server: it has no user, password, host or "
            "port; write sqlite:///relative/app.db, sqlite:////absolute/app.db or "
            "sqlite:// for an in-memory database"
        )
    for key, kind in _SQLITE_DRIVER_QUERY.items():
        if key in url.query and not _is_query_value(url.query[key], kind):
            raise ConfigurationError(
                f"the SQLite URL's query parameter {key}= must be one {kind} value"
                + (" (true or false)" if kind == "bool" else "")
            )
    uri = str(url.query.get("uri", "false")).lower() in ("true", "yes", "on", "y", "t", "1")
    others = sorted(set(url.query) - set(_SQLITE_DRIVER_QUERY))
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


def engine_kwargs(config: FactoryConfig, url: URL, *, is_async: bool) -> dict[str, Any]:
    """Return the keyword arguments for ``create_engine``/``create_async_engine``."""
    kwargs: dict[str, Any] = {}
    for name in ("pool_size", "max_overflow", "pool_timeout", "pool_recycle"):
        value = getattr(config, name)
        if value is not None:
            kwargs[name] = value
    if config.pool_use_lifo:
        kwargs["pool_use_lifo"] = True
    if config.echo:
        kwargs["echo"] = True
    if config.isolation_level is not None:
        # By the config's (async) driver, so both twins run the same level.
        level = config.isolation_level
        kwargs["isolation_level"] = driver_isolation_level(config.url or url, level)
    connect_args = dict(config.connect_args if is_async else config.sync_connect_args)
    backend, driver = url.get_backend_name(), url.get_driver_name()
    if backend == "postgresql":
        connect_args = _postgres_connect_args(config, driver, connect_args)
    if is_memory_sqlite(url):
        # One connection, held for the factory's life: the database lives in it.
        # Transactions are serialised by the pool (size 1, no overflow).
        kwargs["poolclass"] = AsyncAdaptedQueuePool if is_async else QueuePool
        kwargs["pool_size"] = 1
        kwargs["max_overflow"] = 0
        kwargs["pool_recycle"] = -1
    if is_sqlite(url):
        # Our pools hand a connection to one task or thread at a time.
        connect_args.setdefault("check_same_thread", False)
        # The rollback on return is ours, and only when a transaction is open.
        kwargs["pool_reset_on_return"] = None
    if connect_args:
        kwargs["connect_args"] = connect_args
    kwargs.update(config.engine_options)
    return kwargs


def _postgres_connect_args(
    config: FactoryConfig, driver: str, connect_args: dict[str, Any]
) -> dict[str, Any]:
    if driver == "asyncpg":
        if config.application_name is not None:
            settings = dict(connect_args.get("server_settings") or {})
            settings.setdefault("application_name", config.application_name)
            connect_args["server_settings"] = settings
        if config.pgbouncer:
            # PgBouncer in transaction mode hands each transaction to any server
            # connection, so a named prepared statement may not exist there
            # (SQLAlchemy #6467, asyncpg #1058): no caches, unique statement names.
            connect_args.setdefault("statement_cache_size", 0)
            connect_args.setdefault("prepared_statement_cache_size", 0)
            connect_args.setdefault("prepared_statement_name_func", _unique_statement_name)
    elif driver in ("psycopg", "psycopg_async", "psycopg2", "psycopg2cffi", "pg8000"):
        if config.application_name is not None:
            connect_args.setdefault("application_name", config.application_name)
        if config.pgbouncer and driver in ("psycopg", "psycopg_async"):
            connect_args.setdefault("prepare_threshold", None)
    return connect_args


def _unique_statement_name() -> str:
    return f"__sessionforge_{uuid.uuid4().hex}__"


def apply_presets(engine: Engine, config: FactoryConfig) -> None:
    """Attach the dialect's presets to ``engine`` (the sync core of an async engine)."""
    if _reader_flips_autocommit(engine.url):
        event.listen(engine, "checkin", _end_reader_autocommit)
    if is_sqlite(engine.url):
        _install_sqlite_pragmas(engine, config)
        install_sqlite_begin(engine, config.sqlite_begin, config.isolation_level)
        event.listen(engine, "handle_error", _keep_sqlite_connection_on_cancel)
        if "pool_reset_on_return" not in config.engine_options:  # else theirs, as given
            event.listen(engine, "reset", _end_sqlite_transaction_on_return)
        if engine.url.get_driver_name() == "aiosqlite":
            _refuse_unopenable_files(engine)


def _refuse_unopenable_files(engine: Engine) -> None:
    # aiosqlite 0.22.1 starts a thread per connection and, when sqlite3 cannot open
    # the file, stops it without waiting: the thread later posts its result to the
    # event loop, which may be closed by then ("Event loop is closed" in a thread).
    # The common causes (no such directory, a directory given) are told from the path
    # alone, so they fail here, as sqlite3 itself would fail, before any thread.
    from sessionforge._internal.diagnosis import sqlite_unopenable  # diagnosis imports this module

    url = engine.url

    def on_connect(_dialect: Any, _record: Any, _cargs: Any, _cparams: Any) -> None:
        if sqlite_unopenable(url) is not None:
            raise sqlite3.OperationalError("unable to open database file")

    event.listen(engine, "do_connect", on_connect)


def _keep_sqlite_connection_on_cancel(context: ExceptionContext) -> None:
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


_ROLLBACK_ON_RETURN: Final = "sessionforge_rollback_on_return"


def _end_sqlite_transaction_on_return(
    dbapi_connection: Any, record: ConnectionPoolEntry, state: PoolResetState
) -> None:
    """Roll back a returned SQLite connection only if SQLite says a transaction is open.

    Stands in for the pool's reset-on-return, switched off for SQLite engines
    (``engine_kwargs``). SQLAlchemy 2.1 rolls back at every checkin unless the
    ``Connection`` ended its transaction on the way out — which a committed session's
    connection has not (the COMMIT cleared it first) — so with aiosqlite every
    transaction paid one more worker-thread hop for a ROLLBACK of nothing, and a
    cancellation landing in that hop made the pool log "Exception during reset" and
    abandon the connection. SQLite's own flag (``sqlite3.Connection.in_transaction``)
    is exact and free to read on an idle connection: it also catches the transaction a
    failed COMMIT leaves open (a deferred foreign key, say), which SQLAlchemy counts as
    ended. After a cancellation a statement may still be running in the driver's
    thread, so the flag is not trusted (``_keep_sqlite_connection_on_cancel`` marks the
    connection) and the ROLLBACK waits behind the interrupted statement.
    """
    if not state.asyncio_safe:
        return
    if record.info.pop(_ROLLBACK_ON_RETURN, False) or _sqlite_in_transaction(dbapi_connection):
        dbapi_connection.rollback()  # queued behind a statement still running, if any


def _sqlite_in_transaction(dbapi_connection: Any) -> bool:
    # pysqlite's connection and our driver's adapter have the flag; SQLAlchemy's
    # aiosqlite adapter does not pass it through, aiosqlite's connection does.
    flag = getattr(dbapi_connection, "in_transaction", None)
    if flag is None:
        driver_connection = getattr(dbapi_connection, "driver_connection", None)
        flag = getattr(driver_connection, "in_transaction", True)  # unknown: roll back
    return bool(flag)


def _install_sqlite_pragmas(engine: Engine, config: FactoryConfig) -> None:
    pragmas: list[str] = []
    # busy_timeout first: switching a fresh file to WAL takes a lock others wait on.
    pragmas.append(f"PRAGMA busy_timeout = {round(config.sqlite_busy_timeout * 1000)}")
    if config.sqlite_journal_mode is not None and not is_memory_sqlite(engine.url):
        pragmas.append(f"PRAGMA journal_mode = {config.sqlite_journal_mode}")
    if config.sqlite_synchronous is not None:
        pragmas.append(f"PRAGMA synchronous = {config.sqlite_synchronous}")
    if config.sqlite_foreign_keys is not None:
        pragmas.append(f"PRAGMA foreign_keys = {'ON' if config.sqlite_foreign_keys else 'OFF'}")

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


def install_sqlite_begin(engine: Engine, default_mode: str, engine_isolation: str | None) -> None:
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


_QUERY_ONLY: Final = "sessionforge_query_only"


def _set_query_only(dbapi_connection: Any, info: dict[Any, Any], value: bool) -> None:
    """``PRAGMA query_only``: SQLite refuses every write while it is on."""
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA query_only = {int(value)}")
    finally:
        cursor.close()
    info[_QUERY_ONLY] = value


def describe_presets(config: FactoryConfig, url: URL) -> dict[str, Any]:
    """Return the presets in effect for ``url``, for ``sessionforge check`` and logs."""
    if is_sqlite(url):
        presets: dict[str, Any] = {
            "begin": config.sqlite_begin,
            "busy_timeout": config.sqlite_busy_timeout,
            "synchronous": config.sqlite_synchronous,
            "foreign_keys": config.sqlite_foreign_keys,
        }
        if is_memory_sqlite(url):
            presets["memory"] = "one shared connection; transactions serialised"
        else:
            presets["journal_mode"] = config.sqlite_journal_mode
        return presets
    if url.get_backend_name() == "postgresql":
        return {
            "application_name": config.application_name,
            "pgbouncer": config.pgbouncer,
            "ping_after": config.ping_after,
        }
    return {"ping_after": config.ping_after}


def needs_liveness_check(url: URL) -> bool:
    """True when pooled connections can die on the server side (not SQLite's)."""
    return not is_sqlite(url)


# --- per-transaction options --------------------------------------------------------

_SETTING_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)?$")


def transaction_execution_options(
    url: URL, isolation_level: str | None, readonly: bool
) -> dict[str, Any]:
    """Execution options that give one transaction its isolation level / read-only mode."""
    from sessionforge.errors import ConfigurationError

    options: dict[str, Any] = {}
    if isolation_level is not None:
        # The sync twin (psycopg) gets the same level as the async driver: parity.
        options["isolation_level"] = driver_isolation_level(url, isolation_level)
    if readonly:
        backend = url.get_backend_name()
        if backend == "postgresql":
            options["postgresql_readonly"] = True
        elif backend == "sqlite":
            options[READONLY_OPTION] = True
        else:
            raise ConfigurationError(
                f"readonly=True is supported on PostgreSQL and SQLite, not {backend}; "
                "use a read-only database user instead"
            )
    return options


def reader_execution_options(url: URL) -> dict[str, Any]:
    """Execution options of a reader session: no transaction around its statements.

    SQLite connections already run in driver-level autocommit with the BEGIN sent by
    the preset, so a reader just skips the BEGIN; setting SQLAlchemy's AUTOCOMMIT level
    there would cost two thread hops per session on aiosqlite (set and restore). On
    asyncpg and psycopg the reader switches the driver's own ``autocommit`` flag (see
    ``reader_begin_listener``). Other backends use SQLAlchemy's AUTOCOMMIT isolation
    level on an option engine.
    """
    if url.get_backend_name() == "sqlite":
        return {BEGIN_OPTION: "none"}
    if _reader_flips_autocommit(url):
        return {}
    return {"isolation_level": check_isolation_level(url, "AUTOCOMMIT")}


def _reader_flips_autocommit(url: URL) -> bool:
    return url.get_backend_name() == "postgresql" and url.get_driver_name() in (
        "asyncpg",
        "psycopg",
        "psycopg_async",
    )


_READER_AUTOCOMMIT: Final = "sessionforge_reader_autocommit"


def reader_begin_listener(url: URL) -> Callable[[Session, Any, Connection], None] | None:
    """The ``after_begin`` listener that puts a reader's connection in autocommit, if any.

    An option engine with ``isolation_level="AUTOCOMMIT"`` does the same through
    SQLAlchemy's per-checkout isolation-level handling, which measured about 25 µs per
    session on asyncpg (set at checkout, restored at checkin, each through the
    dialect's validation) — most of what a reader saves. Both drivers start their
    transaction lazily, at the first statement, so at ``after_begin`` nothing has begun
    yet and the DBAPI ``autocommit`` attribute (asyncpg's adapter emulates it, psycopg
    has it) can be switched; the pool's checkin switches it back.
    """
    return _autocommit_reader_connection if _reader_flips_autocommit(url) else None


def _autocommit_reader_connection(
    session: Session, _transaction: Any, connection: Connection
) -> None:
    if not isinstance(session.bind, Engine):
        return  # bound to a connection of its own (a test's isolated one): leave it be
    proxied = connection.connection
    try:
        proxied.dbapi_connection.autocommit = True  # type: ignore[union-attr]
    except Exception:  # the driver cannot switch now: the reader runs in a transaction
        return
    proxied.info[_READER_AUTOCOMMIT] = True


def _end_reader_autocommit(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
    if record.info.pop(_READER_AUTOCOMMIT, False):
        dbapi_connection.autocommit = False


def check_settings(url: URL, settings: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """Validate transaction-local server settings; return (name, value) text pairs."""
    from sessionforge.errors import ConfigurationError

    if not isinstance(settings, Mapping):
        raise ConfigurationError(
            f"settings must be a dict of server setting names to values, "
            f"got {type(settings).__name__}"
        )
    if settings and url.get_backend_name() != "postgresql":
        raise ConfigurationError(
            f"settings= are PostgreSQL server settings (set_config); "
            f"{url.get_backend_name()} has no equivalent, so they cannot be applied"
        )
    pairs: list[tuple[str, str]] = []
    for name, value in settings.items():
        if not isinstance(name, str) or not _SETTING_NAME.fullmatch(name):
            shown = repr(name) if isinstance(name, str) else f"of type {type(name).__name__}"
            raise ConfigurationError(
                f"setting name {shown} is invalid: use a server setting name like "
                "'statement_timeout' or a custom one like 'app.tenant_id'"
            )
        pairs.append((name, _setting_text(name, value)))
    return tuple(pairs)


def _setting_text(name: str, value: object) -> str:
    """A setting's value as the text set_config() gets; values are never echoed."""
    from sessionforge.errors import ConfigurationError

    def invalid(problem: str) -> ConfigurationError:
        return ConfigurationError(f"setting {name!r} has {problem}")

    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float) and not math.isfinite(value):
        raise invalid("a value that is not a finite number; use a number or a string")
    if isinstance(value, int | float):
        try:
            return str(value)
        except ValueError:  # an int past the 4300 digits int -> str allows
            raise invalid("an int too large to convert; pass it as a string") from None
    if not isinstance(value, str):
        raise invalid(f"a value of type {type(value).__name__}; use a string, a number or a bool")
    if "\x00" in value:
        raise invalid("a NUL character in its value, which PostgreSQL text cannot hold")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise invalid(
            "a value that is not valid Unicode (a lone surrogate); check how it was decoded"
        ) from None
    return value


def timeout_settings(url: URL, timeout: float | None) -> tuple[tuple[str, str], ...]:
    """Server settings that enforce ``timeout`` on the server too (PostgreSQL)."""
    if timeout is None or url.get_backend_name() != "postgresql":
        return ()
    return (("statement_timeout", str(max(1, round(timeout * 1000)))),)


def settings_statement(count: int) -> str:
    """One SELECT applying ``count`` transaction-local settings, all values bound."""
    calls = ", ".join(f"set_config(:name_{i}, :value_{i}, true)" for i in range(count))
    return f"SELECT {calls}"


def invalidate_on_timeout(url: URL) -> bool:
    """Whether a timed-out transaction's connection is dropped rather than rolled back.

    A server connection may be mid-statement when the deadline cancels the task, so
    it is closed (the server rolls back). SQLite's one in-memory connection *is* the
    database, and a file connection is cheap to roll back, so SQLite rolls back.
    """
    return not is_sqlite(url)


# --- errors -------------------------------------------------------------------------

# PostgreSQL: serialization_failure, deadlock_detected. MySQL/MariaDB: deadlock,
# lock wait timeout. SQLite: SQLITE_BUSY, SQLITE_LOCKED.
_RETRYABLE_SQLSTATES: Final = frozenset({"40001", "40P01"})
_RETRYABLE_MYSQL_CODES: Final = frozenset({1213, 1205})
_RETRYABLE_SQLITE_CODES: Final = frozenset({5, 6})
_STATEMENT_TIMEOUT_SQLSTATE: Final = "57014"  # query_canceled


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
        args = getattr(error, "args", ())
        if (
            type(error).__module__.startswith(("pymysql", "aiomysql", "asyncmy", "MySQLdb"))
            and args
            and args[0] in _RETRYABLE_MYSQL_CODES
        ):
            return True
    return False


def is_statement_timeout(exc: BaseException) -> bool:
    """True when the server cancelled a statement for ``statement_timeout``.

    SQLSTATE 57014 also covers a cancel by ``pg_cancel_backend`` ("due to user
    request"): only the statement-timeout wording counts.
    """
    return any(
        _sqlstate(error) == _STATEMENT_TIMEOUT_SQLSTATE and "statement timeout" in str(error)
        for error in _driver_errors(exc)
    )
