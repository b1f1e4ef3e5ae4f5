"""Everything sessionforge knows about particular databases and drivers.

Public: ``is_retryable`` (the README points users at it). The other names are
sessionforge's own, used by its modules, and may change.

This package holds the tables — drivers (async ↔ sync), URL defaults, the isolation
levels each dialect accepts — and the small functions that answer "what does this URL's
database need?". What one database does differently lives in its module:

- ``sqlite.py``: SQLite URLs, pragmas, the BEGIN policy and the rollback on return;
- ``postgresql.py``: connect arguments (``application_name``, PgBouncer), server
  settings and ``statement_timeout``, the reader's autocommit switch;
- ``mysql.py``: MariaDB/MySQL's snapshot isolation preset, ``START TRANSACTION READ
  ONLY``, the statement-time limit of ``begin(timeout=)`` and its reset;
- ``errors.py``: which errors are retryable conflicts or statement timeouts.

Nothing here reads a ``FactoryConfig``: ``_internal/engines.py`` builds engines from
one and calls these modules with the values. No other module names a dialect or a
driver. ``is_retryable`` is public: ``sessionforge.dialects.is_retryable``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import text
from sqlalchemy.dialects import registry
from sqlalchemy.engine import URL, Connection

from sessionforge.errors import ConfigurationError

from . import mysql, postgresql, sqlite
from .errors import is_retryable as is_retryable
from .errors import is_statement_timeout as is_statement_timeout
from .mysql import is_mysql as is_mysql
from .postgresql import reader_begin_listener as reader_begin_listener
from .sqlite import is_memory_sqlite as is_memory_sqlite
from .sqlite import is_sqlite as is_sqlite
from .sqlite import normalise_memory_sqlite as normalise_memory_sqlite

__all__ = [
    "MAX_SECONDS",
    "DriverInfo",
    "abandon_driver_connection",
    "apply_settings",
    "async_driver_for",
    "begin_statements",
    "cancel_closes_connection",
    "canonical_dialect",
    "check_isolation_level",
    "check_settings",
    "check_url",
    "default_async_driver",
    "default_port",
    "display_name",
    "driver_isolation_level",
    "find_driver",
    "invalidate_on_timeout",
    "is_memory_sqlite",
    "is_mysql",
    "is_retryable",
    "is_sqlite",
    "is_statement_timeout",
    "isolation_levels",
    "known_drivers",
    "listed_hosts",
    "needs_liveness_check",
    "normalise_hosts",
    "normalise_memory_sqlite",
    "reader_begin_listener",
    "reader_execution_options",
    "sync_driver_for",
    "timeout_settings",
    "transaction_execution_options",
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

# Our own async SQLite driver (drivers/sqlite.py), the default for sqlite:// URLs (issue 16);
# sqlite+aiosqlite:// stays selectable. Registered lazily: the module is imported when such
# a URL is first used.
registry.register(
    "sqlite.sessionforge", "sessionforge.drivers.sqlite", "SQLiteDialect_sessionforge"
)

# The async driver a URL without one gets, and the async driver we point users of a
# sync-only driver to. MySQL/MariaDB: aiomysql over asyncmy (issue 14, measured on
# MariaDB 10.11: throughput within the noise of each other; aiomysql raises PyMySQL's
# own error classes, so both twins fail with the same types and wording, and it is pure
# Python, so it installs wherever PyMySQL does). mysql+asyncmy:// stays accepted.
# SQLite: sessionforge's own driver (issue 16: one thread hop per statement, none for a
# quick one, measured 1.3-1.7x SQLAlchemy + aiosqlite with the real BEGIN IMMEDIATE).
_DEFAULT_ASYNC: Final[Mapping[str, str]] = {
    "postgresql": "asyncpg",
    "sqlite": "sessionforge",
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

_DISPLAY_NAMES: Final[Mapping[str, str]] = {
    "postgresql": "PostgreSQL",
    "sqlite": "SQLite",
    "mysql": "MySQL/MariaDB",
}


# --- drivers ------------------------------------------------------------------------


def known_drivers() -> tuple[DriverInfo, ...]:
    """Every driver sessionforge has a mapping or an install hint for."""
    return _DRIVERS


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


# --- isolation levels ---------------------------------------------------------------


def isolation_levels(dialect: str) -> frozenset[str] | None:
    """Return the isolation levels ``dialect`` accepts, or ``None`` when unknown."""
    return _ISOLATION_LEVELS.get(canonical_dialect(dialect))


def check_isolation_level(url: URL, level: str) -> str:
    """Return ``level`` normalised ("repeatable_read" → "REPEATABLE READ"), or raise."""
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
    if url.get_backend_name() == "postgresql":
        return postgresql.driver_isolation_level(url.get_driver_name(), level)
    return level


# --- what a URL's database needs -----------------------------------------------------


def check_url(url: URL) -> None:
    """Refuse what ``url``'s dialect would refuse (or ignore) when the engine is built."""
    if is_sqlite(url):
        sqlite.check_url(url)


def listed_hosts(url: URL) -> str | None:
    """The hosts of a URL that names several (PostgreSQL's failover list), else ``None``."""
    return postgresql.listed_hosts(url) if url.get_backend_name() == "postgresql" else None


def normalise_hosts(url: URL, listed: str | None, shown: str) -> URL:
    """``url`` with the host list ``listed`` (libpq's comma form) in its dialect's form.

    Only PostgreSQL URLs may name several hosts; ``shown`` is the masked URL for errors.
    """
    if url.get_backend_name() == "postgresql":
        return postgresql.normalise_hosts(url, listed, shown)
    if listed is not None or "," in (url.host or ""):
        raise ConfigurationError(
            f"the database URL {shown!r} lists more than one host; only PostgreSQL URLs "
            "may (host1:port1,host2:port2, for failover): give one host"
        )
    return url


def needs_liveness_check(url: URL) -> bool:
    """True when pooled connections can die on the server side (not SQLite's)."""
    return not is_sqlite(url)


def invalidate_on_timeout(url: URL) -> bool:
    """Whether a timed-out transaction's connection is dropped rather than rolled back.

    A server connection may be mid-statement when the deadline cancels the task, so
    it is closed (the server rolls back). SQLite's one in-memory connection *is* the
    database, and a file connection is cheap to roll back, so SQLite rolls back.
    """
    return not is_sqlite(url)


def transaction_execution_options(
    url: URL, isolation_level: str | None, readonly: bool
) -> dict[str, Any]:
    """Execution options that give one transaction its isolation level / read-only mode."""
    options: dict[str, Any] = {}
    if isolation_level is not None:
        # The sync twin (psycopg) gets the same level as the async driver: parity.
        options["isolation_level"] = driver_isolation_level(url, isolation_level)
    if readonly:
        backend = url.get_backend_name()
        if backend == "postgresql":
            options.update(postgresql.READONLY_OPTIONS)
        elif backend == "sqlite":
            options[sqlite.READONLY_OPTION] = True
        elif not is_mysql(url):  # MySQL: a statement at BEGIN (begin_statements)
            raise ConfigurationError(
                f"readonly=True is supported on PostgreSQL, SQLite and MySQL/MariaDB, not "
                f"{backend}; use a read-only database user instead"
            )
    return options


def begin_statements(url: URL, readonly: bool) -> tuple[str, ...]:
    """Statements a transaction sends first, when it gets its connection (MySQL's READ ONLY)."""
    return (mysql.READONLY_STATEMENT,) if readonly and is_mysql(url) else ()


# --- transaction-local settings ---------------------------------------------------------


def check_settings(url: URL, settings: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """Validate ``begin(settings=)`` for ``url``; return (name, value) text pairs."""
    if is_mysql(url) and isinstance(settings, Mapping):
        return mysql.check_settings(settings)
    return postgresql.check_settings(url, settings)


def timeout_settings(url: URL, timeout: float | None) -> tuple[tuple[str, str], ...]:
    """Settings that enforce ``begin(timeout=)`` on the server too (PostgreSQL, MySQL)."""
    if is_mysql(url):
        return mysql.timeout_settings(timeout)
    return postgresql.timeout_settings(url, timeout)


def apply_settings(connection: Connection, settings: tuple[tuple[str, str], ...]) -> None:
    """Apply a transaction's settings on the connection it just got (one round trip)."""
    if connection.dialect.name in ("mysql", "mariadb"):
        mysql.apply_settings(connection, settings)
        return
    parameters: dict[str, str] = {}
    for index, (name, value) in enumerate(settings):
        parameters[f"name_{index}"] = name
        parameters[f"value_{index}"] = value
    connection.execute(text(postgresql.settings_statement(len(settings))), parameters)


def default_port(url: URL) -> int | None:
    """The port ``url`` connects to when it names none (``None``: no port, SQLite)."""
    if is_mysql(url):
        return mysql.DEFAULT_PORT
    if url.get_backend_name() == "postgresql":
        return postgresql.DEFAULT_PORT
    return None


def cancel_closes_connection(driver_package: str) -> bool:
    """Whether the async driver of package ``driver_package`` closes its connection when
    a call is cancelled mid-statement (aiomysql, asyncmy). asyncpg cancels the statement
    on the server and keeps the connection; aiosqlite's statement runs on in its thread."""
    return driver_package in mysql.CANCEL_CLOSES_CONNECTION


def abandon_driver_connection(url: URL, driver: Any) -> None:
    """Let go of ``driver`` (a connection of ``url``'s async driver) whose event loop is
    closed: nothing may be sent, and its finalizer must not need the loop."""
    if is_mysql(url):
        mysql.abandon_driver_connection(driver)


def reader_execution_options(url: URL) -> dict[str, Any]:
    """Execution options of a reader session: no transaction around its statements.

    SQLite skips its BEGIN (``sqlite.READER_OPTIONS``); asyncpg and psycopg switch the
    driver's own ``autocommit`` flag (``postgresql.reader_begin_listener``; behind
    PgBouncer an asyncpg reader runs in a READ ONLY transaction instead); other
    backends use SQLAlchemy's AUTOCOMMIT isolation level on an option engine.
    """
    if is_sqlite(url):
        return dict(sqlite.READER_OPTIONS)
    if postgresql.reader_flips_autocommit(url):
        return {}
    return {"isolation_level": check_isolation_level(url, "AUTOCOMMIT")}
